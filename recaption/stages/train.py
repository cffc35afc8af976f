"""Train: distil the SDXL teacher into a KOALA student on the recaptioned pairs.

One training loop, readable top to bottom (nanoGPT style): get a batch, encode it with the
frozen teacher parts (VAE, both text encoders), add noise, run teacher and student, compute

    loss = w_task · MSE(ε_student, ε) + w_out · MSE(ε_student, ε_teacher)
           + w_feat · Σ_pairs MSE(attn1_student, attn1_teacher)

(KOALA's task + output + self-attention feature distillation), backward, clip, step, EMA, log,
checkpoint. accelerate supplies mixed precision, gradient accumulation, DDP across GPUs and
nodes (``accelerate launch -m recaption train CONFIG``) and ``save_state``/``load_state``.
Without CUDA the processes use gloo; note that ``accelerate launch --num_processes 2`` starts a
single process on a CPU-only machine, so there use ``accelerate launch --multi_gpu
--num_processes 2 -m recaption train CONFIG`` or ``torchrun --nproc_per_node 2 -m recaption
train CONFIG``.

Data is streamed from the merged shards, ``run_dir/dataset/webdataset/*.tar``, by
:mod:`recaption.training.data`: each process (and each of its DataLoader workers) reads only
the shards dealt to it for the epoch, in a seeded order that does not depend on how the tars
order their members. A checkpoint records every reader's place, so a resumed run continues the
same stream (with another number of processes: from the next epoch boundary).

Outputs in ``run_dir/koala/``: ``checkpoints/checkpoint-NNNNNNNN/`` (accelerate state),
``train_state.json`` (step, losses; read by ``recaption status``), ``train_log.jsonl`` (one
line per logged step) and, at the end, ``pipeline/``: a complete ``StableDiffusionXLPipeline``
folder with the student U-Net (EMA weights when enabled).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from tqdm.auto import tqdm

from recaption.config import RunConfig, TrainConfig, fingerprint
from recaption.demo.models import resolve_model
from recaption.driver import SingleOutputStage
from recaption.ledger import (
    STATS_SUFFIX,
    StageSummary,
    list_shards,
    marker_digest,
    write_json_atomic,
)
from recaption.signals import ignore_stop_signals
from recaption.training.data import (
    TrainingSamples,
    collate,
    resume_positions,
    start_positions,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_STATE_FILE = "train_state.json"
TRAIN_LOG_FILE = "train_log.jsonl"
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Start-up checks
# ---------------------------------------------------------------------------------------------
def merged_dataset(config: RunConfig) -> list[Path]:
    """The training shards: the merge stage's tars, once merge is complete for the run.

    Refuses to start while a shard the filter stage finished is not merged yet (naming it),
    so a half-merged dataset is never trained on without a word.
    """
    merge_dir = config.stage_dir("merge")
    merged = list_shards(merge_dir, STATS_SUFFIX)
    filtered = list_shards(config.filtered_dir, STATS_SUFFIX)
    missing = sorted(set(filtered) - set(merged))
    if missing:
        raise FileNotFoundError(
            f"merge is not complete: {len(missing)} filtered shard(s) are not merged into "
            f"{merge_dir} ({', '.join(missing[:10])}); run `recaption merge CONFIG` first"
        )
    tars = [merge_dir / f"{shard}.tar" for shard in merged]
    absent = [p for p in tars if not p.is_file()]
    if absent or not tars:
        raise FileNotFoundError(
            f"no training shards in {merge_dir}"
            + (f" ({', '.join(p.name for p in absent[:5])} missing)" if absent else "")
            + "; run `recaption merge CONFIG` first or point run_dir at a run whose dataset "
            "is merged"
        )
    return tars


def check_teacher(spec: str) -> None:
    """Refuse a local teacher folder that is missing or not an SDXL pipeline.

    Hub ids are checked when they load (``from_pretrained`` names the problem).
    """
    path = Path(spec)
    looks_local = path.is_absolute() or spec.startswith(".") or path.exists()
    if not looks_local:
        return
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"teacher {spec}: no model_index.json there; train.teacher must be an SDXL pipeline "
            "folder (save_pretrained of StableDiffusionXLPipeline) or a hub id such as "
            "stabilityai/stable-diffusion-xl-base-1.0"
        )
    components = json.loads(index.read_text())
    needed = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    missing = [c for c in needed if c not in components]
    if missing:
        raise ValueError(
            f"teacher {spec} is not an SDXL pipeline ({components.get('_class_name')}, missing "
            f"{', '.join(missing)}); KOALA distils StableDiffusionXLPipeline checkpoints"
        )


def list_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporaries skipped)."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def check_checkpoint(path: Path) -> None:
    """Raise ``RuntimeError`` when a checkpoint folder lacks the files accelerate writes."""
    names = {p.name for p in path.iterdir()}
    has_model = any(n.startswith("model") for n in names)
    has_optimizer = any(n.startswith("optimizer") for n in names)
    has_progress = any(n.startswith("custom_checkpoint_") for n in names)
    if not (has_model and has_optimizer and has_progress):
        raise RuntimeError(
            f"checkpoint {path} is incomplete or corrupt (files: {', '.join(sorted(names))}); "
            "delete that folder to resume from the checkpoint before it, or pass --overwrite "
            "to start training over"
        )


# diffusers warns once per batch when a prompt is longer than CLIP reads; the training loop
# counts those captions instead (train_log.jsonl, train_state.json) and says so once.
_TRUNCATION_WARNING = "truncated because CLIP can only handle"


class _QuietTruncation(logging.Filter):
    """Drop diffusers' per-batch "input was truncated" warning (counted, not flooded)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _TRUNCATION_WARNING not in record.getMessage()


def quiet_prompt_truncation() -> None:
    """Install :class:`_QuietTruncation` on the SDXL pipeline's logger (idempotent)."""
    pipeline_logger = logging.getLogger(
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"
    )
    if not any(isinstance(f, _QuietTruncation) for f in pipeline_logger.filters):
        pipeline_logger.addFilter(_QuietTruncation())


def count_truncated(tokenizer: Any, captions: list[str]) -> int:
    """How many captions are longer than the tokenizer's context (they get truncated)."""
    limit = tokenizer.model_max_length
    ids = tokenizer(captions, truncation=False, add_special_tokens=True)["input_ids"]
    return sum(len(i) > limit for i in ids)


# ---------------------------------------------------------------------------------------------
# Training state that travels in every checkpoint
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainProgress:
    """Step counter and data position, saved with ``accelerator.save_state``."""

    step: int = 0
    epoch: int = 0  # the furthest epoch any reader reached
    positions: dict[str, list[int]] = field(default_factory=dict)  # reader -> epoch, unit, offset
    readers: int = 0  # processes x DataLoader workers when positions were recorded
    samples_seen: int = 0
    samples_skipped: int = 0
    captions_truncated: int = 0  # longer than the text encoders read (counted, not logged)
    shard_errors: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def add_time_ids(
    original_sizes: list[tuple[int, int]],
    crops_top_left: list[tuple[int, int]],
    resolution: int,
) -> torch.Tensor:
    """SDXL micro-conditioning: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    rows = [
        [*size, *crop, resolution, resolution]
        for size, crop in zip(original_sizes, crops_top_left, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float32)


class TrainStage(SingleOutputStage):
    """Distil the teacher into the student; write checkpoints, state and the final pipeline."""

    name = "train"
    output_name = "pipeline"
    main_rank_only = False  # every accelerate process trains; rank 0 keeps the ledger

    @property
    def output_dir(self) -> Path:
        return self.config.koala_dir

    def check(self) -> None:
        """Everything that can be wrong is found before anything is written."""
        cfg = self.config.train
        self.shards = merged_dataset(self.config)
        if cfg.resolution % 8:
            raise ValueError(
                f"train.resolution {cfg.resolution} is not divisible by 8 (the VAE's "
                "downsampling factor); use e.g. 1024, 512 or 64"
            )
        self.teacher_spec = resolve_model(self.config, cfg.teacher)
        check_teacher(self.teacher_spec)
        checkpoints = list_checkpoints(self.config.koala_dir / "checkpoints")
        if checkpoints and not self.ctx.overwrite:
            check_checkpoint(checkpoints[-1])

    def stage_config(self) -> dict[str, Any]:
        # The dataset trained on is part of what decides the output: a changed dataset is a
        # changed config (refused without --overwrite; training on it starts over).
        merge_dir = self.config.stage_dir("merge")
        return {
            **self.config.train.fingerprint_dict(),
            "dataset": {
                "shards": len(self.shards),
                "digest": fingerprint(
                    [[p.stem, marker_digest(merge_dir, p.stem)] for p in self.shards]
                ),
            },
        }

    def input_stamp(self) -> Any:
        # max_steps is operational (raising it extends a run); a new value is not done yet.
        return {"max_steps": self.config.train.max_steps}

    def reset(self) -> None:
        koala_dir = self.config.koala_dir
        logger.warning("train config or dataset changed and --overwrite given: starting over")
        shutil.rmtree(koala_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(koala_dir / "pipeline", ignore_errors=True)
        for name in (TRAIN_STATE_FILE, TRAIN_LOG_FILE):
            (koala_dir / name).unlink(missing_ok=True)

    def run_once(self, summary: StageSummary) -> dict[str, Any]:
        return train(self, summary)


def train(stage: TrainStage, summary: StageSummary) -> dict[str, Any]:
    """The training loop (see the module docstring); returns the final state."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from recaption.models.koala import (
        SelfAttentionFeatures,
        aligned_self_attention_pairs,
        init_student_from_teacher,
    )

    config: RunConfig = stage.config
    cfg = config.train
    koala_dir = config.koala_dir
    checkpoints_dir = koala_dir / "checkpoints"
    pipeline_dir = koala_dir / "pipeline"
    shards = stage.shards
    teacher_spec = stage.teacher_spec
    run_fingerprint = fingerprint(cfg.fingerprint_dict())

    accelerator = Accelerator(
        # Without CUDA, processes started by torchrun / `accelerate launch --multi_gpu` talk gloo.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(koala_dir), logging_dir=str(koala_dir / "logs")
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    main = accelerator.is_main_process
    device = accelerator.device
    summary.rank, summary.world_size = accelerator.process_index, accelerator.num_processes
    # Listed after the Accelerator's rendezvous: rank 0 may just have reset the folder.
    checkpoints = list_checkpoints(checkpoints_dir)
    if checkpoints:
        check_checkpoint(checkpoints[-1])

    if main and not checkpoints:  # a fresh start: no log lines of an abandoned attempt
        (koala_dir / TRAIN_LOG_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    set_seed(cfg.seed, device_specific=True)  # each process draws its own noise
    if cfg.cpu_threads and device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)

    # -- teacher: frozen, in teacher_dtype; its VAE, text encoders, tokenizers are reused -----
    teacher_dtype = _TORCH_DTYPES[cfg.teacher_dtype]
    try:
        teacher = StableDiffusionXLPipeline.from_pretrained(
            teacher_spec,
            torch_dtype=teacher_dtype,
            revision=cfg.teacher_revision,
            variant=cfg.teacher_variant,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"teacher {cfg.teacher} could not be loaded: {exc}") from exc
    teacher.set_progress_bar_config(disable=True)
    quiet_prompt_truncation()
    vae_dtype = torch.float32 if teacher.vae.config.get("force_upcast", True) else teacher_dtype
    teacher.vae.to(device, dtype=vae_dtype)
    for module in (teacher.text_encoder, teacher.text_encoder_2, teacher.unet):
        module.to(device)
    for module in (teacher.vae, teacher.text_encoder, teacher.text_encoder_2, teacher.unet):
        module.requires_grad_(False).eval()
    noise_scheduler = DDPMScheduler.from_config(teacher.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    scaling_factor = teacher.vae.config.scaling_factor

    # -- student: compressed U-Net initialised from the teacher -------------------------------
    student = init_student_from_teacher(teacher.unet, cfg.preset).to(device)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    pairs = aligned_self_attention_pairs(student, teacher.unet)
    student_features = SelfAttentionFeatures(student, [s for s, _ in pairs])
    teacher_features = SelfAttentionFeatures(teacher.unet, [t for _, t in pairs])
    logger.info("distilling %d self-attention pairs", len(pairs))

    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    # Stepped once per optimizer step (not prepared), so a resume with another process count
    # keeps the same schedule.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
    )
    ema = None
    if cfg.use_ema:
        ema = EMAModel(
            student.parameters(),
            decay=cfg.ema_decay,
            model_cls=type(student),
            model_config=student.config,
        )
        ema.to(device)
    student, optimizer = accelerator.prepare(student, optimizer)
    progress = TrainProgress(fingerprint=run_fingerprint)
    accelerator.register_for_checkpointing(progress)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # -- resume from the newest checkpoint -----------------------------------------------------
    if checkpoints:
        latest = checkpoints[-1]
        try:
            accelerator.load_state(str(latest))
        except Exception as exc:
            raise RuntimeError(
                f"checkpoint {latest} could not be loaded ({type(exc).__name__}: {exc}); delete "
                "that folder to resume from the one before, or pass --overwrite to start over"
            ) from exc
        logger.info(
            "resuming from %s at step %d (epoch %d)", latest.name, progress.step, progress.epoch
        )
        # The LR follows max_steps, which may have been raised to extend a finished run.
        _stretch_schedule(lr_scheduler, cfg, progress.step)
    if ema is not None:
        ema.to(device)

    n_readers = accelerator.num_processes * max(1, cfg.num_workers)
    start, start_epoch = resume_positions(progress.positions, progress.readers, n_readers)
    dataset = TrainingSamples(
        shards,
        cfg,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start=start,
        start_epoch=start_epoch,
    )
    progress.positions = start_positions(start, start_epoch, n_readers)
    progress.readers = n_readers
    # This process's readers' latest places, sent to every process at each step.
    mine = {
        r: tuple(progress.positions[str(r)])
        for r in range(dataset.rank * dataset.workers, (dataset.rank + 1) * dataset.workers)
    }
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )
    if cfg.report_to and main:
        accelerator.init_trackers("koala", config=cfg.model_dump(mode="json"))

    # SIGTERM / SIGUSR1 (SLURM preemption, caught by the driver): finish the step,
    # checkpoint, exit.
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    logger.info(
        "training %s from %s: %d shard(s), resolution %d, %d process(es), global batch %d, "
        "steps %d -> %d",
        cfg.preset,
        cfg.teacher,
        len(shards),
        cfg.resolution,
        accelerator.num_processes,
        global_batch,
        progress.step,
        cfg.max_steps,
    )
    bar = tqdm(
        total=cfg.max_steps,
        initial=progress.step,
        desc=f"train {cfg.preset}",
        disable=not main,
        dynamic_ncols=True,
    )
    weights = (cfg.task_loss_weight, cfg.output_kd_weight, cfg.feature_kd_weight)
    running = torch.zeros(4, device=device)  # total, task, out_kd, feat_kd over the log window
    n_running, window_start, window_images = 0, time.perf_counter(), 0
    # Resumed at max_steps (a kill during the export): the last logged terms, not "nan".
    last_terms: dict[str, float] = _logged_terms(koala_dir) if checkpoints else {}
    student.train()
    # Starting the loader draws a base seed from the global RNG; restore the state around it
    # so a run resumed from a checkpoint (whose RNG state load_state restored) draws the same
    # noise and timesteps as the uninterrupted run from here on.
    rng_state = torch.get_rng_state()
    batches = iter(loader)
    torch.set_rng_state(rng_state)
    try:
        while progress.step < cfg.max_steps:
            # ---- one optimizer step: gradient_accumulation_steps micro-batches ----
            step_skipped = step_truncated = 0
            for _ in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                step_skipped += batch["skipped"]
                step_truncated += count_truncated(teacher.tokenizer, batch["captions"])
                progress.shard_errors = sorted({*progress.shard_errors, *batch["shard_errors"]})
                with accelerator.accumulate(student):
                    terms = distillation_step(
                        batch,
                        teacher=teacher,
                        student=student,
                        noise_scheduler=noise_scheduler,
                        pairs=pairs,
                        student_features=student_features,
                        teacher_features=teacher_features,
                        resolution=cfg.resolution,
                        scaling_factor=scaling_factor,
                        prediction_type=prediction_type,
                        teacher_dtype=teacher_dtype,
                        weights=weights,
                        device=device,
                    )
                    accelerator.backward(terms[0])
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                running += torch.stack([t.detach().float() for t in terms])
                n_running += 1
                window_images += len(batch["captions"])
                for reader, place in batch["positions"].items():
                    mine[reader] = max(mine[reader], place)
            lr_scheduler.step()
            if ema is not None:
                ema.step(accelerator.unwrap_model(student).parameters())
            progress.step += 1
            bar.update(1)

            # Every reader's place for the checkpoint, and the counts summed over processes.
            # Every process runs these collectives (the same tensor shape on each).
            rows = [[r, *place, step_skipped, step_truncated] for r, place in mine.items()]
            reached = accelerator.gather(torch.tensor(rows, device=device)).tolist()
            for reader, epoch, unit, offset, _, _ in reached:
                progress.positions[str(reader)] = [epoch, unit, offset]
            progress.epoch = max(p[0] for p in progress.positions.values())
            per_process = reached[:: len(mine)]  # the counts are repeated on a process's rows
            progress.samples_skipped += sum(r[4] for r in per_process)
            progress.captions_truncated += sum(r[5] for r in per_process)
            progress.samples_seen += global_batch
            stop_now = (
                accelerator.reduce(
                    torch.tensor([float(stage.stop.requested)], device=device), "sum"
                ).item()
                > 0
            )

            if progress.step % cfg.log_every == 0 or progress.step == cfg.max_steps:
                means = accelerator.reduce(running / max(n_running, 1), "mean").tolist()
                elapsed = time.perf_counter() - window_start
                images_per_second = window_images * accelerator.num_processes / max(elapsed, 1e-9)
                last_terms = {
                    "loss": means[0],
                    "loss_task": means[1],
                    "loss_out_kd": means[2],
                    "loss_feat_kd": means[3],
                    "lr": lr_scheduler.get_last_lr()[0],
                    "images_per_second": images_per_second,
                }
                bar.set_postfix(
                    loss=f"{means[0]:.4f}",
                    task=f"{means[1]:.4f}",
                    out=f"{means[2]:.4f}",
                    feat=f"{means[3]:.4f}",
                    img_s=f"{images_per_second:.1f}",
                )
                accelerator.log(last_terms, step=progress.step)
                if main:
                    _append_log(
                        koala_dir / TRAIN_LOG_FILE,
                        {
                            "step": progress.step,
                            **last_terms,
                            "captions_truncated": progress.captions_truncated,
                        },
                    )
                    _write_train_state(koala_dir, progress, cfg, last_terms, "training")
                running.zero_()
                n_running, window_start, window_images = 0, time.perf_counter(), 0

            at_end = progress.step == cfg.max_steps
            if progress.step % cfg.checkpointing_steps == 0 or at_end or stop_now:
                _save_checkpoint(accelerator, checkpoints_dir, progress.step, cfg)
                if main:
                    _write_train_state(koala_dir, progress, cfg, last_terms, "training")
            if stop_now and not at_end:
                summary.interrupted = True
                break
    finally:
        bar.close()
        student_features.remove()
        teacher_features.remove()

    summary.samples_ok = progress.samples_seen
    summary.samples_failed = progress.samples_skipped
    for error in progress.shard_errors:
        shard, _, message = error.partition(": ")
        summary.shards_failed[shard] = message
    summary.shards_ok = [p.stem for p in shards if p.stem not in summary.shards_failed]
    if summary.interrupted:
        if main:
            _write_train_state(koala_dir, progress, cfg, last_terms, "interrupted")
        summary.messages.append(
            f"stopped at step {progress.step}; rerun to resume from the checkpoint"
        )
        accelerator.end_training()
        return {}

    # -- export: teacher's VAE, text encoders, tokenizers, scheduler + the student U-Net -------
    accelerator.wait_for_everyone()
    if main:
        unet = accelerator.unwrap_model(student)
        if ema is not None:
            ema.copy_to(unet.parameters())
        save_pipeline(teacher, unet, pipeline_dir, cfg)
        _write_train_state(koala_dir, progress, cfg, last_terms, "finished")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if progress.captions_truncated:
        summary.messages.append(
            f"{progress.captions_truncated} of {progress.samples_seen} training captions were "
            f"longer than the text encoders' {teacher.tokenizer.model_max_length} tokens and "
            "were truncated (filter.text_tokens: trim cuts them at a sentence instead)"
        )
    loss = last_terms.get("loss")
    summary.messages.append(
        f"KOALA pipeline: {pipeline_dir} (step {progress.step}, loss "
        f"{'-' if loss is None else f'{loss:.4f}'}, skipped samples {progress.samples_skipped})"
    )
    return {
        "step": progress.step,
        "loss": loss,
        "samples_seen": progress.samples_seen,
        "n_ok": progress.samples_seen,
        "n_failed": progress.samples_skipped,
    }


def distillation_step(
    batch: dict[str, Any],
    *,
    teacher: Any,
    student: torch.nn.Module,
    noise_scheduler: Any,
    pairs: list[tuple[str, str]],
    student_features: Any,
    teacher_features: Any,
    resolution: int,
    scaling_factor: float,
    prediction_type: str,
    teacher_dtype: torch.dtype,
    weights: tuple[float, float, float],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: ``(loss, task, output KD, feature KD)``, loss not yet scaled.

    ``weights`` are ``(w_task, w_out, w_feat)``; a zero weight skips that term's work (with
    ``w_out == w_feat == 0`` the teacher U-Net is not run: a plain fine-tune step).
    """
    w_task, w_out, w_feat = weights
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=teacher.vae.dtype)
        latents = teacher.vae.encode(pixels).latent_dist.sample() * scaling_factor
        latents = latents.float()
        prompt_embeds, _, pooled_embeds, _ = teacher.encode_prompt(
            batch["captions"], device=device, do_classifier_free_guidance=False
        )
        time_ids = add_time_ids(batch["original_sizes"], batch["crops_top_left"], resolution)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
    ).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = (
        noise_scheduler.get_velocity(latents, noise, timesteps)
        if prediction_type == "v_prediction"
        else noise
    )
    cond = {"text_embeds": pooled_embeds, "time_ids": time_ids.to(device)}
    zero = torch.zeros((), device=device)
    teacher_pred = None
    if w_out or w_feat:
        with torch.no_grad(), teacher_features.record():
            teacher_pred = teacher.unet(
                noisy.to(teacher_dtype),
                timesteps,
                prompt_embeds.to(teacher_dtype),
                added_cond_kwargs={k: v.to(teacher_dtype) for k, v in cond.items()},
            ).sample
    with student_features.record() if w_feat else contextlib.nullcontext():
        student_pred = student(
            noisy,
            timesteps,
            prompt_embeds.float(),
            added_cond_kwargs={k: v.float() for k, v in cond.items()},
        ).sample
    student_pred = student_pred.float()
    task = F.mse_loss(student_pred, target.float()) if w_task else zero
    out_kd = F.mse_loss(student_pred, teacher_pred.float()) if teacher_pred is not None else zero
    feat_kd = zero
    if w_feat:
        feat_kd = sum(
            F.mse_loss(student_features.outputs[s].float(), teacher_features.outputs[t].float())
            for s, t in pairs
        )
    loss = w_task * task + w_out * out_kd + w_feat * feat_kd
    return loss, task, out_kd, feat_kd


def _stretch_schedule(lr_scheduler: Any, cfg: TrainConfig, step: int) -> None:
    """Give the scheduler the LR curve for the current ``max_steps``, keeping its step count.

    The resumed scheduler is the object registered for checkpointing, so it is updated in
    place: the new curve's ``lr_lambdas``, then one public ``step()`` from ``step - 1``, which
    sets every group's LR (and ``get_last_lr()``) for ``step``.
    """
    from diffusers.optimization import get_scheduler

    fresh = get_scheduler(
        cfg.lr_scheduler,
        optimizer=lr_scheduler.optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
    )
    lr_scheduler.lr_lambdas = fresh.lr_lambdas
    lr_scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": none ran in this process
        warnings.simplefilter("ignore", UserWarning)
        lr_scheduler.step()


def _save_checkpoint(accelerator: Any, folder: Path, step: int, cfg: TrainConfig) -> None:
    """``save_state`` into a temporary folder, then rename it (a kill never leaves half)."""
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        limit = cfg.checkpoints_total_limit
        if limit is not None and limit > 0:
            for old in list_checkpoints(folder)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


def _logged_terms(koala_dir: Path) -> dict[str, float]:
    """The loss terms of the last line of ``train_log.jsonl`` (empty when there is none)."""
    try:
        lines = (koala_dir / TRAIN_LOG_FILE).read_text().splitlines()
        record = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, float)}


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _write_train_state(
    koala_dir: Path,
    progress: TrainProgress,
    cfg: TrainConfig,
    terms: dict[str, float],
    status: str,
) -> None:
    state = {
        "status": status,
        "step": progress.step,
        "max_steps": cfg.max_steps,
        "preset": cfg.preset,
        "teacher": cfg.teacher,
        "epoch": progress.epoch,
        "samples_seen": progress.samples_seen,
        "samples_skipped": progress.samples_skipped,
        "captions_truncated": progress.captions_truncated,
        "shard_errors": progress.shard_errors,
        "latest_checkpoint": (
            str(list_checkpoints(koala_dir / "checkpoints")[-1].name)
            if list_checkpoints(koala_dir / "checkpoints")
            else None
        ),
        **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in terms.items()},
    }
    write_json_atomic(koala_dir / TRAIN_STATE_FILE, state)


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
tags: [koala, sdxl, knowledge-distillation]
---
# {preset} distilled from {teacher}

A KOALA student U-Net ({preset}, {params:.0f}M parameters) distilled from the SDXL teacher
`{teacher}` with task, output and self-attention feature distillation, for {steps} steps at
{resolution}px. The VAE, text encoders, tokenizers and scheduler are the teacher's.

```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("PATH", torch_dtype=torch.float16).to("cuda")
image = pipe(
    prompt="A portrait painting of a Golden Retriever like Leonard da Vinci",
    negative_prompt="worst quality, low quality, illustration, low resolution",
    num_inference_steps=25,
    guidance_scale=7.5,
).images[0]
```
"""


def save_pipeline(teacher: Any, unet: torch.nn.Module, folder: Path, cfg: TrainConfig) -> None:
    """Write a complete ``StableDiffusionXLPipeline`` folder (safetensors) atomically."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        text_encoder_2=teacher.text_encoder_2,
        tokenizer=teacher.tokenizer,
        tokenizer_2=teacher.tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(teacher.scheduler.config),
        force_zeros_for_empty_prompt=teacher.config.get("force_zeros_for_empty_prompt", True),
    )
    # Leftovers of an export that was killed (only the claim holder gets here).
    for stale in folder.parent.glob(f".{folder.name}.*-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    (tmp / "README.md").write_text(
        MODEL_CARD.format(
            preset=cfg.preset,
            teacher=cfg.teacher,
            params=params,
            steps=cfg.max_steps,
            resolution=cfg.resolution,
        )
    )
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("KOALA pipeline written to %s", folder)
