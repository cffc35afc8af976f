"""Where a run stands: per stage, shards done / failed / pending and samples ok / failed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from recaption.config import RunConfig
from recaption.ledger import FAILED_SUFFIX, LEDGER_DIR, STATS_SUFFIX, list_shards

SHARDED_STAGES = ("download", "caption", "filter", "merge")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _sample_counts(stats: dict[str, Any]) -> tuple[int, int]:
    if "n_ok" in stats:
        return int(stats.get("n_ok", 0)), int(stats.get("n_failed", 0))
    # img2dataset's own _stats.json
    ok = int(stats.get("successes", 0))
    return ok, int(stats.get("count", ok)) - ok


def collect_status(config: RunConfig) -> dict[str, Any]:
    """A JSON-able report of every stage's progress, read from the ledgers on disk."""
    report: dict[str, Any] = {"run_dir": str(config.run_dir), "stages": {}}
    upstream: list[str] | None = None
    for stage in SHARDED_STAGES:
        folder = config.stage_dir(stage)
        done = list_shards(folder, STATS_SUFFIX)
        failed = list_shards(folder / LEDGER_DIR, FAILED_SUFFIX)
        ok = bad = 0
        seconds = 0.0
        rejections: Counter[str] = Counter()
        for shard in done:
            stats = _read_json(folder / f"{shard}{STATS_SUFFIX}")
            n_ok, n_bad = _sample_counts(stats)
            ok, bad = ok + n_ok, bad + n_bad
            seconds += float(stats.get("seconds", stats.get("duration", 0.0)) or 0.0)
            rejections.update(stats.get("rejected", {}))
        inputs = (
            sorted(set(upstream or []) | set(done) | set(failed))
            if upstream is not None
            else sorted(set(done) | set(failed))
        )
        pending = [s for s in inputs if s not in set(done)]
        report["stages"][stage] = {
            "shards_done": len(done),
            "shards_failed": len(failed),
            "shards_pending": len(pending),
            "failed": {
                s: _read_json(folder / f"{s}{FAILED_SUFFIX}").get("error", "") for s in failed
            },
            "samples_ok": ok,
            "samples_failed": bad,
            "rejections": dict(rejections.most_common()),
            "seconds": round(seconds, 2),
            "samples_per_second": round((ok + bad) / seconds, 2) if seconds else None,
            # Shard-seconds left at the pace of the finished shards, for one worker.
            "eta_seconds": round(len(pending) * seconds / len(done), 1)
            if done and pending and seconds
            else None,
        }
        upstream = done
    train_state = config.koala_dir / "train_state.json"
    report["stages"]["train"] = _read_json(train_state) if train_state.exists() else {}
    report["stages"]["train"]["pipeline_ready"] = (
        config.koala_dir / "pipeline" / "model_index.json"
    ).exists()
    report["stages"]["sample"] = {
        "grid": (config.samples_dir / "grid.png").exists(),
        "samples_parquet": (config.samples_dir / "samples.parquet").exists(),
    }
    return report


def format_status(report: dict[str, Any]) -> str:
    """The report as a small table for people."""
    lines = [
        f"run_dir: {report['run_dir']}",
        f"{'stage':<10}{'done':>6}{'failed':>8}{'pending':>9}{'ok':>9}{'failed':>9}"
        f"{'samples/s':>11}",
    ]
    for stage in SHARDED_STAGES:
        s = report["stages"][stage]
        rate = f"{s['samples_per_second']:.1f}" if s["samples_per_second"] else "-"
        eta = f"  ETA {s['eta_seconds'] / 60:.1f} min/worker" if s["eta_seconds"] else ""
        lines.append(
            f"{stage:<10}{s['shards_done']:>6}{s['shards_failed']:>8}"
            f"{s['shards_pending']:>9}{s['samples_ok']:>9}{s['samples_failed']:>9}"
            f"{rate:>11}{eta}"
        )
        if s["rejections"]:
            reasons = ", ".join(f"{k} {v}" for k, v in s["rejections"].items())
            lines.append(f"    rejected by rule: {reasons}")
        for shard, error in s["failed"].items():
            lines.append(f"    failed {stage} shard {shard}: {error}")
    train = report["stages"]["train"]
    lines.append(
        f"train: step {train.get('step', 0)}"
        f"{' / ' + str(train['max_steps']) if 'max_steps' in train else ''}, "
        f"pipeline {'ready' if train.get('pipeline_ready') else 'not written yet'}"
    )
    sample = report["stages"]["sample"]
    lines.append(f"sample: grid {'written' if sample['grid'] else 'not written yet'}")
    return "\n".join(lines)


def where_to_look(config: RunConfig) -> list[str]:
    """The closing lines of a run: the files a person opens next."""
    candidates = [
        ("dataset card", config.dataset_dir / "README.md"),
        ("report", config.dataset_dir / "report" / "index.html"),
        ("samples grid", config.samples_dir / "grid.png"),
        ("trained pipeline", config.koala_dir / "pipeline"),
    ]
    return [f"{label}: {path}" for label, path in candidates if path.exists()]
