"""Evaluate: what the trained text-to-image model learned, measured on held-out prompts.

Samples the pipeline the sample stage samples (``sample.model`` or ``run_dir/koala/pipeline``,
and ``train.teacher`` with ``evaluate.with_teacher``) through the sample stage's own functions
(:func:`recaption.stages.sample.sample_all`: the same loading, scheduler and batching), once per
prompt and seed, and scores every image:

- the CLIP score against its prompt (``evaluate.clip_model``), as the sample stage scores;
- where the prompt's attributes are known (:func:`recaption.caption_accuracy.parse_caption`
  reads them from its text) and ``evaluate.judge`` is set, whether the image shows them, as a
  judge reads it (:mod:`recaption.judge`). The judge's own accuracy is measured on held-out
  demo-world images of the same kinds, at the evaluation size, and reported beside it.

The prompts are ``evaluate.prompts``, or (empty) ``evaluate.n_prompts`` captions that
:func:`recaption.demo.describe.describe` writes for a held-out demo world drawn from
``evaluate.world_seed``. Writes ``run_dir/evaluation/``:

- ``evaluation.json``: the model, prompts, seeds and settings; the mean CLIP score; per
  attribute the samples' accuracy, the chance level and the judge's measured accuracy; and
  how often the two colours a prompt asks for are drawn, both, on each other's place
  (``colour_swaps``: attribute binding, the classic failure of text-to-image models);
- ``samples.parquet``: one row per model, prompt and seed (prompt, seed, CLIP score, expected
  and judged attributes, whether each is right, the PNG bytes);
- ``grid.png``: one row per prompt, one column per model and seed.

The done marker stamps the pipeline's weights and the whole evaluate config: a rerun with the
same ones does nothing; a retrained pipeline or any changed setting (prompts included) redoes
the evaluation without ``--overwrite`` (it is a measurement; nothing is lost).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from recaption.config import EvaluateConfig, SampleConfig
from recaption.demo.describe import describe
from recaption.demo.models import resolve_model
from recaption.demo.world import WORLD_VERSION, draw_image
from recaption.driver import SingleOutputStage
from recaption.judge import (
    ATTRIBUTES,
    DECLINED,
    JUDGE_VERSION,
    KINDS,
    RESAMPLE,
    Expected,
    PixelJudge,
    chance_levels,
    judged_attributes,
    measure_judge,
)
from recaption.ledger import StageSummary, atomic_path, write_json_atomic
from recaption.signals import StopRequested
from recaption.stages.sample import _model_stamp, make_grid, pipeline_path, sample_all

logger = logging.getLogger(__name__)

EVALUATION_FORMAT = 2  # 2: colour_swaps
RESULT_FILE = "evaluation.json"
TABLE_FILE = "samples.parquet"
GRID_FILE = "grid.png"
SCRATCH_DIR = "_sampling"  # sample_all's PNGs, read back into the table, then removed


@dataclass(frozen=True)
class EvalPrompt:
    """A held-out prompt; ``truth`` is the world image it describes (world prompts only)."""

    text: str
    truth: dict[str, Any] | None = None


def world_prompts(cfg: EvaluateConfig) -> list[EvalPrompt]:
    """``cfg.n_prompts`` captions of a held-out demo world drawn from ``cfg.world_seed``.

    Images are drawn and described one after the other from one generator, as the world's
    own captions are. With ``world_prompts: judged`` only images whose ground truth the judge
    judges in full (a plain background, one object) are kept.
    """
    rng = random.Random(cfg.world_seed)
    prompts: list[EvalPrompt] = []
    draws = 0
    while len(prompts) < cfg.n_prompts:
        if draws >= 200 * cfg.n_prompts:
            raise RuntimeError(f"drew {draws} world images and kept only {len(prompts)} prompts")
        _image, truth = draw_image(rng)
        text = describe(truth, rng)
        draws += 1
        judged = set(judged_attributes(Expected.from_truth(truth)))
        if cfg.world_prompts == "judged" and judged != set(ATTRIBUTES):
            continue
        prompts.append(EvalPrompt(text, truth))
    return prompts


def read_prompts(cfg: EvaluateConfig) -> list[EvalPrompt]:
    """``evaluate.prompts``, or world prompts when it is empty."""
    if cfg.prompts:
        return [EvalPrompt(p) for p in cfg.prompts]
    return world_prompts(cfg)


def expected_attributes(text: str) -> dict[str, str]:
    """What the judge checks in a sample of ``text``: attribute -> value the prompt asks for."""
    from recaption.caption_accuracy import parse_caption

    return judged_attributes(Expected.from_claims(parse_caption(text)))


class EvaluateStage(SingleOutputStage):
    """Sample held-out prompts; write CLIP scores, judged attribute accuracy and a grid."""

    name = "evaluate"
    output_name = "evaluation"

    def check(self) -> None:
        cfg = self.config.evaluate
        if not cfg.prompts and not self.config.demo.enabled:
            logger.warning(
                "evaluate.prompts is empty: evaluating on prompts of the demo world, which "
                "only a model trained on the demo world knows; set evaluate.prompts for "
                "other runs"
            )
        self.prompts = read_prompts(cfg)
        self.models = {"koala": pipeline_path(self.config)}
        if cfg.with_teacher:
            self.models["teacher"] = resolve_model(self.config, self.config.train.teacher)
        self.clip_spec = resolve_model(self.config, cfg.clip_model) if cfg.clip_model else None
        self.judge = PixelJudge() if cfg.judge == "pixel" else None
        self.expected = [expected_attributes(p.text) if self.judge else {} for p in self.prompts]
        if self.judge is not None and not any(self.expected):
            logger.warning(
                "evaluate.judge is %s but it judges none of the %d prompt(s): it judges %s",
                cfg.judge,
                len(self.prompts),
                "; ".join(f"{a} of {k}" for a, k in KINDS.items()),
            )

    def stage_config(self) -> dict[str, Any]:
        # Every setting is in the input stamp instead: a change redoes the evaluation.
        return {"format": EVALUATION_FORMAT}

    def input_stamp(self) -> Any:
        cfg = self.config.evaluate
        return {
            "models": dict(self.models),
            "weights": {name: _model_stamp(spec) for name, spec in self.models.items()},
            "config": cfg.fingerprint_dict(),
            "prompts": [p.text for p in self.prompts],
            "judge_version": JUDGE_VERSION if self.judge else None,
            "world_version": None if cfg.prompts else WORLD_VERSION,
        }

    def run_once(self, summary: StageSummary) -> dict[str, Any]:
        cfg = self.config.evaluate
        judge_accuracy = None
        try:
            rows = self.sample()
            if self.judge is not None:
                self.stop.check()
                judge_accuracy = measure_judge(
                    self.judge,
                    seed=cfg.world_seed + 1,
                    n=cfg.judge_images,
                    width=cfg.width,
                    height=cfg.height,
                )
                for row in rows:
                    score_row(row, self.judge, self.expected[row["prompt_index"]])
        except StopRequested:
            summary.interrupted = True
            return {}
        result = self.result(rows, judge_accuracy)
        folder = self.output_dir
        write_table(folder / TABLE_FILE, rows)
        grid = make_grid(rows, [p.text for p in self.prompts], cfg.seeds)
        with atomic_path(folder / GRID_FILE) as tmp:
            grid.save(tmp, format="PNG")
        write_json_atomic(folder / RESULT_FILE, result)
        summary.messages.append(f"evaluation: {folder / RESULT_FILE} ({headline(result)})")
        return {
            "n_input": len(rows),
            "n_ok": len(rows),
            "n_failed": 0,
            "mean_clip_score": result["mean_clip_score"],
            "accuracy": {a: v["sample_accuracy"] for a, v in result["attributes"].items()},
        }

    def sample(self) -> list[dict[str, Any]]:
        """Every (model, prompt, seed) through :func:`sample_all`, each row with its PNG bytes.

        ``sample_all`` writes its PNGs under ``run_dir/samples``; it is given a run folder of
        its own inside ``evaluation/`` (so the sample stage's files are never touched), and
        the files are read back and removed.
        """
        cfg = self.config.evaluate
        scratch = self.output_dir / SCRATCH_DIR
        shutil.rmtree(scratch, ignore_errors=True)
        settings = SampleConfig(
            prompts=[p.text for p in self.prompts],
            seeds=cfg.seeds,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            negative_prompt=cfg.negative_prompt,
            height=cfg.height,
            width=cfg.width,
            batch_size=cfg.batch_size,
            dtype=cfg.dtype,
            device=cfg.device,
            cpu_threads=cfg.cpu_threads,
        )
        sampling = self.config.model_copy(update={"run_dir": scratch, "sample": settings})
        try:
            rows = sample_all(sampling, settings.prompts, self.models, self.clip_spec, self.stop)
            for row in rows:
                row["png"] = (sampling.samples_dir / row.pop("file")).read_bytes()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for row in rows:
            truth = self.prompts[row["prompt_index"]].truth
            row["world_truth"] = None if truth is None else json.dumps(truth, sort_keys=True)
        return rows

    def result(
        self, rows: list[dict[str, Any]], judge_accuracy: dict[str, dict[str, Any]] | None
    ) -> dict[str, Any]:
        """The content of ``evaluation.json``."""
        cfg = self.config.evaluate
        per_model = {
            name: model_summary([r for r in rows if r["model"] == name]) for name in self.models
        }
        chance = chance_levels()
        attributes: dict[str, Any] = {}
        for attr, values in per_model["koala"]["attributes"].items():
            measured = (judge_accuracy or {}).get(attr, {})
            accuracy = measured.get("accuracy")
            attributes[attr] = {
                **values,
                "chance": round(chance[attr], 4),
                "judge_accuracy": accuracy,
                "judge_n": measured.get("n", 0),
                "judge_trusted": accuracy is not None and accuracy >= cfg.judge_goal,
            }
        for attr, values in attributes.items():
            if not values["judge_trusted"]:
                logger.warning(
                    "evaluate: the judge's accuracy on %s is %s (n=%d), below evaluate."
                    "judge_goal %.2f: the samples' %s accuracy is not to be trusted",
                    attr,
                    values["judge_accuracy"],
                    values["judge_n"],
                    cfg.judge_goal,
                    attr,
                )
        result: dict[str, Any] = {
            "format": EVALUATION_FORMAT,
            "model": self.models["koala"],
            "models": dict(self.models),
            "prompts": self.prompt_summary(),
            "n_prompts": len(self.prompts),
            "seeds": list(cfg.seeds),
            "n_samples": per_model["koala"]["n_samples"],
            "sampling": {
                "height": cfg.height,
                "width": cfg.width,
                "num_inference_steps": cfg.num_inference_steps,
                "guidance_scale": cfg.guidance_scale,
                "negative_prompt": cfg.negative_prompt,
            },
            "clip_model": cfg.clip_model,
            "mean_clip_score": per_model["koala"]["mean_clip_score"],
            "attributes": attributes,
            "colour_swaps": per_model["koala"]["colour_swaps"],
            "judge": None,
        }
        if "teacher" in per_model:
            result["teacher"] = per_model["teacher"]
        if judge_accuracy is not None:
            result["judge"] = {
                "name": cfg.judge,
                "version": JUDGE_VERSION,
                "goal": cfg.judge_goal,
                "accuracy": judge_accuracy,
                "measured_on": (
                    f"held-out demo-world images (seed {cfg.world_seed + 1}), resized to "
                    f"{cfg.width}x{cfg.height} ({RESAMPLE.name.lower()}), never JPEG-encoded; "
                    "per attribute only images of the kind it judges; a declined answer is "
                    "wrong"
                ),
                "judges": dict(KINDS),
                "declines": DECLINED,
            }
        return result

    def prompt_summary(self) -> dict[str, Any]:
        """Where the prompts came from; for world prompts, whether the prompts parse back to
        the attributes their world image has (the expectations come from the parse)."""
        cfg = self.config.evaluate
        if cfg.prompts:
            return {"source": "config", "n": len(self.prompts), "judged": _n_judged(self.expected)}
        truths = [p.truth for p in self.prompts if p.truth is not None]
        agree = sum(
            expected_attributes(p.text) == judged_attributes(Expected.from_truth(p.truth))
            for p in self.prompts
            if p.truth is not None
        )
        if agree < len(truths):
            logger.warning(
                "evaluate: %d of %d world prompts do not parse back to their image's attributes",
                len(truths) - agree,
                len(truths),
            )
        return {
            "source": "world",
            "n": len(self.prompts),
            "world_seed": cfg.world_seed,
            "world_prompts": cfg.world_prompts,
            "judged": _n_judged(self.expected),
            "parse_agrees_with_truth": {"n": len(truths), "agree": agree},
        }


def _n_judged(expected: list[dict[str, str]]) -> dict[str, int]:
    return {attr: sum(attr in e for e in expected) for attr in ATTRIBUTES}


def score_row(row: dict[str, Any], judge: PixelJudge, expected: dict[str, str]) -> None:
    """Add the judge's reading of ``row["image"]`` and, where ``expected`` has the
    attribute, whether it is right (a declined answer is wrong)."""
    judgement = judge.judge(row["image"])
    for attr in ATTRIBUTES:
        want = expected.get(attr)
        row[f"expected_{attr}"] = want
        row[f"judged_{attr}"] = judgement.get(attr)
        row[f"{attr}_correct"] = None if want is None else judgement.get(attr) == want
    row["judged_background_share"] = judgement.background_share
    row["judged_object_share"] = judgement.object_share


def colour_swaps(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How often the object and background colours are exchanged: among the rows whose
    prompt asks for an object colour and a different background colour, those whose judged
    object colour is the asked background's and judged background colour the asked object's.

    A model that knows both colour words but not which one goes where draws them swapped
    ("a white ellipse on a purple background" as a purple ellipse on white): attribute
    binding, measured apart from not knowing a colour at all. None without such rows."""
    pairs = [
        r
        for r in rows
        if r.get("expected_object_colour")
        and r.get("expected_background_colour")
        and r["expected_object_colour"] != r["expected_background_colour"]
    ]
    if not pairs:
        return None
    swapped = sum(
        r.get("judged_object_colour") == r["expected_background_colour"]
        and r.get("judged_background_colour") == r["expected_object_colour"]
        for r in pairs
    )
    return {"swapped": swapped, "n": len(pairs), "swap_rate": round(swapped / len(pairs), 4)}


def model_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's numbers: samples, mean CLIP score, per attribute the samples' accuracy,
    and its :func:`colour_swaps`."""
    scores = [r["clip_score"] for r in rows if r.get("clip_score") is not None]
    attributes = {}
    for attr in ATTRIBUTES:
        flags = [r[f"{attr}_correct"] for r in rows if r.get(f"{attr}_correct") is not None]
        if flags:
            attributes[attr] = {
                "sample_accuracy": round(sum(flags) / len(flags), 4),
                "correct": sum(flags),
                "n": len(flags),
            }
    return {
        "n_samples": len(rows),
        "mean_clip_score": round(fmean(scores), 4) if scores else None,
        "attributes": attributes,
        "colour_swaps": colour_swaps(rows),
    }


def headline(result: dict[str, Any]) -> str:
    """``mean CLIP score 21.3, object colour 40.0% of 24 (judge 100.0%, chance 14.3%), colours
    swapped 8.3% of 24``."""
    parts = []
    if result.get("mean_clip_score") is not None:
        parts.append(f"mean CLIP score {result['mean_clip_score']:.2f}")
    for attr, values in result.get("attributes", {}).items():
        judge = values.get("judge_accuracy")
        parts.append(
            f"{attr.replace('_', ' ')} {100 * values['sample_accuracy']:.1f}% of {values['n']} "
            f"(judge {'-' if judge is None else f'{100 * judge:.1f}%'}, "
            f"chance {100 * values['chance']:.1f}%)"
        )
    swaps = result.get("colour_swaps")
    if swaps:
        parts.append(f"colours swapped {100 * swaps['swap_rate']:.1f}% of {swaps['n']}")
    return ", ".join(parts) or "no scores"


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """``samples.parquet``: one row per image, its PNG bytes included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: list[tuple[str, Any]] = [
        ("model", pa.string()),
        ("model_path", pa.string()),
        ("prompt", pa.string()),
        ("prompt_index", pa.int32()),
        ("seed", pa.int64()),
        ("steps", pa.int32()),
        ("guidance", pa.float64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("seconds", pa.float64()),
        ("clip_score", pa.float64()),
    ]
    for attr in ATTRIBUTES:
        columns += [
            (f"expected_{attr}", pa.string()),
            (f"judged_{attr}", pa.string()),
            (f"{attr}_correct", pa.bool_()),
        ]
    columns += [
        ("judged_background_share", pa.float64()),
        ("judged_object_share", pa.float64()),
        ("world_truth", pa.string()),
        ("png", pa.binary()),
    ]
    schema = pa.schema(columns)
    table = pa.Table.from_pylist(
        [{name: row.get(name) for name in schema.names} for row in rows], schema=schema
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
