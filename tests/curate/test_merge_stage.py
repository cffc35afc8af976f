"""The merge stage: tars and parquet a trainer and a publisher read, card, report, manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from recaption.cli import main
from recaption.config import load_config
from recaption.publish import verify_dataset
from recaption.stages import StageContext
from recaption.stages import run as run_stage

TRAINER_FIELDS = {
    "url",
    "original_text",
    "synthetic_caption",
    "caption_model",
    "prompt",
    "width",
    "height",
    "aesthetic_score",
}


def _source_images(config, shard):
    with tarfile.open(config.images_dir / f"{shard}.tar") as tar:
        return {
            m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")
        }


def _filter_and_merge(config):
    assert run_stage("filter", StageContext(config)).ok
    return run_stage("merge", StageContext(config))


def test_outputs_are_readable_by_webdataset_and_datasets(run_inputs):
    config, shards = run_inputs
    summary = _filter_and_merge(config)
    assert summary.ok, summary.describe()
    wds_dir = config.dataset_dir / "webdataset"
    for shard in shards:
        rows = pq.read_table(config.dataset_dir / "parquet" / f"{shard}.parquet").to_pylist()
        filtered = pq.read_table(config.filtered_dir / f"{shard}.parquet").to_pylist()
        kept = {r["key"]: r["caption_clean"] for r in filtered if r["keep"]}
        samples = list(wds.WebDataset(str(wds_dir / f"{shard}.tar"), shardshuffle=False))
        assert len(samples) == len(rows) == len(kept) > 0
        source = _source_images(config, shard)
        for sample, row in zip(samples, rows, strict=True):
            key = sample["__key__"]
            assert key == row["key"] and key in kept
            assert sample["jpg"] == source[key]  # original bytes, never re-encoded
            assert row["image_sha256"] == hashlib.sha256(source[key]).hexdigest()
            assert sample["txt"].decode() == kept[key] == row["synthetic_caption"]
            meta = json.loads(sample["json"])
            assert set(meta) >= TRAINER_FIELDS
            assert meta["original_text"] == f"alt text of {key}"
            assert meta["aesthetic_score"] == 6.5 and meta["width"] == 40
        marker = json.loads((wds_dir / f"{shard}_stats.json").read_text())
        assert marker["n_input"] == marker["n_ok"] + marker["n_rejected"] + marker["n_failed"]
        assert marker["n_input"] == len(shards[shard])

    import datasets

    ds = datasets.load_dataset(
        "parquet", data_dir=str(config.dataset_dir / "parquet"), split="train"
    )
    assert ds.num_rows == sum(
        json.loads((wds_dir / f"{s}_stats.json").read_text())["n_ok"] for s in shards
    )
    assert {"url", "synthetic_caption", "original_text", "image_sha256"} <= set(ds.column_names)

    # Every sample of the decoded pipeline a trainer would use.
    pairs = list(
        wds.WebDataset([str(p) for p in sorted(wds_dir.glob("*.tar"))], shardshuffle=False)
        .decode("pil")
        .to_tuple("jpg", "txt")
    )
    assert len(pairs) == ds.num_rows and pairs[0][0].size == (40, 32)


def test_card_stats_report_and_manifest(run_inputs):
    config, shards = run_inputs
    _filter_and_merge(config)
    ds_dir = config.dataset_dir
    stats = json.loads((ds_dir / "stats.json").read_text())
    f = stats["filter"]
    n_captions = sum(len(s) for s in shards.values())
    assert f["n_input"] == n_captions == f["n_kept"] + f["n_rejected"] + f["n_failed"]
    assert f["rejected"]["duplicate"] == 5 and f["errors"] == {"caption_error": 1}
    assert stats["merge"]["n_ok"] == stats["n_samples"] == f["n_kept"]
    for row in stats["per_shard"]:
        assert row["captions"] == row["kept"] + sum(row["rejected"].values()) + sum(
            row["errors"].values()
        )
    lengths = stats["caption_length_words"]
    assert lengths["original"]["count"] == lengths["synthetic"]["count"] == stats["n_samples"]
    assert lengths["synthetic"]["mean"] > lengths["original"]["mean"]

    card = (ds_dir / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["configs"][0]["data_files"][0]["path"] == "parquet/*.parquet"
    assert meta["license"] == "other"
    assert meta["dataset_info"]["splits"][0]["num_examples"] == stats["n_samples"]
    assert "llava-hf/llava-1.5-7b-hf" in card and "Describe this image in detail" in card
    assert "| duplicate | 5 |" in card and "| filter | 2 |" in card

    report = ds_dir / "report"
    for name in ("caption_lengths.png", "rejections.png"):
        assert (report / name).stat().st_size > 1000
    html = (report / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and 'class="bad"' not in html
    assert html.count("data:image/jpeg;base64,") == 12  # example thumbnails, captions as text
    assert "<td>00001</td>" in html

    manifest = (ds_dir / "MANIFEST.sha256").read_text()
    assert "webdataset/00000.tar" in manifest and "README.md" in manifest
    assert "_stats.json" not in manifest and "_ledger" not in manifest
    assert verify_dataset(config) == []

    # One flipped byte in a tar: verify names the file, the CLI exits 1.
    tar_path = ds_dir / "webdataset" / "00001.tar"
    data = bytearray(tar_path.read_bytes())
    data[700] ^= 0xFF
    tar_path.write_bytes(bytes(data))
    problems = verify_dataset(config)
    assert len(problems) == 1 and "00001.tar" in problems[0] and "checksum mismatch" in problems[0]
    assert main(["verify", str(config.source)]) == 1
    (ds_dir / "extra.txt").write_text("x")
    assert any("extra.txt: not listed" in p for p in verify_dataset(config))


def test_embedded_images_load_as_images(run_inputs, curate):
    config, _ = run_inputs
    config = load_config(
        curate.write_config(config.run_dir, merge={"embed_images_in_parquet": True})
    )
    assert _filter_and_merge(config).ok
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_dir=str(config.dataset_dir / "parquet"), split="train"
    )
    first = ds[0]
    source = _source_images(config, first["key"][:5])
    assert first["image"].size == (40, 32)
    assert hashlib.sha256(source[first["key"]]).hexdigest() == first["image_sha256"]


def test_mismatched_keys_and_missing_image_shard(tmp_path, curate, caplog):
    run_dir = tmp_path / "run"
    good = [curate.sample(f"k{i}", curate.GOOD[i] + f" Number {i}.") for i in range(4)]
    # kept caption whose image is absent from the tar; image with no caption row
    samples = [*good, curate.sample("noimage", curate.GOOD[4], image=False)]
    samples.append(curate.sample("nocaption", curate.GOOD[5], in_captions=False))
    curate.write_shard(run_dir, "00000", samples)
    curate.write_shard(run_dir, "00001", good[:2])
    config = load_config(curate.write_config(run_dir))
    assert run_stage("filter", StageContext(config)).ok
    (config.images_dir / "00001.tar").unlink()
    summary = run_stage("merge", StageContext(config))
    assert list(summary.shards_failed) == ["00001"]
    assert "00001.tar is gone" in summary.shards_failed["00001"]
    stats = json.loads((config.dataset_dir / "webdataset" / "00000_stats.json").read_text())
    assert stats["n_input"] == 5 and stats["n_ok"] == 4
    assert stats["failed"] == {"missing_image": 1} and stats["n_images_without_caption"] == 1
    assert "no image in" in caplog.text
    # The dataset is incomplete: no card, no manifest, and the summary says why.
    assert not (config.dataset_dir / "README.md").exists()
    assert any("not written yet" in m for m in summary.messages)


def test_publish_dry_run_lists_files_and_card_without_the_token(run_inputs, monkeypatch, caplog):
    config, _ = run_inputs
    _filter_and_merge(config)
    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    caplog.set_level(logging.INFO)
    code = main(["publish", str(config.source), "--repo-id", "org/name", "--dry-run"])
    assert code == 0
    assert "webdataset/00000.tar" in caplog.text and "parquet/00001.parquet" in caplog.text
    assert "pretty_name: recaption dataset" in caplog.text
    assert "hf_secretTOKEN123" not in caplog.text
    assert main(["publish", str(config.source), "--repo-id", "no-slash", "--dry-run"]) == 2


def test_long_and_non_ascii_keys_keep_their_names_and_bytes(tmp_path, curate):
    """Keys past ustar's 100-byte name field, and non-ASCII keys, survive the merge intact."""
    run_dir = tmp_path / "run"
    keys = ["k1", "ключ", "x" * 150]
    samples = [curate.sample(k, curate.GOOD[i] + f" Number {i}.") for i, k in enumerate(keys)]
    curate.write_shard(run_dir, "00000", samples)
    config = load_config(curate.write_config(run_dir))
    assert _filter_and_merge(config).ok
    source = _source_images(config, "00000")
    out = config.dataset_dir / "webdataset" / "00000.tar"
    with tarfile.open(out) as tar:
        names = [m.name for m in tar]
        jpgs = {m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    # Samples in key order (the metadata's order), members in jpg, txt, json order.
    assert names == [f"{k}.{ext}" for k in sorted(keys) for ext in ("jpg", "txt", "json")]
    assert jpgs == source
    samples = list(wds.WebDataset(str(out), shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(keys)
    assert all(s["jpg"] == source[s["__key__"]] for s in samples)


def test_merged_order_does_not_depend_on_the_download_order(tmp_path, curate):
    """img2dataset writes samples as its threads finish; the merged shard is sorted by key."""
    keys = [f"00000{i:04d}" for i in range(6)]
    samples = [
        curate.sample(
            k, curate.GOOD[i % len(curate.GOOD)] + f" Number {i}.", image=curate.jpeg_bytes(i)
        )
        for i, k in enumerate(keys)
    ]
    by_key = dict(zip(keys, samples, strict=True))
    outputs = []
    for name, order in (("a", keys), ("b", keys[::-1])):
        run_dir = tmp_path / name
        curate.write_shard(run_dir, "00000", [by_key[k] for k in order])
        config = load_config(curate.write_config(run_dir))
        assert _filter_and_merge(config).ok
        with tarfile.open(config.dataset_dir / "webdataset" / "00000.tar") as tar:
            outputs.append(
                [(m.name, tar.extractfile(m).read()) for m in tar if not m.name.endswith(".json")]
            )
    assert [name for name, _ in outputs[0]][::2] == [f"{k}.jpg" for k in keys]
    assert outputs[0] == outputs[1]


def test_two_ranks_the_last_one_to_finish_writes_the_card(run_inputs):
    config, _ = run_inputs
    assert run_stage("filter", StageContext(config)).ok
    first = run_stage("merge", StageContext(config, rank=0, world_size=2))
    assert first.shards_ok == ["00000"]
    assert not (config.dataset_dir / "README.md").exists()
    assert any("not written yet" in m for m in first.messages)
    last = run_stage("merge", StageContext(config, rank=1, world_size=2))
    assert last.shards_ok == ["00001"]
    assert (config.dataset_dir / "README.md").exists()
    assert verify_dataset(config) == []
    stats = json.loads((config.dataset_dir / "stats.json").read_text())
    assert [row["shard"] for row in stats["per_shard"]] == ["00000", "00001"]


def test_publish_uploads_exactly_the_manifest_files(run_inputs, monkeypatch):
    """The hub is unreachable here: a recording stand-in for HfApi checks what would be sent."""
    import huggingface_hub

    from recaption.publish import dataset_files, publish_dataset

    config, _ = run_inputs
    _filter_and_merge(config)
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    publish_dataset(config, "org/name", private=True, include_images=True)
    (create, repo, create_kw), (upload, _, upload_kw) = calls
    assert (create, repo, create_kw["repo_type"], create_kw["private"]) == (
        "create_repo",
        "org/name",
        "dataset",
        True,
    )
    assert upload == "upload_folder" and upload_kw["repo_type"] == "dataset"
    sent = set(upload_kw["allow_patterns"])
    assert sent == {"MANIFEST.sha256", *dataset_files(config.dataset_dir)}
    assert not any("_stats.json" in p or "_ledger" in p for p in sent)
    # A dataset that no longer matches its manifest is not published.
    (config.dataset_dir / "README.md").write_text("edited")
    calls.clear()
    with pytest.raises(RuntimeError, match=r"README\.md"):
        publish_dataset(config, "org/name")
    assert calls == []


def test_a_shard_gone_upstream_leaves_the_dataset_card_manifest_and_training_set(run_inputs):
    config, shards = run_inputs
    shards = sorted(shards)
    assert _filter_and_merge(config).ok
    gone = shards[-1]
    # The shard disappears upstream (say, the download was redone with larger shards).
    for path in (
        config.captions_dir / f"{gone}.parquet",
        config.captions_dir / f"{gone}_stats.json",
    ):
        path.unlink()
    assert _filter_and_merge(config).ok
    dataset = config.dataset_dir
    assert not (config.filtered_dir / f"{gone}.parquet").exists()
    assert not (dataset / "webdataset" / f"{gone}.tar").exists()
    assert not (dataset / "parquet" / f"{gone}.parquet").exists()
    manifest = (dataset / "MANIFEST.sha256").read_text()
    assert gone not in manifest and verify_dataset(config) == []
    stats = json.loads((dataset / "stats.json").read_text())
    rows = sum(pq.read_metadata(p).num_rows for p in (dataset / "parquet").glob("*.parquet"))
    tars = list((dataset / "webdataset").glob("*.tar"))
    samples = sum(1 for tar in tars for _ in wds.WebDataset(str(tar), shardshuffle=False))
    assert stats["n_samples"] == rows == samples
    assert stats["shards"] == [s for s in shards if s != gone]
