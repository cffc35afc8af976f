"""Download inputs that must stop with a message naming the file or key and what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaption.cli import main
from recaption.config import ConfigError, DownloadConfig, load_config
from recaption.metadata import MetadataError, prefilter, read_metadata
from recaption.stages.download import summarise


@pytest.mark.parametrize("value", ["inf", ".inf", "nan", "-.inf"])
def test_non_finite_timeout_is_refused(small_config: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(small_config, [f"download.timeout={value}"])
    message = str(info.value)
    assert "download.timeout" in message
    assert "finite number" in message or "greater than 0" in message or "valid number" in message


def test_infinite_timeout_is_refused_by_the_command(small_config: Path, caplog) -> None:
    assert main(["download", str(small_config), "download.timeout=.inf"]) == 2
    assert "download.timeout: Input should be a finite number" in caplog.text
    assert not (load_config(small_config).images_dir / "00000_stats.json").exists()


def test_old_private_hosts_key_names_the_new_keys(small_config: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(small_config, ["download.allow_private_hosts=true"])
    message = str(info.value)
    assert "download.allow_private_hosts was removed" in message
    assert "download.allow_loopback" in message and "download.allow_private_networks" in message


def test_split_switches_default_to_refusing() -> None:
    cfg = DownloadConfig()
    assert cfg.allow_loopback is False and cfg.allow_private_networks is False
    assert load_config(Path(__file__).parents[2] / "configs" / "demo.yaml").download.allow_loopback


def _meta(path: Path, width: pa.Array) -> Path:
    n = len(width)
    pq.write_table(
        pa.table(
            {
                "URL": [f"http://example.com/{path.stem}{i}.jpg" for i in range(n)],
                "TEXT": ["t"] * n,
                "WIDTH": width,
            }
        ),
        path,
    )
    return path


def test_column_types_that_differ_between_files(tmp_path: Path) -> None:
    a = _meta(tmp_path / "a.parquet", pa.array([800, 900], pa.int64()))
    b = _meta(tmp_path / "b.parquet", pa.array(["800", "wide"], pa.string()))
    with pytest.raises(MetadataError) as info:
        read_metadata([a, b], ["URL", "TEXT", "WIDTH"], {"URL": "url_col", "WIDTH": "width_col"})
    message = str(info.value)
    assert message.startswith(f"{b}: column 'WIDTH' (config key download.width_col)")
    assert f"is string here but int64 in {a}" in message
    assert "cast to int64" in message
    # A column that is only carried along names the key that asks for it.
    with pytest.raises(MetadataError, match=r"listed in download\.save_additional_columns"):
        read_metadata([a, b], ["URL", "TEXT", "WIDTH"], {"URL": "url_col"})
    # Types that widen (int and float) still merge.
    c = _meta(tmp_path / "c.parquet", pa.array([1.5], pa.float64()))
    assert read_metadata([a, c], ["URL", "WIDTH"], {"URL": "url_col"}).num_rows == 3


def test_column_type_conflict_through_the_command(tmp_path: Path, caplog) -> None:
    a = _meta(tmp_path / "a.parquet", pa.array([800], pa.int64()))
    b = _meta(tmp_path / "b.parquet", pa.array(["800"], pa.string()))
    config = {
        "run_dir": str(tmp_path / "run"),
        "download": {
            "metadata": [str(a), str(b)],
            "min_aesthetic_score": None,
            "max_punsafe": None,
            "max_pwatermark": None,
            "min_width": 512,
        },
    }
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    assert main(["download", str(tmp_path / "c.yaml")]) == 2
    assert f"{b}: column 'WIDTH' (config key download.width_col) is string here" in caplog.text
    assert "ArrowTypeError" not in caplog.text


def test_prefilter_on_a_column_of_the_wrong_type(tmp_path: Path) -> None:
    table = pa.table({"URL": ["http://example.com/a.jpg"], "TEXT": ["t"], "WIDTH": ["800"]})
    cfg = DownloadConfig(
        min_aesthetic_score=None, max_punsafe=None, max_pwatermark=None, min_width=512
    )
    with pytest.raises(MetadataError) as info:
        prefilter(table, cfg)
    assert "rule min_width: column 'WIDTH' (config key download.width_col) has type string" in (
        str(info.value)
    )


def test_garbled_stats_file_is_named(tmp_path: Path) -> None:
    good = {"count": 2, "successes": 1, "failed_to_download": 1, "status_dict": {"404": 1}}
    (tmp_path / "00000_stats.json").write_text(json.dumps(good))
    (tmp_path / "00001_stats.json").write_text('{"count": 3,\n')
    with pytest.raises(ValueError) as info:
        summarise(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / '00001_stats.json'}: ")
    assert "delete this file so img2dataset downloads shard 00001 again" in message
    (tmp_path / "00001_stats.json").write_text('{"count": 3, "status_dict": ["x"]}')
    with pytest.raises(ValueError, match=r"00001_stats\.json: img2dataset.s stats"):
        summarise(tmp_path)
    (tmp_path / "00001_stats.json").write_text(json.dumps(good))
    assert summarise(tmp_path)["count"] == 4


def test_no_rows_left_names_the_rules_that_removed_them(tmp_path: Path, caplog) -> None:
    urls = ["http://127.0.0.1/a.jpg", "http://2130706433/b.jpg", "http://10.0.0.1/c.jpg"]
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": urls,
                "TEXT": ["t"] * 3,
                "AESTHETIC_SCORE": [7.0] * 3,
                "punsafe": [0.0] * 3,
                "pwatermark": [0.0] * 3,
            }
        ),
        path,
    )
    (tmp_path / "c.yaml").write_text(
        json.dumps({"run_dir": str(tmp_path / "run"), "download": {"metadata": [str(path)]}})
    )
    assert main(["download", str(tmp_path / "c.yaml")]) == 2
    text = caplog.text
    assert "no rows left after the pre-filter: of 3 metadata rows" in text
    assert "loopback_host removed 2" in text and "download.allow_loopback" in text
    assert "private_host removed 1" in text and "download.allow_private_networks" in text
    assert "min_aesthetic_score" not in text  # the aesthetic rule removed nothing
    assert not (tmp_path / "run" / "images").exists()
