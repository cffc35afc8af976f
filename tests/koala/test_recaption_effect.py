"""``benchmarks/recaption_effect.py``'s bookkeeping: the guidance sweep and its summary.

The stages it runs are tested on their own (``test_evaluate.py``, ``test_train_sample.py``);
here the script's part: each guidance scale keeps its own evaluation folder, which the
evaluate stage finds again in its place on a rerun (so its ledger decides what is redone),
and the summary compares each arm at its own best scale.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def effect() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "recaption_effect", REPO / "benchmarks" / "recaption_effect.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def evaluation(object_colour: int, background_colour: int, **extra: Any) -> dict[str, Any]:
    """An evaluation.json as the evaluate stage writes it, 128 samples, counts given."""

    def attribute(correct: int, chance: float) -> dict[str, Any]:
        return {
            "correct": correct,
            "n": 128,
            "sample_accuracy": correct / 128,
            "chance": chance,
            "judge_accuracy": 1.0,
        }

    return {
        "attributes": {
            "object_colour": attribute(object_colour, 1 / 7),
            "background_colour": attribute(background_colour, 1 / 8),
        },
        "mean_clip_score": 10.0,
        "n_samples": 128,
        "n_prompts": 64,
        "seeds": [0, 1],
        **extra,
    }


def test_each_scale_keeps_its_folder_and_the_stage_finds_it_again(
    effect: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []

    def fake_recaption(*args: str) -> None:
        scale = next(a.split("=")[1] for a in args if a.startswith("evaluate.guidance_scale="))
        folder = tmp_path / "evaluation"
        calls.append((scale, folder.exists()))
        if not folder.exists():  # the stage's work: only when its folder is not there yet
            folder.mkdir()
            count = round(float(scale) * 10)
            (folder / "evaluation.json").write_text(json.dumps(evaluation(count, count)))

    monkeypatch.setattr(effect, "recaption", fake_recaption)
    first = {g: effect.evaluate_at(tmp_path, g, []) for g in (3.0, 7.5)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation-g3", "evaluation-g7.5"]
    assert first[3.0]["attributes"]["object_colour"]["correct"] == 30
    assert first[7.5]["attributes"]["object_colour"]["correct"] == 75
    # A rerun: each scale's folder is back in place when the stage runs, and kept again.
    again = {g: effect.evaluate_at(tmp_path, g, []) for g in (3.0, 7.5)}
    assert again == first
    assert calls == [("3.0", False), ("7.5", False), ("3.0", True), ("7.5", True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation-g3", "evaluation-g7.5"]


def test_an_interrupted_evaluation_folder_is_not_taken_for_another_scale(
    effect: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "evaluation"
    stale.mkdir()
    (stale / "evaluation.json").write_text(json.dumps(evaluation(1, 1)))

    def fake_recaption(*args: str) -> None:
        folder = tmp_path / "evaluation"
        assert not folder.exists()
        folder.mkdir()
        (folder / "evaluation.json").write_text(json.dumps(evaluation(50, 60)))

    monkeypatch.setattr(effect, "recaption", fake_recaption)
    result = effect.evaluate_at(tmp_path, 5.0, [])
    assert result["attributes"]["object_colour"]["correct"] == 50


def test_summary_compares_each_arm_at_its_own_best_scale(effect: ModuleType) -> None:
    teacher_low = evaluation(20, 16)
    teacher_high = evaluation(48, 19)
    sweep = {
        "alt-text": {3.0: evaluation(37, 13), 7.5: evaluation(47, 7)},
        "synthetic captions": {
            3.0: evaluation(61, 75, teacher=teacher_low),
            7.5: evaluation(53, 74, teacher=teacher_high),
        },
    }
    text = effect.best_report(sweep)
    rows = {line.split(" accuracy")[0]: line for line in text.splitlines() if "accuracy" in line}
    # object colour: alt-text best at 7.5 (47 of 128), captions at 3 (61 of 128): +10.9 points
    assert "36.7% (at 7.5)" in rows["object_colour"]
    assert "47.7% (at 3)" in rows["object_colour"]
    assert "37.5% (at 7.5)" in rows["object_colour"]  # the teacher's best
    assert rows["object_colour"].rstrip().endswith("+10.9")
    # background colour: alt-text best at 3 (13), captions at 3 (75)
    assert rows["background_colour"].rstrip().endswith("+48.4")
    tables = effect.report({arm: by_scale[3.0] for arm, by_scale in sweep.items()}, 3.0)
    assert tables.splitlines()[0].startswith("guidance 3")
    assert "teacher" in tables.splitlines()[0]
    # an evaluation.json without colour_swaps (written before they were counted) shows "-"
    swaps = next(line for line in tables.splitlines() if line.startswith("colours swapped"))
    assert swaps.split()[2:] == ["-", "-", "-"]


def test_swapped_colours_are_a_row_of_their_own(effect: ModuleType) -> None:
    swapped = {"swapped": 25, "n": 128, "swap_rate": 25 / 128}
    results = {
        "alt-text": evaluation(47, 7, colour_swaps={"swapped": 5, "n": 128, "swap_rate": 5 / 128}),
        "synthetic captions": evaluation(61, 75, colour_swaps=swapped),
    }
    row = next(
        line
        for line in effect.report(results, 5.0).splitlines()
        if line.startswith("colours swapped")
    )
    assert row.split()[2:] == ["3.9%", "(5/128)", "19.5%", "(25/128)"]


def test_guidance_scales_are_one_comma_separated_argument(effect: ModuleType) -> None:
    # One argument, so the KEY=VALUE overrides that follow are never taken for scales.
    assert effect._scales("3,5,7.5,10") == [3.0, 5.0, 7.5, 10.0]
    assert effect._scales("7.5") == [7.5]
    for bad in ("3,x", "", "0,5", "evaluate.world_seed=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            effect._scales(bad)
