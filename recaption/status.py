"""Where a run stands: per stage, shards done / failed / pending and samples ok / failed.

The ETA is wall-clock time for the whole run, whatever the number of workers: it divides the
shards left by the stage's recent throughput (shards whose done marker was written in the last
:data:`RECENT_WINDOW_S` seconds, over the time they took), so 64 array tasks finishing a shard
each every 10 minutes give 6.4 shards a minute. ``workers_recent`` is how many workers that
throughput implies (shard-seconds of recent shards / the window: Little's law), and
``worker_seconds_left`` the compute left at one worker (GPU-seconds for caption).

``python -m recaption.status gate STAGE CONFIG`` and ``... give-up STAGE CONFIG`` are the
failure policy of the SLURM jobs (``jobs/stage_step.sh``): see :func:`gate` and
:func:`give_up`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recaption.config import STAGE_NAMES, ConfigError, RunConfig, load_config
from recaption.ledger import STATS_SUFFIX, ShardLedger, list_shards, output_problem

SHARDED_STAGES = ("download", "caption", "filter", "merge")
# Shown after them when the run uses it (train.cache); not part of the SLURM chain's gates.
OPTIONAL_STAGES = ("encode",)
# Shards finished this recently measure the current throughput (a run's pace changes: the
# array throttle, preemption, a second wave of tasks).
RECENT_WINDOW_S = 3600.0
# The output a done shard must still have, per stage (checked like the stages check it).
OUTPUT_SUFFIX = {
    "download": ".tar",
    "caption": ".parquet",
    "filter": ".parquet",
    "merge": ".tar",
    "encode": ".safetensors",
}


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


def _shown_stages(config: RunConfig) -> tuple[str, ...]:
    """The sharded stages of this run, in order (``encode`` only with ``train.cache``)."""
    return SHARDED_STAGES + (OPTIONAL_STAGES if config.train.cache else ())


def collect_status(config: RunConfig) -> dict[str, Any]:
    """A JSON-able report of every stage's progress, read from the ledgers on disk."""
    report: dict[str, Any] = {"run_dir": str(config.run_dir), "stages": {}}
    upstream: list[str] | None = None
    for stage in _shown_stages(config):
        folder = config.stage_dir(stage)
        # The ledger's own reading of its failure records (in ``_ledger/``), errors included.
        failures = ShardLedger(stage, folder, {}).failed_shards()
        failed = sorted(failures)
        done: list[str] = []
        unreadable: dict[str, str] = {}
        ok = bad = 0
        seconds = 0.0
        finished: list[tuple[float, float]] = []  # (marker mtime, shard seconds) of done shards
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
            with contextlib.suppress(OSError):  # removed since it was read: redone later
                finished.append((marker.stat().st_mtime, shard_seconds))
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
            **wall_clock_eta(finished, len(pending)),
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
    report["stages"]["evaluate"] = evaluation_status(config)
    return report


def evaluation_status(config: RunConfig) -> dict[str, Any]:
    """The headline of ``evaluation/evaluation.json`` (``{"written": False}`` before it)."""
    path = config.evaluation_dir / "evaluation.json"
    result = _read_json(path) if path.exists() else {}
    if not result:
        return {"written": False}
    attributes = result.get("attributes") or {}
    status: dict[str, Any] = {
        "written": True,
        "file": str(path),
        "n_prompts": result.get("n_prompts"),
        "n_samples": result.get("n_samples"),
        "mean_clip_score": result.get("mean_clip_score"),
    }
    for attr in ("object_colour", "background_colour"):
        values = attributes.get(attr) if isinstance(attributes, dict) else None
        if isinstance(values, dict):
            status[f"{attr}_accuracy"] = values.get("sample_accuracy")
            status[f"{attr}_judge_accuracy"] = values.get("judge_accuracy")
            status[f"{attr}_chance"] = values.get("chance")
    swaps = result.get("colour_swaps")
    if isinstance(swaps, dict):
        status["colour_swap_rate"] = swaps.get("swap_rate")
    return status


def wall_clock_eta(
    finished: list[tuple[float, float]],
    pending: int,
    now: float | None = None,
    window: float = RECENT_WINDOW_S,
) -> dict[str, Any]:
    """The run's ETA from its recent throughput over all workers.

    ``finished`` holds ``(marker mtime, seconds the shard took)`` of done shards. The
    throughput is the number of shards finished in the last ``window`` seconds over the time
    since the earliest of them started (at most ``window``). ``eta_seconds`` is ``None`` when
    nothing is pending, or when no shard finished recently (no worker seems to be running).
    """
    now = time.time() if now is None else now
    mean = sum(s for _, s in finished) / len(finished) if finished else 0.0
    result: dict[str, Any] = {
        "eta_seconds": None,
        "shards_per_hour": None,
        "workers_recent": 0,
        "worker_seconds_left": round(pending * mean, 1) if finished and pending else None,
    }
    recent = [(t, s) for t, s in finished if now - t <= window]
    if not recent:
        return result
    started = min(t - s for t, s in recent)
    span = max(now - max(started, now - window), mean, 1.0)
    rate = len(recent) / span  # shards per second, all workers together
    busy = sum(min(s, span) for _, s in recent) / span
    result["shards_per_hour"] = round(rate * 3600, 2)
    result["workers_recent"] = max(1, round(busy))
    if pending:
        result["eta_seconds"] = round(pending / rate, 1)
    return result


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
    for stage in [name for name in report["stages"] if name in OUTPUT_SUFFIX]:
        s = report["stages"][stage]
        rate = f"{s['samples_per_second']:.1f}" if s["samples_per_second"] else "-"
        eta = ""
        if s.get("eta_seconds"):
            eta = (
                f"  ETA {_duration(s['eta_seconds'])} (wall clock; ~{s['workers_recent']} "
                f"worker(s), {s['shards_per_hour']:g} shards/h over the last "
                f"{RECENT_WINDOW_S / 3600:g} h)"
            )
        elif s.get("worker_seconds_left"):
            eta = (
                f"  {_duration(s['worker_seconds_left'])} of work left for one worker "
                f"(no shard finished in the last {RECENT_WINDOW_S / 3600:g} h)"
            )
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
    evaluation = report["stages"].get("evaluate") or {}
    lines.append(f"evaluate: {_evaluation_line(evaluation)}")
    return "\n".join(lines)


def _evaluation_line(evaluation: dict[str, Any]) -> str:
    """``mean CLIP score 21.30, object colour accuracy 40.0% (judge 100.0%, chance 14.3%),
    colours swapped 8.3% over 24 samples``."""
    if not evaluation.get("written"):
        return "not written yet"

    def percent(value: Any) -> str:
        return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"

    clip = evaluation.get("mean_clip_score")
    parts = [f"mean CLIP score {clip:.2f}" if isinstance(clip, (int, float)) else "no CLIP score"]
    for attr in ("object_colour", "background_colour"):
        if f"{attr}_accuracy" in evaluation:
            parts.append(
                f"{attr.replace('_', ' ')} accuracy {percent(evaluation[f'{attr}_accuracy'])} "
                f"(judge {percent(evaluation.get(f'{attr}_judge_accuracy'))}, chance "
                f"{percent(evaluation.get(f'{attr}_chance'))})"
            )
    if "colour_swap_rate" in evaluation:
        parts.append(f"colours swapped {percent(evaluation['colour_swap_rate'])}")
    return ", ".join(parts) + f" over {evaluation.get('n_samples')} samples"


def where_to_look(config: RunConfig) -> list[str]:
    """The closing lines of a run: the files a person opens next."""
    candidates = [
        ("dataset card", config.dataset_dir / "README.md"),
        ("report", config.dataset_dir / "report" / "index.html"),
        ("samples grid", config.samples_dir / "grid.png"),
        ("evaluation", config.evaluation_dir / "evaluation.json"),
        ("evaluation grid", config.evaluation_dir / "grid.png"),
        ("trained pipeline", config.koala_dir / "pipeline"),
    ]
    return [f"{label}: {path}" for label, path in candidates if path.exists()]


def _duration(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h``, ``2.1 d``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# -- the failure policy of a chain of jobs ----------------------------------------------------
def _run_shards(report: dict[str, Any], stage: str) -> tuple[int, list[str]]:
    """``(shards done, shards not done)`` of a sharded stage in ``report``."""
    s = report["stages"][stage]
    missing = sorted({*s["failed"], *s["unreadable"]})
    return s["shards_done"], missing


def gate(config: RunConfig, stage: str) -> tuple[bool, list[str]]:
    """May ``stage`` start? ``(ok, messages)``.

    Every sharded stage before ``stage`` must have brought at least ``merge.min_done_fraction``
    of the run's shards (the download's: done, failed and unreadable) through, counting from
    the download. The messages name the stages and shards left out, and what to do.
    """
    if stage not in STAGE_NAMES:
        raise ConfigError(f"unknown stage {stage!r}; stages are: {', '.join(STAGE_NAMES)}")
    report = collect_status(config)
    fraction = config.merge.min_done_fraction
    upstream = [s for s in SHARDED_STAGES if STAGE_NAMES.index(s) < STAGE_NAMES.index(stage)]
    if not upstream:
        return True, []
    downloaded, not_downloaded = _run_shards(report, "download")
    total = downloaded + len(not_downloaded)  # the run's shards
    messages: list[str] = []
    ok = True
    source = config.source or "CONFIG"
    for name in upstream:
        done, missing = _run_shards(report, name)
        share = done / total if total else 0.0
        if share + 1e-12 < fraction:
            ok = False
            messages.append(
                f"{stage}: refusing to start: {name} brought {done} of the run's {total} "
                f"shard(s) through ({share:.1%}), below merge.min_done_fraction = {fraction:g} "
                f"({source}). Shards left out by {name}: {', '.join(missing[:20]) or 'none'}"
                f"{' ...' if len(missing) > 20 else ''}. See `recaption status {source}`; fix "
                f"them and resubmit from {name} (jobs/submit.sh {source} --from {name}), or "
                "lower merge.min_done_fraction to go on without them."
            )
        elif missing:
            messages.append(
                f"{stage}: going on without {len(missing)} {name} shard(s) that failed "
                f"({', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}): {done} of "
                f"{total} ({share:.1%}) came through, merge.min_done_fraction = {fraction:g}; "
                "they are listed by `recaption status` and in the dataset card"
            )
    return ok, messages


def give_up(config: RunConfig, stage: str) -> tuple[bool, list[str]]:
    """A job of ``stage`` failed shards and has no retry left: may the chain go on?

    ``(True, messages)`` when ``merge.min_done_fraction`` is below 1 (the next stage's
    :func:`gate` decides on the final counts); ``(False, messages)`` when every shard must
    come through, so the chain stops here.
    """
    fraction = config.merge.min_done_fraction
    source = config.source or "CONFIG"
    failed: list[str] = []
    if stage in SHARDED_STAGES:
        failed = _run_shards(collect_status(config), stage)[1]
    shards = f"{stage} shard(s) {', '.join(failed[:20]) or '(none recorded)'}"
    if stage in SHARDED_STAGES and fraction < 1:
        return True, [
            f"giving up on {shards}: the chain goes on without them if the next stage finds "
            f"at least merge.min_done_fraction = {fraction:g} of the run's shards done"
        ]
    why = (
        "merge.min_done_fraction is 1 (every shard must come through)"
        if stage in SHARDED_STAGES
        else f"{stage} has no shards to leave out"
    )
    return False, [
        f"{stage} still fails after its retries ({shards}); the chain stops here because "
        f"{why}. Fix the cause (`recaption status {source}`, the log above) and resubmit: "
        f"jobs/submit.sh {source} --from {stage}"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recaption.status {gate,give-up} STAGE CONFIG [KEY=VALUE ...]``.

    Exit status: 0 go on, 1 stop (give-up), 2 refuse to start (gate) or a config error.
    """
    parser = argparse.ArgumentParser(prog="python -m recaption.status")
    parser.add_argument("action", choices=["gate", "give-up"])
    parser.add_argument("stage", choices=list(STAGE_NAMES))
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    check = gate if args.action == "gate" else give_up
    ok, messages = check(config, args.stage)
    for line in messages:
        sys.stderr.write(f"{line}\n")
    if ok:
        return 0
    return 2 if args.action == "gate" else 1


if __name__ == "__main__":
    sys.exit(main())
