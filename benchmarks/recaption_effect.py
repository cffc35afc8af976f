"""The recaptioning effect: KOALA trained on alt-text against KOALA trained on LLaVA captions.

Runs the project's own stages on the demo: download, caption, filter and merge once; then two
arms from that same dataset, the same seeds, steps and teacher, differing only in
``train.synthetic_caption_ratio``: 0 (every sample on its original alt-text; an empty alt-text
trains on the empty prompt) and 1 (every sample on its synthetic caption, as
KOALA-700M-LLaVA-Caption). Each arm is trained, then evaluated by ``recaption evaluate`` on the
same held-out prompts (descriptions of a demo world neither arm saw), and the two arms' figures
are printed side by side with the teacher's and chance level: the judge's main-object and
background colour accuracy of the samples, how often the two colours are drawn swapped (the
object in the background's colour and the background in the object's), and their CLIP score.
The demo's teacher learnt from alt-texts (as SDXL did), so it draws the main object's colour,
which half the alt-texts name, and not the background's, which none does: the background
colour is where the captions can teach the student something the alt-texts and the teacher
cannot. The main object's colour both arms learn, from the alt-texts and from the teacher;
the captions' student, which also learns the background's colour, then draws the two swapped
in about a fifth of its samples (attribute binding, which neither the teacher nor a tiny
student at 8x8 latents does well), and that is where its lead on the object's colour goes.

    python benchmarks/recaption_effect.py [--n-images 400] [--steps 4000] [--n-prompts 64]
        [--guidance 3,5,7.5,10] [--jobs 2] [--work DIR] [KEY=VAL ...]

Each arm is evaluated at every classifier-free guidance scale of ``--guidance``, as
text-to-image models are compared along a guidance sweep: the best guidance of a small
student is not the teacher's (measured on the main object's colour: the captions' arm
drew it best at 5, the alt-text arm at 10 to 12.5, like the teacher), and one fixed scale
favours one arm. The table is printed per scale, then each arm at its own
best scale and the difference, which is the comparison to quote. The teacher (the same in
both arms) is sampled in the captions' arm only.

The two arms train at once, each a process of one thread (``--jobs``, by default one a core,
at most two). 64 held-out prompts, two seeds each: a column's accuracy is then within about
4 points (one standard error) of what more samples would give: the same trained arm read 47%
on the main object's colour from its first 32 prompts and 38% from all 64.

A ``--work`` folder is reused: finished stages are not redone (the driver's markers), so a
second call only prints again. Without it, a temporary folder is used and removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.recaption_effect")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
ARMS = (("alt-text", 0.0), ("synthetic captions", 1.0))
GUIDANCE = (3.0, 5.0, 7.5, 10.0)


def recaption(*args: str) -> None:
    """Run one ``recaption`` command (a separate process, as a user runs it)."""
    cmd = [sys.executable, "-m", "recaption", *args]
    logger.info("$ %s", " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def prepare_dataset(base: Path, n_images: int, extra: list[str]) -> None:
    """Download, caption, filter and merge the demo world once, into ``base``."""
    overrides = [f"run_dir={base}", f"demo.n_images={n_images}", *extra]
    recaption("run", str(CONFIG), *overrides, "--to", "merge")


def evaluate_at(arm_dir: Path, guidance: float, overrides: list[str]) -> dict[str, Any]:
    """``recaption evaluate`` at one guidance scale; its evaluation.json.

    The stage writes ``arm_dir/evaluation``; each scale's folder is kept as
    ``evaluation-g<scale>`` and moved back before the stage runs again, so that the stage's
    own ledger decides whether a scale is redone (a changed setting redoes it)."""
    folder = arm_dir / "evaluation"
    kept = arm_dir / f"evaluation-g{guidance:g}"
    if folder.exists():  # left by an interrupted call: its settings are in its ledger
        shutil.rmtree(folder)
    if kept.exists():
        kept.rename(folder)
    recaption("evaluate", str(CONFIG), *overrides, f"evaluate.guidance_scale={guidance}")
    folder.rename(kept)
    return json.loads((kept / "evaluation.json").read_text())


def run_arm(
    base: Path,
    arm_dir: Path,
    ratio: float,
    n_images: int,
    steps: int,
    n_prompts: int,
    guidance: list[float],
    with_teacher: bool,
    extra: list[str],
) -> dict[float, dict[str, Any]]:
    """Train one arm on a copy of ``base``'s dataset, evaluate it at every guidance scale."""
    if not arm_dir.exists():
        shutil.copytree(base, arm_dir, symlinks=True)
    overrides = [
        *extra,
        f"run_dir={arm_dir}",
        f"demo.n_images={n_images}",
        f"train.synthetic_caption_ratio={ratio}",
        f"train.max_steps={steps}",
        f"train.checkpointing_steps={steps}",
        "evaluate.enabled=true",
        f"evaluate.n_prompts={n_prompts}",
        f"evaluate.with_teacher={str(with_teacher).lower()}",
    ]
    recaption("train", str(CONFIG), *overrides)
    return {scale: evaluate_at(arm_dir, scale, overrides) for scale in guidance}


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):5.1f}%"


def report(results: dict[str, dict[str, Any]], guidance: float) -> str:
    """The two arms side by side at one guidance scale, with the teacher they were distilled
    from (when evaluated), chance level and the judge's own accuracy."""
    first = next(iter(results.values()))
    teacher = next((r["teacher"] for r in results.values() if r.get("teacher")), None)
    columns = dict(results)
    if teacher:
        columns["teacher"] = teacher
    attributes = sorted(first.get("attributes") or {})
    header = f"{f'guidance {guidance:g}':24s}" + "".join(f"{name:>20s}" for name in columns)
    lines = [header + f"{'chance':>9s}{'judge':>9s}"]
    for name in attributes:
        row = f"{name + ' accuracy':24s}"
        for result in columns.values():
            values = result["attributes"][name]
            cell = f"{_pct(values['sample_accuracy'])} ({values['correct']}/{values['n']})"
            row += f"{cell:>20s}"
        values = first["attributes"][name]
        row += f"{_pct(values['chance']):>9s}{_pct(values['judge_accuracy']):>9s}"
        lines.append(row)
    row = f"{'colours swapped':24s}"
    for result in columns.values():
        swaps = result.get("colour_swaps")
        cell = "-" if not swaps else f"{_pct(swaps['swap_rate'])} ({swaps['swapped']}/{swaps['n']})"
        row += f"{cell:>20s}"
    lines.append(row)
    row = f"{'CLIP score (mean)':24s}"
    for result in columns.values():
        score = result.get("mean_clip_score")
        row += f"{'-' if score is None else f'{score:.4f}':>20s}"
    lines.append(row)
    return "\n".join(lines)


def best_report(sweep: dict[str, dict[float, dict[str, Any]]]) -> str:
    """Each arm (and the teacher) at its own best guidance scale, per attribute, and the
    captions' arm minus the alt-text arm."""
    columns: dict[str, dict[float, dict[str, Any]]] = dict(sweep)
    teacher = {
        scale: result["teacher"]
        for by_scale in sweep.values()
        for scale, result in by_scale.items()
        if result.get("teacher")
    }
    if teacher:
        columns["teacher"] = teacher
    first = next(iter(next(iter(sweep.values())).values()))
    attributes = sorted(first.get("attributes") or {})
    header = f"{'best guidance':24s}" + "".join(f"{name:>20s}" for name in columns)
    lines = [header + f"{'captions - alt-text':>22s}"]
    arms = list(sweep)
    for name in attributes:
        row = f"{name + ' accuracy':24s}"
        best: dict[str, float] = {}
        for column, by_scale in columns.items():
            scale, result = max(
                by_scale.items(), key=lambda item: item[1]["attributes"][name]["sample_accuracy"]
            )
            best[column] = result["attributes"][name]["sample_accuracy"]
            row += f"{_pct(best[column]) + f' (at {scale:g})':>20s}"
        if len(arms) == 2:
            row += f"{100 * (best[arms[1]] - best[arms[0]]):+21.1f}"
        lines.append(row)
    lines.append(
        f"{first['n_samples']} samples a column: {first['n_prompts']} held-out prompts x "
        f"{len(first['seeds'])} seeds; judge accuracy measured on held-out world images"
    )
    return "\n".join(lines)


def _scales(text: str) -> list[float]:
    """``--guidance``'s value: comma-separated scales ("3,5,7.5,10")."""
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the guidance scales comma-separated, e.g. 3,5,7.5,10"
        ) from None
    if not scales or min(scales) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive scales")
    return scales


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=400, help="demo world size")
    parser.add_argument("--steps", type=int, default=4000, help="training steps of each arm")
    parser.add_argument(
        "--n-prompts", type=int, default=64, help="held-out prompts (x 2 seeds) an arm"
    )
    parser.add_argument(
        "--guidance",
        type=_scales,
        default=list(GUIDANCE),
        help="classifier-free guidance scales each arm is evaluated at, comma-separated "
        f"(default {','.join(f'{g:g}' for g in GUIDANCE)})",
    )
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(len(ARMS), os.cpu_count() or 1),
        help="arms trained at once, each a process of one thread (default: one a core)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="recaption-effect-"))
    started = time.monotonic()
    try:
        base = work / "base"
        prepare_dataset(base, args.n_images, args.overrides)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {
                arm: pool.submit(
                    run_arm,
                    base,
                    work / arm.split()[0],
                    ratio,
                    args.n_images,
                    args.steps,
                    args.n_prompts,
                    args.guidance,
                    ratio == ARMS[-1][1],  # the teacher is sampled in one arm
                    args.overrides,
                )
                for arm, ratio in ARMS
            }
            sweep = {arm: future.result() for arm, future in futures.items()}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    tables = [
        report({arm: by_scale[scale] for arm, by_scale in sweep.items()}, scale)
        for scale in args.guidance
    ]
    text = "\n\n".join([*tables, best_report(sweep)])
    logger.info("recaptioning effect, %d steps an arm:\n%s", args.steps, text)
    logger.info("total wall time %.0f s", time.monotonic() - started)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
