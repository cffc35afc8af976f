"""The dataset's numbers: ``dataset/stats.json``, which the card and the report are made from.

Everything here is read back from the stages' ledgers and outputs on disk, so the numbers say
what was actually written: counts at every stage and per rejection reason, per shard, and
caption length statistics of the original alt-text against the synthetic caption, and, for a
demo run, both captions' accuracy against the demo world's ground truth
(:mod:`recaption.caption_accuracy`). Rendering them is :mod:`recaption.dataset_card`
(``README.md``) and :mod:`recaption.report` (HTML).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recaption.caption_accuracy import accuracy_table, load_truth, match_truth
from recaption.config import RunConfig
from recaption.ledger import FAILED_SUFFIX, LEDGER_DIR, STATS_SUFFIX, list_shards

__all__ = ["collect_dataset_stats", "word_counts"]

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _summary(values: np.ndarray) -> dict[str, float | int]:
    """count / mean / percentiles of a numeric array (empty-safe)."""
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return {"count": 0}
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {
        "count": int(values.size),
        "mean": round(float(values.mean()), 2),
        "min": round(float(values.min()), 2),
        "p5": round(float(p5), 2),
        "median": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "max": round(float(values.max()), 2),
    }


def word_counts(column: Any) -> np.ndarray:
    """Whitespace-separated word count of each string of a pyarrow column (nulls count 0)."""
    filled = pc.fill_null(column, "")
    return pc.list_value_length(pc.utf8_split_whitespace(filled)).to_numpy(zero_copy_only=False)


def _sum_markers(folder: Path, shards: list[str], keys: list[str]) -> dict[str, Any]:
    totals: dict[str, Any] = {k: 0 for k in keys}
    nested: dict[str, dict[str, int]] = {}
    for shard in shards:
        stats = _read_json(folder / f"{shard}{STATS_SUFFIX}")
        for k in keys:
            totals[k] += int(stats.get(k) or 0)
        for name in ("rejected", "errors", "failed"):
            for reason, n in (stats.get(name) or {}).items():
                bucket = nested.setdefault(name, {})
                bucket[reason] = bucket.get(reason, 0) + int(n)
    totals.update({k: dict(sorted(v.items())) for k, v in nested.items()})
    return totals


def _download_counts(config: RunConfig) -> dict[str, int]:
    """Shards, URLs and successful downloads, summed over img2dataset's ``_stats.json``."""
    images_done = list_shards(config.images_dir, STATS_SUFFIX)
    download = {"shards": len(images_done), "count": 0, "successes": 0}
    for shard in images_done:
        s = _read_json(config.images_dir / f"{shard}{STATS_SUFFIX}")
        download["count"] += int(s.get("count", 0) or 0)
        download["successes"] += int(s.get("successes", s.get("n_ok", 0)) or 0)
    return download


def _caption_counts(config: RunConfig) -> dict[str, Any]:
    """The caption stage's counts, over every shard it finished."""
    caption_done = list_shards(config.captions_dir, STATS_SUFFIX)
    return {
        "shards": len(caption_done),
        **_sum_markers(config.captions_dir, caption_done, ["n_input", "n_ok", "n_failed"]),
    }


def _filter_counts(config: RunConfig, shards: list[str]) -> dict[str, Any]:
    """The filter stage's counts (per reason too) over ``shards``, and its settings."""
    return {
        "shards": len(shards),
        **_sum_markers(
            config.filtered_dir,
            shards,
            ["n_input", "n_kept", "n_rejected", "n_failed", "n_trimmed", "n_boilerplate_rewritten"],
        ),
        "settings": config.filter.fingerprint_dict(),
    }


def _merge_counts(config: RunConfig, shards: list[str]) -> dict[str, Any]:
    """The merge stage's counts over ``shards``."""
    return {
        "shards": len(shards),
        **_sum_markers(
            config.stage_dir("merge"),
            shards,
            ["n_input", "n_ok", "n_rejected", "n_failed", "n_images_without_caption"],
        ),
    }


def _failed_shards(config: RunConfig) -> dict[str, list[str]]:
    """stage -> shards with a failure record, for the stages that have any."""
    failed = {
        stage: list_shards(config.stage_dir(stage) / LEDGER_DIR, FAILED_SUFFIX)
        for stage in ("download", "caption", "filter", "merge")
    }
    return {stage: shards for stage, shards in failed.items() if shards}


def _per_shard(config: RunConfig, shards: list[str]) -> list[dict[str, Any]]:
    """One row per shard: captions in, kept, rejected and errors by reason, merged."""
    merge_dir = config.stage_dir("merge")
    per_shard = []
    for shard in shards:
        f = _read_json(config.filtered_dir / f"{shard}{STATS_SUFFIX}")
        m = _read_json(merge_dir / f"{shard}{STATS_SUFFIX}")
        per_shard.append(
            {
                "shard": shard,
                "captions": f.get("n_input", 0),
                "kept": f.get("n_kept", 0),
                "rejected": f.get("rejected", {}),
                "errors": f.get("errors", {}),
                "merged": m.get("n_ok", 0),
                "merge_failed": m.get("failed", {}),
            }
        )
    return per_shard


def _caption_summary(config: RunConfig, shards: list[str]) -> dict[str, Any]:
    """Caption models, the first prompts and word-count statistics of the dataset's parquet."""
    parquet_files = sorted((config.dataset_dir / "parquet").glob("*.parquet"))
    parquet_files = [p for p in parquet_files if p.stem in set(shards)]
    columns = ["original_text", "synthetic_caption", "caption_model", "prompt"]
    tables = [pq.read_table(p, columns=columns) for p in parquet_files]
    if tables:
        original = np.concatenate([word_counts(t.column("original_text")) for t in tables])
        synthetic = np.concatenate([word_counts(t.column("synthetic_caption")) for t in tables])
        models = sorted({m for t in tables for m in t.column("caption_model").to_pylist() if m})
        prompts = sorted({p for t in tables for p in t.column("prompt").to_pylist() if p})
    else:
        original = synthetic = np.zeros(0, dtype=np.int64)
        models, prompts = [], []
    return {
        "caption_model": models,
        "prompts": prompts[:5],
        "caption_length_words": {
            "original": _summary(original),
            "synthetic": _summary(synthetic),
        },
    }


def _clip_summary(config: RunConfig, shards: list[str]) -> dict[str, Any] | None:
    """CLIP-score statistics of the filtered shards, or ``None`` when none was computed."""
    clip = [
        pq.read_table(
            config.filtered_dir / f"{s}.parquet", columns=["clip_score", "clip_score_original"]
        )
        for s in shards
    ]
    ours = np.concatenate([t.column("clip_score").to_numpy(zero_copy_only=False) for t in clip])
    if not ours.size or np.isnan(ours.astype(np.float64)).all():
        return None
    theirs = np.concatenate(
        [t.column("clip_score_original").to_numpy(zero_copy_only=False) for t in clip]
    )
    return {
        "synthetic": _summary(ours.astype(np.float64)),
        "original": _summary(theirs.astype(np.float64)),
        "model": config.filter.clip_model,
    }


def _caption_accuracy(config: RunConfig, shards: list[str]) -> dict[str, Any] | None:
    """Both captions of the kept samples scored against the demo world's ground truth.

    Only for a demo run whose world has a ``truth.parquet``; ``None`` otherwise, or (with a
    warning) when the truth or a parquet file cannot be read: the numbers never block the
    dataset. Samples whose URL has no truth row are left out and counted.
    """
    truth_path = config.demo_world_dir / "truth.parquet"
    if not config.demo.enabled or not truth_path.exists():
        return None
    try:
        return _score_captions(config, shards, truth_path)
    except (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException) as exc:
        logger.warning("caption accuracy left out: %s: %s", type(exc).__name__, exc)
        return None


def _score_captions(config: RunConfig, shards: list[str], truth_path: Path) -> dict[str, Any]:
    """Score the kept samples' synthetic captions and alt-texts against ``truth_path``."""
    truth = load_truth(truth_path)
    files = [config.dataset_dir / "parquet" / f"{shard}.parquet" for shard in shards]
    synthetic: list[tuple[str | None, dict[str, Any]]] = []
    alt_text: list[tuple[str | None, dict[str, Any]]] = []
    without_truth = 0
    for path in files:
        if not path.exists():
            continue
        rows = pq.read_table(path, columns=["url", "synthetic_caption", "original_text"])
        rows = rows.to_pydict()
        matched = match_truth(rows["url"], truth)
        for attributes, ours, theirs in zip(
            matched, rows["synthetic_caption"], rows["original_text"], strict=True
        ):
            if attributes is None:
                without_truth += 1
                continue
            synthetic.append((ours, attributes))
            alt_text.append((theirs, attributes))
    return {
        "truth": str(truth_path),
        "n": len(synthetic),
        "n_without_truth": without_truth,
        "synthetic": accuracy_table(synthetic),
        "alt_text": accuracy_table(alt_text),
    }


def collect_dataset_stats(config: RunConfig, shards: list[str]) -> dict[str, Any]:
    """Counts at every stage, per shard and per reason, and caption statistics (JSON-able)."""
    stats: dict[str, Any] = {"source": config.merge.source_description, "shards": shards}
    stats["download"] = _download_counts(config)
    stats["caption"] = _caption_counts(config)
    stats["filter"] = _filter_counts(config, shards)
    stats["merge"] = _merge_counts(config, shards)
    stats["failed_shards"] = _failed_shards(config)
    stats["per_shard"] = _per_shard(config, shards)
    stats.update(_caption_summary(config, shards))
    stats["n_samples"] = int(stats["merge"]["n_ok"])
    clip = _clip_summary(config, shards)
    if clip is not None:
        stats["clip_score"] = clip
    accuracy = _caption_accuracy(config, shards)
    if accuracy is not None:
        stats["caption_accuracy"] = accuracy
    return stats
