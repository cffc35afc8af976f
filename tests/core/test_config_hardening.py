"""Config loading against hostile or mistaken input: alias bombs, huge or non-UTF-8 files,
a run_dir that is not a run's own folder, overrides YAML would misread, bad regexes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from recaption.config import ConfigError, load_config, parse_override
from recaption.ledger import ShardLedger


def _alias_bomb(levels: int, width: int = 10) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: width**levels."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nsample:\n  prompts: *a{levels - 1}\n"


@pytest.fixture
def config_file(tmp_path: Path):
    """``config_file(text)``: a config file holding ``run_dir`` plus ``text``."""

    def write(text: str = "") -> Path:
        path = tmp_path / "run.yaml"
        path.write_text(f"run_dir: {tmp_path / 'run'}\n{text}", encoding="utf-8")
        return path

    return write


# -- size and shape of the file --------------------------------------------------------------
@pytest.mark.parametrize("levels", [6, 9])
def test_alias_bomb_is_refused_quickly(config_file, levels: int) -> None:
    path = config_file(_alias_bomb(levels))
    assert path.stat().st_size < 1200
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.monotonic() - start < 5
    text = str(err.value)
    assert str(path) in text and "refused" in text and "aliases" in text
    assert len(text) < 1000


def test_recursive_alias_is_refused(config_file) -> None:
    with pytest.raises(ConfigError, match="cycle"):
        load_config(config_file("sample:\n  prompts: &p [a, *p]\n"))


def test_alias_bomb_in_an_override_is_refused(config_file) -> None:
    levels = ["&l0 [" + ", ".join(["x"] * 16) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 16) + "]" for i in range(1, 8)]
    with pytest.raises(ConfigError, match="aliases"):
        load_config(config_file(), ["sample.prompts=[" + ", ".join(levels) + "]"])


def test_config_over_one_mib_is_refused(config_file) -> None:
    path = config_file("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"larger than 1 MiB") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_deep_nesting_is_refused_not_a_crash(config_file) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(config_file("x: " + "[" * 20000 + "]" * 20000 + "\n"))


def test_non_utf8_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(
        f"run_dir: {tmp_path}/run\ncaption:\n  custom_prompt: Décris\n".encode("latin-1")
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and "UTF-8" in text


def test_huge_value_is_not_repr_d_whole_in_the_error(config_file) -> None:
    path = config_file(f"download:\n  processes: {'x' * 200_000}\nsample:\n  prompts: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "download.processes" in text and "sample.prompts" in text
    assert len(text) < 1500
    for line in text.splitlines():
        got = line.partition("(got ")[2]
        assert len(got) <= 201, line[:300]


def test_many_errors_are_capped(config_file) -> None:
    prompts = "[" + ", ".join(["1"] * 500) + "]"
    with pytest.raises(ConfigError) as err:
        load_config(config_file(f"sample:\n  prompts: {prompts}\n"))
    text = str(err.value)
    assert "500 problem(s)" in text and "and 470 more" in text
    assert len(text.splitlines()) < 40


# -- run_dir ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["", "  ", "/", "/tmp/..", "HOME"])
def test_run_dir_that_is_not_a_run_folder_is_refused(config_file, value: str) -> None:
    if value == "HOME":
        value = str(Path.home())
    with pytest.raises(ConfigError, match="run_dir") as err:
        load_config(config_file(), [f"run_dir={value}"])
    text = str(err.value)
    assert any(w in text for w in ("is empty", "filesystem root", "home folder")), text


def test_empty_run_dir_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: ''\n")
    with pytest.raises(ConfigError, match="run_dir is empty"):
        load_config(path)


def test_ordinary_run_dirs_still_load(config_file, tmp_path: Path) -> None:
    assert load_config(config_file(), [f"run_dir={tmp_path / 'r'}"]).run_dir == tmp_path / "r"
    assert load_config(config_file(), ["run_dir=runs/demo"]).run_dir == Path("runs/demo")


# -- overrides -------------------------------------------------------------------------------
def test_override_text_that_yaml_reads_as_a_mapping_stays_text(config_file) -> None:
    config = load_config(config_file(), ["caption.custom_prompt=Describe: {alt_text}"])
    assert config.caption.custom_prompt == "Describe: {alt_text}"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("k=Describe: {alt_text}", "Describe: {alt_text}"),
        ("k=a: b", "a: b"),
        ("k=- item", "- item"),
        ("k=Count the # of cars", "Count the # of cars"),
        ("k=#ff0000", "#ff0000"),
        ("k={a: 1}", {"a": 1}),
        ("k=[x, y]", ["x", "y"]),
        ("k=4", 4),
        ("k=null", None),
        ("k='quoted: {x}'", "quoted: {x}"),
        ("k=", ""),
    ],
)
def test_override_values(text: str, value: object) -> None:
    assert parse_override(text) == (["k"], value)


# -- regex-bearing filter options ------------------------------------------------------------
@pytest.mark.parametrize("opening", ["(", "[a-", "a)|(b", "x(?i)y"])
def test_bad_boilerplate_regex_is_refused_at_load(config_file, opening: str) -> None:
    with pytest.raises(ConfigError, match=r"filter\.boilerplate_openings") as err:
        load_config(config_file(), [f"filter.boilerplate_openings={json.dumps([opening])}"])
    assert "regular expression" in str(err.value)


def test_good_boilerplate_regexes_and_phrases_load(config_file) -> None:
    config = load_config(
        config_file(),
        [
            r"filter.boilerplate_openings=['in this \(cropped\) image,? ', 'here we see ']",
            "filter.refusal_phrases=['(sorry)', 'as an [AI]']",
        ],
    )
    assert config.filter.boilerplate_openings == [r"in this \(cropped\) image,? ", "here we see "]
    assert config.filter.refusal_phrases == ["(sorry)", "as an [AI]"]


def test_overlong_refusal_phrase_is_refused_at_load(config_file) -> None:
    with pytest.raises(ConfigError, match=r"filter\.refusal_phrases: .*at most 200"):
        load_config(config_file(), [f"filter.refusal_phrases=['{'a' * 5000}']"])


# -- the ledger's recorded config (recaption/ledger.py; the lead makes this pass) ------------
def test_garbled_ledger_config_is_refused(tmp_path: Path) -> None:
    """A garbled ``_ledger/config.json`` beside done markers must stop the stage, naming the
    file, instead of treating the folder as new and redoing every shard without --overwrite."""
    out = tmp_path / "captions"
    first = ShardLedger("caption", out, {"model": "m", "max_new_tokens": 8})
    first.prepare()
    first.mark_done("00000", {"n_ok": 1, "n_failed": 0})
    recorded = out / "_ledger" / "config.json"
    recorded.write_text('{"stage": "caption", "fingerpr')
    changed = ShardLedger("caption", out, {"model": "m", "max_new_tokens": 16})
    with pytest.raises(RuntimeError, match=re.escape(str(recorded))):
        changed.prepare()
