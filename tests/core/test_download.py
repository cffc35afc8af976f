"""The download stage against the demo world on a real loopback HTTP server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaption.cli import main
from recaption.config import load_config
from recaption.demo.world import generate_world
from recaption.ledger import STATS_SUFFIX, list_shards


def _tar_keys(images: Path) -> list[str]:
    keys = []
    for tar in sorted(images.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += [m.name.rsplit(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".jpg")]
    return keys


def _rows(images: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(images.glob("[0-9]*.parquet")))


def test_demo_download_records_every_sample(small_config: Path) -> None:
    assert main(["download", str(small_config)]) == 0
    config = load_config(small_config)
    images = config.images_dir
    # 60 rows, all pass the lenient pre-filter, 20 per shard.
    assert list_shards(images, STATS_SUFFIX) == ["00000", "00001", "00002"]
    rows = _rows(images)
    assert rows.num_rows == 60
    assert len(set(rows["key"].to_pylist())) == 60
    ok = [
        k
        for k, s in zip(rows["key"].to_pylist(), rows["status"].to_pylist(), strict=True)
        if s == "success"
    ]
    assert sorted(_tar_keys(images)) == sorted(ok)
    # Every bad URL the world planted is attempted and recorded with its reason.
    truth = pq.read_table(config.demo_world_dir / "truth.parquet").to_pylist()
    planted = {t["URL"].split("/", 3)[-1]: t["kind"] for t in truth if t["kind"] != "files"}
    assert set(planted.values()) == {"missing", "notimage", "truncated", "hang", "noai"}
    errors = {
        url.split("/", 3)[-1]: err
        for url, err, status in zip(
            rows["url"].to_pylist(),
            rows["error_message"].to_pylist(),
            rows["status"].to_pylist(),
            strict=True,
        )
        if status != "success"
    }
    assert set(errors) == set(planted)
    expected = {
        "missing": "404",
        "notimage": "decod",
        "truncated": "decod",
        "hang": "timed out",
        "noai": "X-Robots-Tag",
    }
    for path, kind in planted.items():
        assert expected[kind].lower() in errors[path].lower(), (kind, errors[path])
    report = json.loads((images / "_ledger" / "download_report.json").read_text())
    assert report["download"]["successes"] == 55
    assert report["prefilter"]["input_rows"] == 60


def test_prefilter_counts_each_rule(tmp_path: Path, make_config) -> None:
    config_path = make_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        demo={"n_images": 200, "seed": 1},
        download={"samples_per_shard": 200, "processes": 1},
    )
    config = load_config(config_path)
    world = generate_world(config.demo_world_dir, 200, 1)
    from recaption.metadata import prefilter, read_metadata, required_columns

    table = read_metadata(
        [world.metadata], list(required_columns(config.download)), required_columns(config.download)
    )
    kept, report = prefilter(table, config.download)
    scores = table["AESTHETIC_SCORE"].to_pylist()
    assert report.removed["aesthetic_score"] == sum(s < 6.0 for s in scores)
    assert 20 < report.removed["aesthetic_score"] < 180
    assert report.kept == kept.num_rows == 200 - sum(report.removed.values())
    assert min(kept["AESTHETIC_SCORE"].to_pylist()) >= 6.0


def test_private_hosts_and_schemes_are_refused(tmp_path: Path) -> None:
    from recaption.config import DownloadConfig
    from recaption.metadata import prefilter

    urls = [
        "http://example.com/a.jpg",
        "https://10.1.2.3/b.jpg",
        "http://127.0.0.1:8000/c.jpg",
        "http://[::1]/d.jpg",
        "ftp://example.com/e.jpg",
        "http://169.254.1.1/f.jpg",
        "HTTPS://cdn.example.org/g.png",
        "data:image/png;base64,xx",
        None,
    ]
    table = pa.table({"URL": urls, "TEXT": ["t"] * len(urls)})
    cfg = DownloadConfig(min_aesthetic_score=None, max_punsafe=None, max_pwatermark=None)
    kept, report = prefilter(table, cfg)
    assert kept["URL"].to_pylist() == ["http://example.com/a.jpg", "HTTPS://cdn.example.org/g.png"]
    assert report.removed == {
        "url_missing": 1,
        "url_scheme": 2,
        "loopback_host": 2,
        "private_host": 2,
    }
    kept, report = prefilter(table, cfg.model_copy(update={"allow_loopback": True}))
    assert kept.num_rows == 4 and "loopback_host" not in report.removed
    assert report.removed["private_host"] == 2
    kept, report = prefilter(
        table, cfg.model_copy(update={"allow_loopback": True, "allow_private_networks": True})
    )
    assert kept.num_rows == 6 and "private_host" not in report.removed


def test_resume_after_sigkill_has_every_sample_once(
    tmp_path: Path, make_config, lenient_download: dict
) -> None:
    config_path = make_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        demo={"n_images": 90, "seed": 5},
        download={**lenient_download, "samples_per_shard": 10, "threads": 2},
    )
    images = tmp_path / "run" / "images"
    cmd = [sys.executable, "-m", "recaption", "download", str(config_path)]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list_shards(images, STATS_SUFFIX):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process tree, img2dataset workers included
    proc.wait()
    done_at_kill = list_shards(images, STATS_SUFFIX)
    assert 0 < len(done_at_kill) < 9, "the kill must land mid-run for this test to mean anything"
    assert main(["download", str(config_path)]) == 0
    rows = _rows(images)
    keys = rows["key"].to_pylist()
    assert len(keys) == 90 and len(set(keys)) == 90
    tar_keys = _tar_keys(images)
    assert len(tar_keys) == len(set(tar_keys))
    assert Counter(rows["status"].to_pylist())["success"] == len(tar_keys)


def test_changed_option_is_refused_then_overwritten(small_config: Path, caplog) -> None:
    assert main(["download", str(small_config), "download.samples_per_shard=30"]) == 0
    assert (
        main(
            [
                "download",
                str(small_config),
                "download.samples_per_shard=30",
                "download.image_size=64",
            ]
        )
        == 2
    )
    assert "keys that differ: download.image_size." in caplog.text
    assert "--overwrite" in caplog.text
    config = load_config(small_config)
    before = {p: p.stat().st_mtime_ns for p in config.images_dir.glob("0*")}
    assert main(["download", str(small_config), "download.metadata=[/nonexistent.parquet]"]) == 2
    assert {p: p.stat().st_mtime_ns for p in config.images_dir.glob("0*")} == before
    # An operational key (process count) does not block the resume.
    assert (
        main(
            ["download", str(small_config), "download.samples_per_shard=30", "download.processes=2"]
        )
        == 0
    )
    assert (
        main(
            [
                "download",
                str(small_config),
                "download.samples_per_shard=30",
                "download.image_size=64",
                "--overwrite",
            ]
        )
        == 0
    )
    record = json.loads((config.images_dir / "_ledger" / "config.json").read_text())
    assert record["config"]["download"]["image_size"] == 64
    assert list_shards(config.images_dir, STATS_SUFFIX) == ["00000", "00001"]


def _run_with_metadata(tmp_path: Path, metadata: list[str], caplog, **download) -> str:
    from recaption.config import RunConfig

    data = {"run_dir": str(tmp_path / "run"), "download": {"metadata": metadata, **download}}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(json.dumps(data))
    assert RunConfig.model_validate(data)
    caplog.clear()
    assert main(["download", str(config_path)]) == 2
    assert not (tmp_path / "run" / "images" / "00000.tar").exists()
    return caplog.text


def test_bad_metadata_inputs(tmp_path: Path, caplog) -> None:
    text = _run_with_metadata(tmp_path, [str(tmp_path / "nope.parquet")], caplog)
    assert "nope.parquet: metadata file not found" in text
    (tmp_path / "notes.parquet").write_text("this is not parquet")
    text = _run_with_metadata(tmp_path, [str(tmp_path / "notes.parquet")], caplog)
    assert "notes.parquet: not a readable parquet file" in text
    pq.write_table(
        pa.table(
            {
                "URL": pa.array([], pa.string()),
                "TEXT": pa.array([], pa.string()),
                "AESTHETIC_SCORE": pa.array([], pa.float32()),
                "punsafe": pa.array([], pa.float32()),
                "pwatermark": pa.array([], pa.float32()),
            }
        ),
        tmp_path / "empty.parquet",
    )
    text = _run_with_metadata(tmp_path, [str(tmp_path / "empty.parquet")], caplog)
    assert "metadata has no rows" in text
    pq.write_table(pa.table({"url": ["http://x/y.jpg"], "TEXT": ["t"]}), tmp_path / "lc.parquet")
    text = _run_with_metadata(tmp_path, [str(tmp_path / "lc.parquet")], caplog)
    assert "missing column(s) 'URL' (config key download.url_col)" in text
    text = _run_with_metadata(
        tmp_path, [str(tmp_path / "lc.parquet")], caplog, url_col="url", caption_col="caption"
    )
    assert "'caption' (config key download.caption_col)" in text
    (tmp_path / "empty_dir").mkdir()
    text = _run_with_metadata(tmp_path, [str(tmp_path / "empty_dir")], caplog)
    assert "folder has no *.parquet metadata files" in text


def test_unwritable_run_dir(small_config: Path, caplog) -> None:
    assert main(["download", str(small_config), "run_dir=/sys/recaption-run"]) == 2
    assert "choose a run_dir you can write to" in caplog.text


@pytest.mark.parametrize("argv", [["download", "--help"], ["--help"]])
def test_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "KEY=VALUE" in out or "download" in out


def test_demo_world_is_the_same_on_every_run(tmp_path: Path) -> None:
    a = generate_world(tmp_path / "a", 40, 7)
    b = generate_world(tmp_path / "b", 40, 7)
    names = sorted(p.name for p in a.files.iterdir())
    assert names == sorted(p.name for p in b.files.iterdir())
    assert all((a.files / n).read_bytes() == (b.files / n).read_bytes() for n in names)
    assert pq.read_table(a.metadata).equals(pq.read_table(b.metadata))
