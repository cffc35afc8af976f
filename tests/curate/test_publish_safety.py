"""A tampered MANIFEST.sha256 can make neither ``verify`` read nor ``publish`` upload a file
outside ``dataset/``: absolute entries, ``..`` entries and symlinks out of the folder are
refused, by name. Nothing here reaches the network: the Hub client is replaced by a stand-in
that fails the test if it is ever created.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from recaption import publish
from recaption.config import load_config
from recaption.publish import (
    MANIFEST,
    publish_dataset,
    unsafe_entry,
    verify_dataset,
    write_manifest,
)


@pytest.fixture
def dataset(tmp_path, curate, monkeypatch):
    """A small finished dataset/ with its manifest, a secret file beside the run, no Hub."""
    import huggingface_hub

    run_dir = tmp_path / "run"
    config = load_config(curate.write_config(run_dir))
    ds = config.dataset_dir
    (ds / "parquet").mkdir(parents=True)
    (ds / "README.md").write_text("---\npretty_name: x\n---\n# x\n")
    (ds / "parquet" / "00000.parquet").write_bytes(b"PAR1 not really PAR1")
    (ds / "a..b.txt").write_text("a name with two dots is a name")
    write_manifest(ds)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for publishing")

    class NoHub:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the Hub client must not be created")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    return config, secret


def _add_entry(config, rel: str, data: bytes) -> None:
    manifest = config.dataset_dir / MANIFEST
    line = f"{hashlib.sha256(data).hexdigest()}  {rel}\n"
    manifest.write_text(manifest.read_text() + line)


def test_a_clean_dataset_verifies_and_publishes_dry(dataset):
    config, _ = dataset
    assert verify_dataset(config) == []
    publish_dataset(config, "org/name", dry_run=True)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("../../secret.txt", "contains '..'"),
        ("parquet/../../../secret.txt", "contains '..'"),
        ("../../../../etc/hostname", "contains '..'"),
        ("ABSOLUTE", "is an absolute path"),
        ("C:\\Windows\\win.ini", "is an absolute path"),
    ],
)
def test_entries_outside_the_dataset_are_refused(dataset, monkeypatch, entry, why):
    config, secret = dataset
    if entry == "ABSOLUTE":
        entry = str(secret)
    _add_entry(config, entry, secret.read_bytes())
    read = []
    real_sha = publish.sha256_file
    monkeypatch.setattr(publish, "sha256_file", lambda p, *a: read.append(p) or real_sha(p, *a))

    problems = verify_dataset(config)
    assert len(problems) == 1 and repr(entry) in problems[0] and why in problems[0], problems
    assert all(os.path.realpath(p) != str(secret) for p in read)  # never even read

    with pytest.raises(RuntimeError, match="not publishing") as info:
        publish_dataset(config, "org/name", dry_run=True)
    assert repr(entry) in str(info.value)


def test_a_symlink_out_of_the_dataset_is_refused(dataset, caplog):
    config, secret = dataset
    (config.dataset_dir / "parquet" / "leak.parquet").symlink_to(secret)
    write_manifest(config.dataset_dir)  # as a rerun of merge would list it
    assert "parquet/leak.parquet" in (config.dataset_dir / MANIFEST).read_text()

    problems = verify_dataset(config)
    assert len(problems) == 1
    assert "'parquet/leak.parquet'" in problems[0] and "resolves outside" in problems[0]
    caplog.set_level("INFO", logger="recaption.publish")
    with pytest.raises(RuntimeError, match=r"parquet/leak\.parquet"):
        publish_dataset(config, "org/name", dry_run=True)
    assert "would upload" not in caplog.text


def test_a_symlinked_manifest_is_not_read(dataset):
    config, secret = dataset
    manifest = config.dataset_dir / MANIFEST
    secret.write_text(manifest.read_text())
    manifest.unlink()
    manifest.symlink_to(secret)
    problems = verify_dataset(config)
    assert len(problems) == 1 and "resolves outside" in problems[0]
    with pytest.raises(RuntimeError, match="MANIFEST"):
        publish_dataset(config, "org/name", dry_run=True)


def test_unsafe_entry_rules(tmp_path):
    root = tmp_path / "dataset"
    (root / "sub").mkdir(parents=True)
    (root / "inner").symlink_to(root / "sub")  # a symlink that stays inside is fine
    for ok in ("README.md", "sub/x.tar", "inner/x.tar", "a..b", "./README.md"):
        assert unsafe_entry(root, ok) is None, ok
    for bad in ("", "/etc/passwd", "\\\\server\\share\\x", "sub/../../x", "..", "a\nb", "D:x"):
        assert unsafe_entry(root, bad) is not None, bad
