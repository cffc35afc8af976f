"""Where a run stands: per stage, shards done / failed / pending and samples ok / failed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from recaption.config import RunConfig
from recaption.ledger import STATS_SUFFIX, ShardLedger, list_shards, output_problem

SHARDED_STAGES = ("download", "caption", "filter", "merge")
# The output a done shard must still have, per stage (checked like the stages check it).
OUTPUT_SUFFIX = {"download": ".tar", "caption": ".parquet", "filter": ".parquet", "merge": ".tar"}


class UnreadableMarkerError(ValueError):
    """A done marker that exists but cannot be read as one."""


def _read_marker(path: Path) -> dict[str, Any]:
    """A done marker's JSON object; :class:`UnreadableMarkerError` saying why it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UnreadableMarkerError(f"cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UnreadableMarkerError("not valid JSON (not UTF-8 text)") from exc
    except json.JSONDecodeError as exc:
        raise UnreadableMarkerError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise UnreadableMarkerError(f"not a JSON object (a {type(data).__name__})")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return _read_marker(path)
    except UnreadableMarkerError:
        return {}


def _sample_counts(stats: dict[str, Any]) -> tuple[int, int]:
    try:
        if "n_ok" in stats:
            return int(stats.get("n_ok", 0)), int(stats.get("n_failed", 0))
        # img2dataset's own _stats.json
        ok = int(stats.get("successes", 0))
        return ok, int(stats.get("count", ok)) - ok
    except (TypeError, ValueError) as exc:
        raise UnreadableMarkerError(f"sample counts are not numbers ({exc})") from exc


def collect_status(config: RunConfig) -> dict[str, Any]:
    """A JSON-able report of every stage's progress, read from the ledgers on disk."""
    report: dict[str, Any] = {"run_dir": str(config.run_dir), "stages": {}}
    upstream: list[str] | None = None
    for stage in SHARDED_STAGES:
        folder = config.stage_dir(stage)
        # The ledger's own reading of its failure records (in ``_ledger/``), errors included.
        failures = ShardLedger(stage, folder, {}).failed_shards()
        failed = sorted(failures)
        done: list[str] = []
        unreadable: dict[str, str] = {}
        ok = bad = 0
        seconds = 0.0
        rejections: Counter[str] = Counter()
        for shard in list_shards(folder, STATS_SUFFIX):
            marker = folder / f"{shard}{STATS_SUFFIX}"
            try:
                stats = _read_marker(marker)
                n_ok, n_bad = _sample_counts(stats)
                shard_seconds = float(stats.get("seconds", stats.get("duration", 0.0)) or 0.0)
                shard_rejections = Counter(
                    {str(k): int(v) for k, v in (stats.get("rejected") or {}).items()}
                )
            except (UnreadableMarkerError, AttributeError, TypeError, ValueError) as exc:
                # Counted neither as done nor as zero samples: a person has to look at it.
                unreadable[shard] = f"{_relative(marker, config)}: {exc}"
                continue
            problem = output_problem(folder / f"{shard}{OUTPUT_SUFFIX[stage]}")
            if problem is not None:  # the stage redoes it when it runs next
                unreadable[shard] = f"marked done but {problem}; rerun `recaption {stage}`"
                continue
            done.append(shard)
            ok, bad = ok + n_ok, bad + n_bad
            seconds += shard_seconds
            rejections.update(shard_rejections)
        inputs = sorted(set(upstream or []) | set(done) | set(failed) | set(unreadable))
        pending = [s for s in inputs if s not in set(done)]
        report["stages"][stage] = {
            "shards_done": len(done),
            "shards_failed": len(failed),
            "shards_pending": len(pending),
            "shards_unreadable": len(unreadable),
            "failed": failures,
            "unreadable": unreadable,
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


def _relative(path: Path, config: RunConfig) -> str:
    """``path`` relative to the run directory when it is inside it (``images/00001_stats.json``)."""
    try:
        return str(path.relative_to(config.run_dir))
    except ValueError:
        return str(path)


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
        for shard, problem in s.get("unreadable", {}).items():
            lines.append(f"    unreadable {stage} marker of shard {shard}: {problem}")
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
