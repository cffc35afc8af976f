"""Train and sample stages end to end on tiny models: distillation, resume, export, bad input."""

from __future__ import annotations

import itertools
import json
import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from recaption.cli import main as cli_main
from recaption.config import RunConfig, load_config
from recaption.ledger import ConfigMismatchError, StageSummary
from recaption.stages import StageContext
from recaption.stages import run as run_stage
from recaption.stages import sample as sample_stage

REPO = Path(__file__).resolve().parents[2]
MakeRun = Callable[..., tuple[RunConfig, Path]]


def read_log(config: RunConfig) -> list[dict]:
    path = config.koala_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_state(config: RunConfig) -> dict:
    return json.loads((config.koala_dir / "train_state.json").read_text())


def test_distillation_lowers_the_loss_and_reports_each_term(
    trained_run: tuple[RunConfig, StageSummary],
) -> None:
    trained, _ = trained_run
    log = read_log(trained)
    assert [r["step"] for r in log] == list(range(1, 17))
    for record in log:
        for term in ("loss", "loss_task", "loss_out_kd", "loss_feat_kd", "lr", "images_per_second"):
            assert record[term] == record[term] and record[term] >= 0, (term, record)
    first = sum(r["loss"] for r in log[:4]) / 4
    last = sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    # The feature term is what the student starts worst at and learns fastest.
    assert sum(r["loss_feat_kd"] for r in log[-4:]) < sum(r["loss_feat_kd"] for r in log[:4])
    state = read_state(trained)
    assert state["step"] == state["max_steps"] == 16
    assert state["status"] == "finished"
    assert state["samples_skipped"] >= 1  # the corrupt JPEG, skipped and counted
    assert state["loss"] == pytest.approx(log[-1]["loss"])
    assert list((trained.koala_dir / "logs").rglob("events.out.tfevents.*"))


def test_a_truncated_shard_is_reported_and_training_goes_on(
    trained_run: tuple[RunConfig, StageSummary],
) -> None:
    trained, summary = trained_run
    assert list(summary.shards_failed) == ["00002"]
    assert "ReadError" in summary.shards_failed["00002"]
    assert sorted(summary.shards_ok) == ["00000", "00001"]
    assert not summary.ok  # the command exits 1 so the shard gets looked at...
    assert read_state(trained)["shard_errors"][0].startswith("00002: ")
    # ...but training finished and the pipeline was written
    assert (trained.koala_dir / "pipeline" / "model_index.json").exists()


def test_member_order_inside_a_tar_does_not_change_the_training_stream(tmp_path: Path) -> None:
    """img2dataset writes samples in download-completion order, so two runs of one config can
    hold the same samples in differently ordered tars; training must see the same stream."""
    import tarfile

    from recaption.config import TrainConfig
    from recaption.shards import iter_samples_by_key
    from recaption.training.data import TrainingSamples
    from tests.koala.conftest import write_shard

    in_order = tmp_path / "a" / "00000.tar"
    in_order.parent.mkdir()
    keys = write_shard(in_order, 8, seed=0)
    shuffled = tmp_path / "b" / "00000.tar"
    shuffled.parent.mkdir()
    with tarfile.open(in_order) as src, tarfile.open(shuffled, "w") as dst:
        members = src.getmembers()
        order = keys[3:] + keys[:3]  # another order of the same samples
        for key in order[::-1]:
            for m in members:
                if m.name.startswith(f"{key}."):
                    dst.addfile(m, src.extractfile(m))
    with tarfile.open(shuffled) as a, tarfile.open(in_order) as b:
        assert a.getnames() != b.getnames()

    assert [s.key for s in iter_samples_by_key(shuffled)] == sorted(keys)
    cfg = TrainConfig(resolution=32, seed=7)

    def stream(path: Path) -> list[tuple[str, list[float]]]:
        samples = TrainingSamples([path], cfg, rank=0, world_size=1)
        items = itertools.islice(iter(samples), 12)  # an epoch and a half
        return [(s["caption"], s["pixel_values"].mean(dim=(1, 2)).tolist()) for s in items]

    assert stream(shuffled) == stream(in_order)


@pytest.fixture(scope="module")
def trained(trained_run: tuple[RunConfig, StageSummary]) -> RunConfig:
    return trained_run[0]


def test_output_folder_is_a_complete_sdxl_pipeline(trained: RunConfig) -> None:
    folder = trained.koala_dir / "pipeline"
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    assert "README.md" in files
    # The model card's own snippet.
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    assert pipe.unet.config.layers_per_block == 1
    assert pipe.unet.config.mid_block_type is None
    assert list(pipe.unet.config.transformer_layers_per_block) == [1, 2, 5]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt="a red circle",
        negative_prompt="worst quality, low quality, illustration, low resolution",
        height=48,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images[0].size == (64, 48)


def test_exported_unet_holds_the_ema_weights(trained: RunConfig) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    last = trained.koala_dir / "checkpoints" / "checkpoint-00000016"
    ema = torch.load(last / "custom_checkpoint_2.pkl", weights_only=False)  # EMAModel state
    raw = load_file(last / "model.safetensors")  # the student's own weights
    unet = UNet2DConditionModel.from_pretrained(trained.koala_dir / "pipeline", subfolder="unet")
    names = [n for n, _ in unet.named_parameters()]
    exported = dict(unet.named_parameters())
    assert len(ema["shadow_params"]) == len(names)
    for name, shadow in zip(names, ema["shadow_params"], strict=True):
        assert torch.equal(exported[name].detach(), shadow), name
    assert any(not torch.equal(exported[n].detach(), raw[n]) for n in names)


def test_finished_training_is_not_redone(trained: RunConfig) -> None:
    before = (trained.koala_dir / "pipeline" / "model_index.json").stat().st_mtime_ns
    summary = run_stage("train", StageContext(trained))
    assert summary.shards_done_before == 1 and not summary.shards_ok
    assert (trained.koala_dir / "pipeline" / "model_index.json").stat().st_mtime_ns == before


def test_changed_config_is_refused_without_overwrite(trained: RunConfig) -> None:
    changed = trained.model_copy(deep=True)
    changed.train.feature_kd_weight = 0.5
    with pytest.raises(ConfigMismatchError, match=r"train\.feature_kd_weight"):
        run_stage("train", StageContext(changed))


def test_sample_stage_writes_grid_parquet_and_teacher_side_by_side(
    trained: RunConfig, tmp_path: Path
) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from recaption.demo.tiny_models import build_tiny_clip_tokenizer

    clip_dir = tmp_path / "clip"
    tokenizer = build_tiny_clip_tokenizer()
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            },
            vision_config={
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
            projection_dim=8,
        )
    )
    clip.save_pretrained(clip_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip_dir)

    config = trained.model_copy(deep=True)
    config.sample.prompts = ["a red circle", "a blue square on a green background"]
    config.sample.seeds = [0, 7]
    config.sample.height, config.sample.width = 64, 64
    config.sample.num_inference_steps = 2
    config.sample.batch_size = 4
    config.sample.with_teacher = True
    config.sample.clip_model = str(clip_dir)
    summary = run_stage("sample", StageContext(config))
    assert summary.ok, summary.describe()
    samples = config.samples_dir
    table = pq.read_table(samples / "samples.parquet").to_pylist()
    assert len(table) == 2 * 2 * 2  # prompts x seeds x (koala, teacher)
    assert {r["model"] for r in table} == {"koala", "teacher"}
    assert {(r["prompt"], r["seed"]) for r in table if r["model"] == "koala"} == {
        (p, s) for p in config.sample.prompts for s in (0, 7)
    }
    for row in table:
        assert row["steps"] == 2 and row["guidance"] == 7.5 and row["seconds"] > 0
        assert 0 <= row["clip_score"] <= 100
        with Image.open(samples / row["file"]) as image:
            assert image.size == (64, 64)
    with Image.open(samples / "grid.png") as grid:
        assert grid.width > 4 * 64 and grid.height > 2 * 64
    # Same prompt and seed, same image: sampling is reproducible.
    koala_0 = next(r for r in table if r["model"] == "koala" and r["seed"] == 0)
    first = Image.open(samples / koala_0["file"]).tobytes()
    summary = run_stage("sample", StageContext(config, overwrite=True))
    assert summary.shards_done_before == 1  # nothing changed: not sampled again
    # Retrained in place (new weights file): sampled again, reproducibly.
    weights = trained.koala_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns()))
    summary = run_stage("sample", StageContext(config))
    assert summary.ok and summary.shards_ok == ["samples"]
    assert Image.open(samples / koala_0["file"]).tobytes() == first


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited early ({proc.returncode}):\n{proc.stdout.read()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.2)


def test_kill_then_resume_continues_the_step_counter_also_on_two_processes(
    make_run: MakeRun,
) -> None:
    config, path = make_run(train={"max_steps": 400, "checkpointing_steps": 2})
    # One thread per process: the two DDP workers share a small CPU.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recaption", "train", str(path)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for(config.koala_dir / "checkpoints" / "checkpoint-00000004", proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    killed_at = max(
        int(p.name.split("-")[1]) for p in (config.koala_dir / "checkpoints").glob("checkpoint-*")
    )
    assert killed_at >= 4

    # Resume with one process: starts at the last checkpoint's step, not at 0.
    resumed = load_config(path, [f"train.max_steps={killed_at + 2}"])
    summary = run_stage("train", StageContext(resumed))
    assert summary.ok
    steps = [r["step"] for r in read_log(resumed)]
    assert steps[-2:] == [killed_at + 1, killed_at + 2]
    assert read_state(resumed)["step"] == killed_at + 2

    # SIGTERM on two DDP processes (gloo): checkpoint at the current step, exit 3.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "recaption", "train", str(path), "train.max_steps=400",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for(config.koala_dir / "checkpoints" / f"checkpoint-{killed_at + 4:08d}", proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "2 process(es)" in out
    assert out.count("stopped early by a signal") == 2, out  # each rank exits 3
    state = read_state(resumed)
    assert state["status"] == "interrupted"
    stopped_at = state["step"]
    assert stopped_at >= killed_at + 4
    assert (config.koala_dir / "checkpoints" / f"checkpoint-{stopped_at:08d}").is_dir()
    assert len(list((config.koala_dir / "checkpoints").glob("checkpoint-*"))) <= 3


def test_bad_input_is_refused_at_start_up_with_nothing_written(
    make_run: MakeRun, tmp_path: Path
) -> None:
    config, path = make_run(shards=1, per_shard=4)
    # resolution not divisible by the VAE factor
    bad = load_config(path, ["train.resolution=60"])
    with pytest.raises(ValueError, match="not divisible by 8"):
        run_stage("train", StageContext(bad))
    # teacher folder missing / not SDXL-shaped
    bad = load_config(path, [f"train.teacher={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json"):
        run_stage("train", StageContext(bad))
    sd = tmp_path / "sd15"
    sd.mkdir()
    (sd / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": [], "vae": []})
    )
    with pytest.raises(ValueError, match=r"not an SDXL pipeline.*text_encoder_2"):
        run_stage("train", StageContext(load_config(path, [f"train.teacher={sd}"])))
    # unknown preset: exit 2 from the command line, naming the key
    assert cli_main(["train", str(path), "train.preset=koala-300m"]) == 2
    # a corrupt checkpoint folder on resume
    broken = config.koala_dir / "checkpoints" / "checkpoint-00000005"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="checkpoint-00000005 is incomplete or corrupt"):
        run_stage("train", StageContext(config))
    assert cli_main(["train", str(path)]) == 2
    assert not (config.koala_dir / "train_state.json").exists()
    assert not (config.koala_dir / "pipeline").exists()
    # no shards at all
    for tar in (config.run_dir / "dataset" / "webdataset").glob("*.tar"):
        tar.unlink()
    with pytest.raises(FileNotFoundError, match="no training shards"):
        run_stage("train", StageContext(config))
    # sampling before training
    with pytest.raises(FileNotFoundError, match="run `recaption train CONFIG` first"):
        run_stage("sample", StageContext(config))


def test_prompts_file_replaces_the_prompt_list(tmp_path: Path) -> None:
    from recaption.config import SampleConfig

    path = tmp_path / "prompts.txt"
    path.write_text("# KOALA prompts\na red circle\n\n  a blue square  \n")
    assert sample_stage.read_prompts(SampleConfig(prompts_file=path)) == [
        "a red circle",
        "a blue square",
    ]
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        sample_stage.read_prompts(SampleConfig(prompts_file=path))


def test_train_refuses_a_half_merged_dataset_and_sees_a_changed_one(make_run: MakeRun) -> None:
    from tests.koala.conftest import write_shard

    config, path = make_run(shards=2, per_shard=4, train={"max_steps": 2})
    filtered = config.filtered_dir
    filtered.mkdir(parents=True)
    for shard in ("00000", "00001", "00002"):
        (filtered / f"{shard}_stats.json").write_text("{}")
    # Shard 00002 is filtered but not merged yet: training on the other two is refused.
    with pytest.raises(FileNotFoundError, match=r"merge is not complete.*00002"):
        run_stage("train", StageContext(config))
    assert cli_main(["train", str(path)]) == 2
    assert not (config.koala_dir / "checkpoints").exists()

    (filtered / "00002_stats.json").unlink()
    assert run_stage("train", StageContext(config)).ok
    # The dataset changes after training (a shard merged again): the done state is stamped
    # with the dataset, so the change is seen and refused without --overwrite.
    write_shard(config.stage_dir("merge") / "00001.tar", 5, seed=7)
    with pytest.raises(ConfigMismatchError, match=r"dataset"):
        run_stage("train", StageContext(config))
    summary = run_stage("train", StageContext(config, overwrite=True))
    assert summary.ok and summary.shards_ok == ["00000", "00001"]
    assert read_state(config)["step"] == 2


def test_resumed_training_ends_at_the_same_loss_as_an_uninterrupted_run(
    make_run: MakeRun,
) -> None:
    config, _ = make_run(train={"max_steps": 6, "checkpointing_steps": 3, "log_every": 3})
    assert run_stage("train", StageContext(config)).ok
    uninterrupted = read_log(config)[-1]
    # As if the run had died after checkpoint-3: its later outputs never written.
    koala = config.koala_dir
    shutil.rmtree(koala / "checkpoints" / "checkpoint-00000006")
    shutil.rmtree(koala / "pipeline")
    (koala / "pipeline_stats.json").unlink()
    assert run_stage("train", StageContext(config)).ok
    resumed = read_log(config)[-1]
    assert resumed["step"] == uninterrupted["step"] == 6
    assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-6, abs=1e-9)
    # Killed during the export: every step done, the pipeline half written. The rerun exports
    # again, removes the leftovers and reports the last logged loss, not "nan".
    shutil.rmtree(koala / "pipeline")
    (koala / "pipeline_stats.json").unlink()
    (koala / ".pipeline.tmp-99999").mkdir()
    summary = run_stage("train", StageContext(config))
    assert summary.ok and (koala / "pipeline" / "model_index.json").exists()
    assert not list(koala.glob(".pipeline.*"))
    assert f"loss {resumed['loss']:.4f}" in " ".join(summary.messages)


def test_captions_longer_than_the_text_encoders_are_counted_not_logged_per_batch(
    make_run: MakeRun, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.koala.conftest import write_shard

    config, _ = make_run(shards=1, per_shard=8, corrupt=False, train={"max_steps": 3})
    tail = ", drawn with many small details, thin outlines and soft shadows" * 2
    write_shard(config.stage_dir("merge") / "00000.tar", 8, seed=0, caption_tail=tail)
    # diffusers' loggers do not propagate to the root: listen on the pipeline's own logger.
    pipeline_logger = logging.getLogger(
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"
    )
    heard = logging.handlers.BufferingHandler(capacity=10_000)
    pipeline_logger.addHandler(heard)
    try:
        with caplog.at_level(logging.INFO):
            summary = run_stage("train", StageContext(config))
    finally:
        pipeline_logger.removeHandler(heard)
    assert summary.ok
    said_by_diffusers = [r.getMessage() for r in heard.buffer]
    assert not [m for m in said_by_diffusers if "truncated because CLIP" in m]  # not per batch
    state = read_state(config)
    assert state["captions_truncated"] > 0
    assert read_log(config)[-1]["captions_truncated"] == state["captions_truncated"]
    said = [m for m in summary.messages if "longer than the text encoders" in m]
    assert len(said) == 1 and said[0].startswith(f"{state['captions_truncated']} of ")
