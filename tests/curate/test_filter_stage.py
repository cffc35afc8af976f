"""The filter stage on real caption parquets: counts, reasons, duplicates, reruns, ranks."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq

from recaption.cli import main
from recaption.config import load_config
from recaption.schemas import FILTERED_SCHEMA
from recaption.stages import StageContext
from recaption.stages import run as run_stage


def _filtered(config, shard):
    return {
        r["key"]: r for r in pq.read_table(config.filtered_dir / f"{shard}.parquet").to_pylist()
    }


def _marker(config, shard):
    return json.loads((config.filtered_dir / f"{shard}_stats.json").read_text())


def test_counts_reconcile_and_reasons_are_named(run_inputs, curate):
    config, shards = run_inputs
    summary = run_stage("filter", StageContext(config))
    assert summary.ok and sorted(summary.shards_ok) == ["00000", "00001"]
    total_in = total_out = 0
    for shard, samples in shards.items():
        rows = _filtered(config, shard)
        stats = _marker(config, shard)
        assert set(rows) == {s["key"] for s in samples}  # one row per input sample
        assert stats["n_input"] == len(samples)
        assert stats["n_input"] == (
            stats["n_kept"] + sum(stats["rejected"].values()) + sum(stats["errors"].values())
        )
        assert stats["n_kept"] == sum(r["keep"] for r in rows.values())
        for row in rows.values():
            assert row["keep"] == (row["reason"] is None)
        total_in += stats["n_input"]
        total_out += stats["n_kept"] + stats["n_rejected"] + stats["n_failed"]
        assert pq.read_schema(config.filtered_dir / f"{shard}.parquet").remove_metadata() == (
            FILTERED_SCHEMA
        )
    assert total_in == total_out == sum(len(s) for s in shards.values())

    rows = _filtered(config, "00000")
    for j, (_caption, _finish, keep, reason, clean) in enumerate(curate.ADVERSARIAL):
        row = rows[f"adv{j:03d}"]
        assert (row["keep"], row["reason"]) == (keep, reason), row
        if clean is not None:
            assert row["caption_clean"] == clean
    assert rows["err0001"]["reason"] == "caption_error"
    assert _marker(config, "00000")["errors"] == {"caption_error": 1}
    # The same caption on five images over two shards: every copy rejected, counted run-wide.
    dup_rows = [rows[f"dupa{j}"] for j in range(3)] + [
        _filtered(config, "00001")[f"dupb{j}"] for j in range(2)
    ]
    assert all(r["reason"] == "duplicate" and r["caption_copies"] == 5 for r in dup_rows)
    good = rows["000000000"]
    assert good["keep"] and good["n_words"] > 5 and good["language"] == "en"


def test_rerun_after_captions_changed_redoes_dependent_shards(run_inputs, curate, caplog):
    config, shards = run_inputs
    run_stage("filter", StageContext(config))
    before = _marker(config, "00000")
    assert _filtered(config, "00000")["dupa0"]["reason"] == "duplicate"
    # Shard 00001 is recaptioned without the duplicate captions: 3 copies are left, allowed.
    samples = [s for s in shards["00001"] if not s["key"].startswith("dupb")]
    curate.write_caption_shard(config.run_dir, "00001", samples)
    summary = run_stage("filter", StageContext(config))
    assert sorted(summary.shards_ok) == ["00000", "00001"]
    assert "inputs changed" in caplog.text
    assert _filtered(config, "00000")["dupa0"]["keep"]
    assert set(_filtered(config, "00001")) == {s["key"] for s in samples}
    assert _marker(config, "00000")["n_kept"] == before["n_kept"] + 3
    # Nothing changed: nothing is redone.
    assert run_stage("filter", StageContext(config)).shards_ok == []


def test_ranks_split_shards_and_agree_with_one_worker(run_inputs, tmp_path):
    config, _ = run_inputs
    one = [run_stage("filter", StageContext(config, rank=r, world_size=2)) for r in (1, 0)]
    assert sorted(one[0].shards_ok + one[1].shards_ok) == ["00000", "00001"]
    split = {s: _filtered(config, s) for s in ("00000", "00001")}
    shutil.rmtree(config.filtered_dir)
    run_stage("filter", StageContext(config))
    assert split == {s: _filtered(config, s) for s in ("00000", "00001")}


def test_missing_caption_file_fails_only_that_shard(run_inputs):
    config, _ = run_inputs
    (config.captions_dir / "00001.parquet").unlink()
    code = main(["filter", str(config.source)])
    assert code == 1
    failure = json.loads((config.filtered_dir / "_ledger" / "00001_failed.json").read_text())
    assert "00001.parquet" in failure["error"] and "rerun `recaption caption" in failure["error"]
    assert (config.filtered_dir / "00000_stats.json").exists()


def test_startup_errors_touch_nothing(tmp_path, curate, caplog):
    run_dir = tmp_path / "empty"
    code = main(["filter", str(curate.write_config(run_dir))])
    assert code == 2 and "run `recaption caption" in caplog.text
    assert not (run_dir / "filtered").exists()
    cfg = curate.write_config(tmp_path / "r2", filter={"min_clip_score": 20.0})
    curate.write_shard(tmp_path / "r2", "00000", [curate.sample("k1", curate.GOOD[0])])
    assert main(["filter", str(cfg)]) == 2
    assert "need filter.clip_model" in caplog.text


def test_clip_scores_with_tiny_clip_and_run_percentile(run_inputs, tmp_path, curate):
    config, _ = run_inputs
    models = tmp_path / "models"
    cfg = curate.write_config(
        config.run_dir,
        demo={"models_dir": str(models)},
        filter={"clip_model": "demo:tiny-clip", "min_clip_percentile": 50, "clip_batch_size": 4},
    )
    config = load_config(cfg)
    summary = run_stage("filter", StageContext(config))
    assert summary.ok
    assert (models / "tiny-clip" / "model.safetensors").exists()
    rows = {**_filtered(config, "00000"), **_filtered(config, "00001")}
    ok_rows = [r for r in rows.values() if r["reason"] != "caption_error"]
    assert all(
        r["clip_score"] is not None and r["clip_score_original"] is not None for r in ok_rows
    )
    threshold = _marker(config, "00000")["inputs"]["clip_threshold"]
    scores = sorted(r["clip_score"] for r in ok_rows)
    assert scores[0] <= threshold <= scores[-1]
    for row in rows.values():
        if row["reason"] == "clip_score":
            assert row["clip_score"] < threshold
        if row["keep"]:
            assert row["clip_score"] >= threshold
    assert any(r["reason"] == "clip_score" for r in rows.values())
