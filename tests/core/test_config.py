"""Config loading: validation messages name the file and key; overrides by dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest

from recaption.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo.yaml", "laion_aesthetics_6plus.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(REPO / "configs" / name)
    assert isinstance(config, RunConfig)
    assert config.download.min_aesthetic_score == 6.0


def test_typo_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: r\ndownload:\n  procesess: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text
    assert "download.procesess" in text
    assert "Did you mean 'processes'" in text


def test_wrong_type_and_missing_value(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("download:\n  image_size: large\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "download.image_size" in text and "'large'" in text
    assert "run_dir: required value is missing" in text


def test_overrides_by_dotted_path(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: a\n")
    config = load_config(
        path,
        [
            "run_dir=/tmp/b",
            "download.processes=3",
            "download.min_aesthetic_score=null",
            "sample.prompts=[x, y]",
        ],
    )
    assert str(config.run_dir) == "/tmp/b"
    assert config.download.processes == 3
    assert config.download.min_aesthetic_score is None
    assert config.sample.prompts == ["x", "y"]


def test_override_typo_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: a\n")
    with pytest.raises(ConfigError, match=r"download\.treads: unknown key"):
        load_config(path, ["download.treads=4"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["download.threads"])


def test_run_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {tmp_path / 'afile'}\n")
    with pytest.raises(ConfigError, match="exists and is a file"):
        load_config(path)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_operational_keys_do_not_change_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: a\n")
    a = load_config(path).download.fingerprint_dict()
    b = load_config(path, ["download.processes=1", "download.threads=2"]).download
    c = load_config(path, ["download.image_size=512"]).download
    assert a == b.fingerprint_dict()
    assert a != c.fingerprint_dict()


def test_config_reference_is_current() -> None:
    from recaption.config_reference import render

    assert (REPO / "docs" / "CONFIG.md").read_text() == render(), (
        "docs/CONFIG.md is stale: run `python -m recaption.config_reference > docs/CONFIG.md`"
    )
