"""`recaption run` on a small demo world: every stage, end to end, then `status`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from recaption.cli import main
from recaption.config import load_config

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "demo.n_images=80",
    "download.samples_per_shard=20",
    "train.max_steps=12",
    "train.checkpointing_steps=6",
    "train.batch_size=4",
    "sample.seeds=[0]",
    "sample.num_inference_steps=3",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    args = [str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", *OVERRIDES]
    assert main(["run", *args]) == 0
    return run_dir


def _parquet_rows(folder: Path) -> list[dict]:
    return [
        row for p in sorted(folder.glob("[0-9]*.parquet")) for row in pq.read_table(p).to_pylist()
    ]


def test_every_stage_wrote_its_outputs(demo_run: Path) -> None:
    downloaded = [r for r in _parquet_rows(demo_run / "images") if r["status"] == "success"]
    assert len(downloaded) > 20
    captions = _parquet_rows(demo_run / "captions")
    # One caption row per downloaded image, nothing dropped, nothing doubled.
    assert sorted(r["key"] for r in captions) == sorted(r["key"] for r in downloaded)
    assert {r["status"] for r in captions} == {"ok"}
    assert {r["finish_reason"] for r in captions} <= {"stop", "length"}
    decisions = _parquet_rows(demo_run / "filtered")
    assert sorted(r["key"] for r in decisions) == sorted(r["key"] for r in captions)
    kept = {r["key"]: r for r in decisions if r["keep"]}
    rejected = [r for r in decisions if not r["keep"]]
    assert all(r["reason"] for r in rejected)
    assert kept, "the demo must keep some pairs to train on"

    merged_keys = []
    for tar in sorted((demo_run / "dataset" / "webdataset").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "txt":
                    merged_keys.append(key)
                    text = tf.extractfile(member).read().decode()
                    assert text == kept[key]["caption_clean"]
    assert sorted(merged_keys) == sorted(kept)
    published = _parquet_rows(demo_run / "dataset" / "parquet")
    assert sorted(r["key"] for r in published) == sorted(kept)
    card = (demo_run / "dataset" / "README.md").read_text()
    assert card.startswith("---\n") and "demo:shapes-llava" in card
    assert (demo_run / "dataset" / "report" / "index.html").exists()
    assert main(["verify", str(REPO / "configs" / "demo.yaml"), f"run_dir={demo_run}"]) == 0

    state = json.loads((demo_run / "koala" / "train_state.json").read_text())
    assert state["step"] == 12 and state["status"] == "finished"
    pipe = StableDiffusionXLPipeline.from_pretrained(
        demo_run / "koala" / "pipeline", torch_dtype=torch.float32
    )
    assert pipe.unet.config.layers_per_block == 1
    samples = pq.read_table(demo_run / "samples" / "samples.parquet").to_pylist()
    assert samples and all((demo_run / "samples" / r["file"]).exists() for r in samples)
    assert (demo_run / "samples" / "grid.png").exists()


def test_the_demo_measures_its_captions_and_its_model(demo_run: Path) -> None:
    """The kept captions are measured against the world's ground truth beside the alt-texts
    (stats.json, the report), and clear what the shipped captioner clears on unseen images
    (tests/caption/test_demo_captioner.py); the student is evaluated with a judge whose own
    accuracy is measured."""
    stats = json.loads((demo_run / "dataset" / "stats.json").read_text())
    accuracy = stats["caption_accuracy"]
    synthetic, alt_text = accuracy["synthetic"], accuracy["alt_text"]
    assert accuracy["n"] >= 30 and accuracy["n_without_truth"] == 0
    # Measured on this world (45 kept): main colour 98%, shape and colour 98%, background
    # colour 100%, some false colour or shape 2% (1 of 45); the alt-texts: shape and colour
    # 53%, background 0%. The goals (90%, 80%, 5% false) are met here and on the full demo's
    # 227 kept captions (4.4% false); on 256 unseen images the false mentions are 8% (README).
    assert synthetic["attributes"]["main_colour"]["right"] >= 0.9, synthetic
    assert synthetic["attributes"]["main_shape_colour"]["right"] >= 0.9, synthetic
    assert synthetic["attributes"]["background_colour"]["right"] >= 0.9, synthetic
    assert synthetic["false_statements"]["hallucination"] <= 0.09, synthetic
    assert alt_text["attributes"]["background_colour"]["right"] <= 0.05, alt_text
    # The captions state the main object better than its alt-text does, by a wide margin.
    assert (
        synthetic["attributes"]["main_shape_colour"]["right"]
        >= alt_text["attributes"]["main_shape_colour"]["right"] + 0.2
    ), (synthetic, alt_text)
    html = (demo_run / "dataset" / "report" / "index.html").read_text()
    assert "Caption accuracy against ground truth" in html

    evaluation = json.loads((demo_run / "evaluation" / "evaluation.json").read_text())
    assert evaluation["n_samples"] == evaluation["n_prompts"] * len(evaluation["seeds"]) > 0
    assert evaluation["mean_clip_score"] is not None
    for name, values in evaluation["attributes"].items():
        assert values["judge_accuracy"] >= 0.95, name
        assert values["n"] > 0 and 0 <= values["sample_accuracy"] <= 1
    assert (demo_run / "evaluation" / "grid.png").exists()
    assert (demo_run / "evaluation" / "samples.parquet").exists()


def test_rerun_is_a_no_op(demo_run: Path) -> None:
    markers = {p: p.stat().st_mtime_ns for p in demo_run.glob("*/*_stats.json")}
    args = [str(REPO / "configs" / "demo.yaml"), f"run_dir={demo_run}", *OVERRIDES]
    assert main(["run", *args, "--to", "merge"]) == 0
    assert {p: p.stat().st_mtime_ns for p in demo_run.glob("*/*_stats.json")} == markers


def test_status_reports_every_stage_and_failures(demo_run: Path, capsys) -> None:
    config_args = [str(REPO / "configs" / "demo.yaml"), f"run_dir={demo_run}", *OVERRIDES]
    assert main(["status", *config_args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stages = report["stages"]
    n_shards = stages["download"]["shards_done"]
    for stage in ("caption", "filter", "merge"):
        assert stages[stage]["shards_done"] == n_shards
        assert stages[stage]["shards_pending"] == 0 and stages[stage]["shards_failed"] == 0
    assert stages["train"]["step"] == 12 and stages["train"]["pipeline_ready"]
    # Every decision is counted: kept, or rejected with its reason (the trained captioner's
    # captions may all pass the demo's rules).
    decisions = _parquet_rows(demo_run / "filtered")
    n_rejected = sum(1 for r in decisions if not r["keep"])
    assert sum(stages["filter"]["rejections"].values()) == n_rejected

    # Break one caption shard's input: the caption stage fails it, status shows it.
    config = load_config(config_args[0], config_args[1:])
    victim = sorted(config.images_dir.glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:700])
    (config.captions_dir / f"{victim.stem}_stats.json").unlink()
    assert main(["caption", *config_args]) == 1
    capsys.readouterr()
    assert main(["status", *config_args]) == 0
    text = capsys.readouterr().out
    assert f"failed caption shard {victim.stem}" in text
