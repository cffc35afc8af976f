"""The evaluate stage and its pixel judge: judge accuracy, outputs, resume, bad config."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw

from recaption.cli import main as cli_main
from recaption.config import ConfigError, EvaluateConfig, RunConfig, load_config
from recaption.demo.world import COLOURS
from recaption.judge import (
    ATTRIBUTES,
    Expected,
    PixelJudge,
    chance_levels,
    judged_attributes,
    measure_judge,
)
from recaption.ledger import StageSummary
from recaption.stages import StageContext
from recaption.stages import run as run_stage
from recaption.stages.evaluate import colour_swaps, expected_attributes, world_prompts
from recaption.status import collect_status, format_status

SIZE = 64


@pytest.fixture(scope="module")
def trained(trained_run: tuple[RunConfig, StageSummary]) -> RunConfig:
    return trained_run[0]


def evaluate_config(trained: RunConfig, **changes: object) -> RunConfig:
    """The trained run with a small evaluation: 3 world prompts x 2 seeds, 64 px, 2 steps."""
    config = trained.model_copy(deep=True)
    config.evaluate = EvaluateConfig(
        n_prompts=3,
        seeds=[0, 1],
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        dtype="float32",
        clip_model="demo:tiny-clip",
        judge="pixel",
        judge_images=40,
        **changes,
    )
    return config


# -- the judge ----------------------------------------------------------------------------------
def test_judge_clears_its_goal_on_held_out_world_images() -> None:
    accuracy = measure_judge(PixelJudge(), seed=424_242, n=60, width=SIZE, height=SIZE)
    assert set(accuracy) == set(ATTRIBUTES)
    for attr, measured in accuracy.items():
        assert measured["n"] == 60, attr
        assert measured["accuracy"] >= 0.95, (attr, measured)


def _shape_on(background: str, colour: str, shape: str = "circle") -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[background])
    draw = ImageDraw.Draw(image)
    box = (16, 12, 44, 40)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def test_judge_reads_hand_made_images() -> None:
    judge = PixelJudge()
    red_on_blue = judge.judge(_shape_on("blue", "red"))
    assert (red_on_blue.background_colour, red_on_blue.object_colour) == ("blue", "red")
    assert red_on_blue.background_share == 1.0 and red_on_blue.object_share > 0.9
    # Through a JPEG round trip and off-palette shades, still the nearest colours.
    buf = io.BytesIO()
    _shape_on("black", "white", "square").save(buf, format="JPEG", quality=70)
    judged = judge.judge(Image.open(buf))
    assert (judged.background_colour, judged.object_colour) == ("black", "white")
    # All background: nothing to name as the object.
    empty = judge.judge(Image.new("RGB", (SIZE, SIZE), COLOURS["green"]))
    assert (empty.background_colour, empty.object_colour) == ("green", None)


def test_judge_declines_what_it_cannot_judge() -> None:
    plain = Expected(background_colours=("blue",), object_colours=("red",))
    assert judged_attributes(plain) == {"background_colour": "blue", "object_colour": "red"}
    gradient = Expected(background_colours=("blue", "red"), object_colours=("green",))
    assert judged_attributes(gradient) == {}
    two = Expected(background_colours=("blue",), object_colours=("red", "green"), count=2)
    assert judged_attributes(two) == {"background_colour": "blue"}
    no_background = Expected(background_colours=(), object_colours=("red",))
    assert judged_attributes(no_background) == {}
    assert expected_attributes("a red circle on a plain blue background") == {
        "background_colour": "blue",
        "object_colour": "red",
    }
    assert expected_attributes("a green star on a gradient background from red to blue") == {}
    chance = chance_levels()
    assert chance["background_colour"] == 1 / 8 and chance["object_colour"] == 1 / 7


def test_world_prompts_are_held_out_reproducible_and_judged() -> None:
    cfg = EvaluateConfig(n_prompts=5)
    prompts = world_prompts(cfg)
    assert [p.text for p in prompts] == [p.text for p in world_prompts(cfg)]
    assert len(prompts) == 5 and len({p.text for p in prompts}) == 5
    for prompt in prompts:
        assert prompt.truth is not None and prompt.truth["background"] == "plain"
        assert set(expected_attributes(prompt.text)) == set(ATTRIBUTES)
        assert expected_attributes(prompt.text) == judged_attributes(
            Expected.from_truth(prompt.truth)
        )
    other = world_prompts(EvaluateConfig(n_prompts=5, world_seed=7))
    assert {p.text for p in other}.isdisjoint(p.text for p in prompts)


def _row(want: tuple[str, str], judged: tuple[str | None, str | None]) -> dict[str, object]:
    return {
        "expected_object_colour": want[0],
        "expected_background_colour": want[1],
        "judged_object_colour": judged[0],
        "judged_background_colour": judged[1],
    }


def test_colour_swaps_count_only_both_colours_exchanged() -> None:
    rows = [
        _row(("white", "purple"), ("purple", "white")),  # swapped
        _row(("white", "purple"), ("white", "purple")),  # right
        _row(("white", "purple"), ("purple", "purple")),  # object wrong, not a swap
        _row(("green", "black"), ("black", None)),  # background declined: not a swap
        _row(("red", "red"), ("red", "red")),  # one colour asked twice: no binding to test
        {"expected_object_colour": "red", "expected_background_colour": None},  # no background
    ]
    assert colour_swaps(rows) == {"swapped": 1, "n": 4, "swap_rate": 0.25}
    assert colour_swaps(rows[4:]) is None


# -- the stage ----------------------------------------------------------------------------------
def test_evaluate_writes_scores_judge_accuracy_and_grid(trained: RunConfig) -> None:
    config = evaluate_config(trained)
    summary = run_stage("evaluate", StageContext(config))
    assert summary.ok and summary.shards_ok == ["evaluation"], summary.describe()
    folder = config.evaluation_dir
    result = json.loads((folder / "evaluation.json").read_text())
    assert result["model"] == str(config.koala_dir / "pipeline")
    assert result["n_prompts"] == 3 and result["seeds"] == [0, 1] and result["n_samples"] == 6
    assert result["prompts"]["source"] == "world"
    assert result["prompts"]["parse_agrees_with_truth"] == {"n": 3, "agree": 3}
    assert 0 <= result["mean_clip_score"] <= 100
    for attr in ATTRIBUTES:
        values = result["attributes"][attr]
        assert values["n"] == 6 and 0 <= values["sample_accuracy"] <= 1
        assert values["chance"] == round(chance_levels()[attr], 4)
        assert values["judge_n"] == 40 and values["judge_accuracy"] >= 0.95
        assert values["judge_trusted"] is True
    assert result["judge"]["name"] == "pixel" and "never JPEG" in result["judge"]["measured_on"]

    rows = pq.read_table(folder / "samples.parquet").to_pylist()
    assert len(rows) == 6 and {(r["prompt_index"], r["seed"]) for r in rows} == {
        (p, s) for p in range(3) for s in (0, 1)
    }
    for row in rows:
        assert 0 <= row["clip_score"] <= 100
        assert row["expected_object_colour"] in COLOURS
        assert row["judged_background_colour"] in COLOURS
        correct = row["judged_object_colour"] == row["expected_object_colour"]
        assert row["object_colour_correct"] is correct
        with Image.open(io.BytesIO(row["png"])) as image:
            assert image.format == "PNG" and image.size == (SIZE, SIZE)
    n_right = sum(r["object_colour_correct"] for r in rows)
    assert n_right == result["attributes"]["object_colour"]["correct"]
    assert result["colour_swaps"] == colour_swaps(rows) and result["colour_swaps"]["n"] == 6
    with Image.open(folder / "grid.png") as grid:
        assert grid.height > 3 * SIZE
    assert not (folder / "_sampling").exists()
    assert not (config.samples_dir / "koala").exists()  # the sample stage's folder untouched

    report = collect_status(config)["stages"]["evaluate"]
    assert report["written"] and report["mean_clip_score"] == result["mean_clip_score"]
    assert "evaluate: mean CLIP score" in format_status(collect_status(config))
    assert "object colour accuracy" in format_status(collect_status(config))
    assert "colours swapped" in format_status(collect_status(config))

    # Same inputs: a no-op.
    before = (folder / "evaluation.json").stat().st_mtime_ns
    again = run_stage("evaluate", StageContext(evaluate_config(trained, batch_size=2)))
    assert again.shards_done_before == 1 and not again.shards_ok
    assert (folder / "evaluation.json").stat().st_mtime_ns == before

    # Other prompts: evaluated again, no --overwrite needed.
    changed = evaluate_config(trained, prompts=["a red circle on a plain blue background"])
    redo = run_stage("evaluate", StageContext(changed))
    assert redo.ok and redo.shards_ok == ["evaluation"], redo.describe()
    rows = pq.read_table(folder / "samples.parquet").to_pylist()
    assert [r["prompt"] for r in rows] == ["a red circle on a plain blue background"] * 2
    assert {r["expected_background_colour"] for r in rows} == {"blue"}
    result = json.loads((folder / "evaluation.json").read_text())
    assert result["prompts"] == {
        "source": "config",
        "n": 1,
        "judged": {"background_colour": 1, "object_colour": 1},
    }


def _write_config(tmp_path: Path, trained: RunConfig, evaluate: dict) -> Path:
    data = {
        "run_dir": str(trained.run_dir),
        "demo": {"models_dir": str(trained.demo_models_dir)},
        "evaluate": evaluate,
    }
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("height", 60, "evaluate.height: Input should be a multiple of 8"),
        ("seeds", [], "evaluate.seeds: List should have at least 1 item"),
        ("judge", "llava", "evaluate.judge: Input should be 'pixel'"),
        ("n_prompts", 0, "evaluate.n_prompts: Input should be greater than 0"),
        ("prompts", ["a red circle", " "], "evaluate.prompts: Value error, prompt 1 is blank"),
        ("judge_image", 40, "Did you mean 'judge_images'?"),
    ],
)
def test_bad_config_values_are_clear_errors(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "evaluate": {key: value}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)


def test_bad_value_or_missing_pipeline_exits_2_with_nothing_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run")}))
    with caplog.at_level(logging.ERROR):
        assert cli_main(["evaluate", str(path), "evaluate.width=100"]) == 2
    assert "evaluate.width" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli_main(["evaluate", str(path), "evaluate.prompts=[a red circle]"]) == 2
    assert "recaption train CONFIG" in caplog.text  # no pipeline yet
    assert not (tmp_path / "run" / "evaluation" / "evaluation.json").exists()
