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

import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from recaption.config import RunConfig, TrainConfig, fingerprint
from recaption.demo.models import resolve_model
from recaption.driver import SingleOutputStage
from recaption.ledger import (
    STATS_SUFFIX,
    StageSummary,
    list_shards,
    marker_digest,
)
from recaption.signals import ignore_stop_signals
from recaption.training.checkpoints import (
    TRAIN_LOG_FILE,
    TRAIN_STATE_FILE,
    TrainProgress,
    append_log,
    check_checkpoint,
    list_checkpoints,
    logged_terms,
    save_checkpoint,
    stretch_schedule,
    write_train_state,
)
from recaption.training.data import (
    TrainingSamples,
    collate,
    resume_positions,
    start_positions,
)
from recaption.training.distiller import TORCH_DTYPES, Distiller, check_teacher

logger = logging.getLogger(__name__)


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


def cached_dataset(config: RunConfig, merged: list[Path]) -> list[Path]:
    """The cache shards of the merged ones (``train.cache``), once ``recaption encode`` has
    encoded every one of them with the current teacher and preprocessing."""
    from recaption.ledger import ShardLedger
    from recaption.training.data import cache_config

    cache_dir = config.cache_dir
    ledger = ShardLedger("encode", cache_dir, cache_config(config.train))
    recorded = ledger.recorded_config()
    if recorded is not None and recorded.get("fingerprint") != ledger.fingerprint:
        raise ValueError(
            f"{cache_dir} was encoded with another teacher or preprocessing than train now "
            "uses; run `recaption encode CONFIG --overwrite`"
        )
    stamps = {p.stem: marker_digest(config.stage_dir("merge"), p.stem) for p in merged}
    ledger.set_input_stamps(stamps)
    missing = sorted(shard for shard in stamps if not ledger.is_done(shard))
    if missing:
        raise FileNotFoundError(
            f"train.cache is on but {len(missing)} merged shard(s) are not encoded (or changed "
            f"since): {', '.join(missing[:10])}; run `recaption encode CONFIG` first"
        )
    return [cache_dir / f"{shard}.safetensors" for shard in stamps]


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
# The stage
# ---------------------------------------------------------------------------------------------
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
        if cfg.cache:
            self.shards = cached_dataset(self.config, self.shards)
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
        # The markers of the files training reads: merged tars, or their cache.
        merge_dir = (
            self.config.cache_dir if self.config.train.cache else self.config.stage_dir("merge")
        )
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


@dataclass
class Session:
    """Everything the training loop touches, set up by :func:`prepare`."""

    accelerator: Any
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any
    progress: TrainProgress
    batches: Iterator[dict[str, Any]]
    readers: dict[int, tuple[int, int, int]]  # this process's readers' latest places
    resumed: bool
    cfg: TrainConfig

    @property
    def global_batch(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * self.accelerator.num_processes * cfg.gradient_accumulation_steps


def make_accelerator(cfg: TrainConfig, koala_dir: Path) -> Any:
    """accelerate's ``Accelerator``: mixed precision, accumulation, DDP, trackers."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    return Accelerator(
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


def prepare(stage: TrainStage) -> Session:
    """Accelerator, teacher and student, optimizer, EMA, resume, and the data stream."""
    from accelerate.utils import set_seed

    cfg, koala_dir = stage.config.train, stage.config.koala_dir
    accelerator = make_accelerator(cfg, koala_dir)
    # Listed after the Accelerator's rendezvous: rank 0 may just have reset the folder.
    checkpoints = list_checkpoints(koala_dir / "checkpoints")
    if checkpoints:
        check_checkpoint(checkpoints[-1])
    elif accelerator.is_main_process:  # a fresh start: no log lines of an abandoned attempt
        (koala_dir / TRAIN_LOG_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    device = accelerator.device
    if cfg.cpu_threads and device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)

    teacher_dtype = TORCH_DTYPES[cfg.teacher_dtype]
    teacher = Distiller.load_teacher(
        stage.teacher_spec,
        device,
        teacher_dtype,
        cfg.teacher_revision,
        cfg.teacher_variant,
        unet_only=cfg.cache,  # from the cache: no VAE encoder, no text encoders
    )
    if cfg.cache:
        logger.info(
            "training from %s: the VAE and text encoders are not loaded", stage.shards[0].parent
        )
    quiet_prompt_truncation()
    # Seeded once the teacher is loaded: loading may draw from the RNG (and training from the
    # cache loads fewer parts), so the student and the noise are the same either way.
    set_seed(cfg.seed, device_specific=True)  # each process draws its own noise
    distiller = Distiller(
        teacher,
        cfg.preset,
        device=device,
        teacher_dtype=teacher_dtype,
        resolution=cfg.resolution,
        weights=(cfg.task_loss_weight, cfg.output_kd_weight, cfg.feature_kd_weight),
        gradient_checkpointing=cfg.gradient_checkpointing,
        noise_offset=cfg.noise_offset,
        scaling_factor=Distiller.vae_scaling_factor(stage.teacher_spec, cfg.teacher_revision)
        if cfg.cache
        else None,
    )
    student = distiller.student
    optimizer, lr_scheduler, ema = optimizer_and_ema(student, cfg, device)
    distiller.student, optimizer = accelerator.prepare(student, optimizer)
    progress = TrainProgress(fingerprint=fingerprint(cfg.fingerprint_dict()))
    for state in (progress, lr_scheduler, ema):
        if state is not None:
            accelerator.register_for_checkpointing(state)
    if checkpoints:
        resume(accelerator, checkpoints[-1], progress, lr_scheduler, cfg)
    if ema is not None:
        ema.to(device)
    batches, readers = data_stream(stage, accelerator, progress)
    if cfg.report_to and accelerator.is_main_process:
        accelerator.init_trackers("koala", config=cfg.model_dump(mode="json"))
    return Session(
        accelerator,
        distiller,
        optimizer,
        lr_scheduler,
        ema,
        progress,
        batches,
        readers,
        resumed=bool(checkpoints),
        cfg=cfg,
    )


def optimizer_and_ema(
    student: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, Any, Any]:
    """AdamW, the LR schedule (warm-up, then ``lr_scheduler``) and the EMA of the weights."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

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
    return optimizer, lr_scheduler, ema


def resume(
    accelerator: Any, latest: Path, progress: TrainProgress, lr_scheduler: Any, cfg: TrainConfig
) -> None:
    """Load the newest checkpoint (the LR curve follows the current ``max_steps``)."""
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
    stretch_schedule(lr_scheduler, cfg, progress.step)  # max_steps may have been raised


def data_stream(
    stage: TrainStage, accelerator: Any, progress: TrainProgress
) -> tuple[Iterator[dict[str, Any]], dict[int, tuple[int, int, int]]]:
    """This process's batches, from where the checkpoint left every reader, and its readers."""
    cfg = stage.config.train
    n_readers = accelerator.num_processes * max(1, cfg.num_workers)
    start, start_epoch = resume_positions(progress.positions, progress.readers, n_readers)
    dataset = TrainingSamples(
        stage.shards,
        cfg,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start=start,
        start_epoch=start_epoch,
    )
    progress.positions = start_positions(start, start_epoch, n_readers)
    progress.readers = n_readers
    first = dataset.rank * dataset.workers
    readers = {r: tuple(progress.positions[str(r)]) for r in range(first, first + dataset.workers)}
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )
    # Starting the loader draws a base seed from the global RNG; restore the state around it
    # so a run resumed from a checkpoint (whose RNG state load_state restored) draws the same
    # noise and timesteps as the uninterrupted run from here on.
    rng_state = torch.get_rng_state()
    batches = iter(loader)
    torch.set_rng_state(rng_state)
    return batches, readers


class LossWindow:
    """Loss terms and images/s averaged over the steps since the last log line."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, device=device)  # total, task, out_kd, feat_kd
        self.n = self.images = 0
        self.start = time.perf_counter()

    def add(self, terms: tuple[torch.Tensor, ...], n_images: int) -> None:
        self.sums += torch.stack([t.detach().float() for t in terms])
        self.n += 1
        self.images += n_images

    def report(self, accelerator: Any, lr: float) -> dict[str, float]:
        """Mean terms over every process (a collective), then start a new window."""
        means = accelerator.reduce(self.sums / max(self.n, 1), "mean").tolist()
        seconds = max(time.perf_counter() - self.start, 1e-9)
        terms = dict(zip(("loss", "loss_task", "loss_out_kd", "loss_feat_kd"), means, strict=True))
        terms.update(lr=lr, images_per_second=self.images * accelerator.num_processes / seconds)
        self.sums.zero_()
        self.n = self.images = 0
        self.start = time.perf_counter()
        return terms


def sync(session: Session, skipped: int, truncated: int, stop: bool) -> bool:
    """After a step, on every process: every reader's place and the counts summed over
    processes (one gather, the same shape everywhere); True when any process was told to
    stop."""
    acc, progress = session.accelerator, session.progress
    rows = [[r, *place, skipped, truncated] for r, place in session.readers.items()]
    reached = acc.gather(torch.tensor(rows, device=acc.device)).tolist()
    for reader, epoch, unit, offset, _, _ in reached:
        progress.positions[str(reader)] = [epoch, unit, offset]
    progress.epoch = max(p[0] for p in progress.positions.values())
    per_process = reached[:: len(session.readers)]  # a process's counts repeat on its rows
    progress.samples_skipped += sum(r[4] for r in per_process)
    progress.captions_truncated += sum(r[5] for r in per_process)
    progress.samples_seen += session.global_batch
    return acc.reduce(torch.tensor([float(stop)], device=acc.device), "sum").item() > 0


def train(stage: TrainStage, summary: StageSummary) -> dict[str, Any]:
    """The training loop: batch, forward, loss, backward, clip, step, EMA, log, checkpoint."""
    cfg, koala_dir = stage.config.train, stage.config.koala_dir
    s = prepare(stage)
    acc, distiller, progress = s.accelerator, s.distiller, s.progress
    summary.rank, summary.world_size = acc.process_index, acc.num_processes
    logger.info(
        "training %s from %s: %d shard(s), resolution %d, %d process(es), global batch %d, "
        "steps %d -> %d",
        cfg.preset,
        cfg.teacher,
        len(stage.shards),
        cfg.resolution,
        acc.num_processes,
        s.global_batch,
        progress.step,
        cfg.max_steps,
    )
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc=f"train {cfg.preset}",
               disable=not acc.is_main_process, dynamic_ncols=True)  # fmt: skip
    window = LossWindow(acc.device)
    # Resumed at max_steps (a kill during the export): the last logged terms, not "nan".
    last_terms: dict[str, float] = logged_terms(koala_dir) if s.resumed else {}
    distiller.student.train()
    try:
        while progress.step < cfg.max_steps:
            skipped = truncated = 0
            for _ in range(cfg.gradient_accumulation_steps):  # micro-batches of one step
                batch = next(s.batches)
                skipped += batch["skipped"]
                if batch["captions"] is not None:  # cached: measured when encoded
                    truncated += count_truncated(distiller.teacher.tokenizer, batch["captions"])
                progress.shard_errors = sorted({*progress.shard_errors, *batch["shard_errors"]})
                with acc.accumulate(distiller.student):
                    terms = distiller.step(batch)
                    acc.backward(terms[0])
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(distiller.student.parameters(), cfg.max_grad_norm)
                    s.optimizer.step()
                    s.optimizer.zero_grad(set_to_none=True)
                window.add(terms, len(batch["keys"]))
                for reader, place in batch["positions"].items():
                    s.readers[reader] = max(s.readers[reader], place)
            s.lr_scheduler.step()
            if s.ema is not None:
                s.ema.step(acc.unwrap_model(distiller.student).parameters())
            progress.step += 1
            bar.update(1)
            stop_now = sync(s, skipped, truncated, stage.stop.requested)
            at_end = progress.step == cfg.max_steps
            if progress.step % cfg.log_every == 0 or at_end:
                last_terms = window.report(acc, s.lr_scheduler.get_last_lr()[0])
                log_step(s, koala_dir, cfg, last_terms, bar)
            if progress.step % cfg.checkpointing_steps == 0 or at_end or stop_now:
                save_checkpoint(acc, koala_dir / "checkpoints", progress.step, cfg)
                if acc.is_main_process:
                    write_train_state(koala_dir, progress, cfg, last_terms, "training")
            if stop_now and not at_end:
                summary.interrupted = True
                break
    finally:
        bar.close()
        distiller.remove_hooks()
    return finish(stage, s, summary, last_terms)


def log_step(
    s: Session, koala_dir: Path, cfg: TrainConfig, terms: dict[str, float], bar: Any
) -> None:
    """The progress bar, the trackers, ``train_log.jsonl`` and ``train_state.json``."""
    bar.set_postfix(
        loss=f"{terms['loss']:.4f}",
        task=f"{terms['loss_task']:.4f}",
        out=f"{terms['loss_out_kd']:.4f}",
        feat=f"{terms['loss_feat_kd']:.4f}",
        img_s=f"{terms['images_per_second']:.1f}",
    )
    progress = s.progress
    s.accelerator.log(terms, step=progress.step)
    if s.accelerator.is_main_process:
        record = {"step": progress.step, **terms, "captions_truncated": progress.captions_truncated}
        append_log(koala_dir / TRAIN_LOG_FILE, record)
        write_train_state(koala_dir, progress, cfg, terms, "training")


def finish(
    stage: TrainStage, s: Session, summary: StageSummary, last_terms: dict[str, float]
) -> dict[str, Any]:
    """Summarise; unless interrupted, export the pipeline (EMA weights when enabled)."""
    cfg, koala_dir = stage.config.train, stage.config.koala_dir
    acc, progress = s.accelerator, s.progress
    main = acc.is_main_process
    summary.samples_ok = progress.samples_seen
    summary.samples_failed = progress.samples_skipped
    for error in progress.shard_errors:
        shard, _, message = error.partition(": ")
        summary.shards_failed[shard] = message
    summary.shards_ok = [p.stem for p in stage.shards if p.stem not in summary.shards_failed]
    summary.shards_total = len(stage.shards)
    if summary.interrupted:
        if main:
            write_train_state(koala_dir, progress, cfg, last_terms, "interrupted")
        summary.messages.append(
            f"stopped at step {progress.step}; rerun to resume from the checkpoint"
        )
        acc.end_training()
        return {}
    # The teacher's VAE, text encoders, tokenizers and scheduler + the student U-Net.
    acc.wait_for_everyone()
    teacher = s.distiller.teacher
    if main and cfg.cache:  # the VAE and text encoders were not loaded: the export needs them
        teacher = Distiller.load_teacher(
            stage.teacher_spec,
            torch.device("cpu"),
            TORCH_DTYPES[cfg.teacher_dtype],
            cfg.teacher_revision,
            cfg.teacher_variant,
        )
    if main:
        unet = acc.unwrap_model(s.distiller.student)
        if s.ema is not None:
            s.ema.copy_to(unet.parameters())
        save_pipeline(teacher, unet, koala_dir / "pipeline", cfg)
        write_train_state(koala_dir, progress, cfg, last_terms, "finished")
    acc.wait_for_everyone()
    acc.end_training()
    if progress.captions_truncated:
        summary.messages.append(
            f"{progress.captions_truncated} of {progress.samples_seen} training captions were "
            f"longer than the text encoders' {teacher.tokenizer.model_max_length} tokens and "
            "were truncated (filter.text_tokens: trim cuts them at a sentence instead)"
        )
    loss = last_terms.get("loss")
    summary.messages.append(
        f"KOALA pipeline: {koala_dir / 'pipeline'} (step {progress.step}, loss "
        f"{'-' if loss is None else f'{loss:.4f}'}, skipped samples {progress.samples_skipped})"
    )
    return {
        "step": progress.step,
        "loss": loss,
        "samples_seen": progress.samples_seen,
        "n_ok": progress.samples_seen,
        "n_failed": progress.samples_skipped,
    }


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
tags: [koala, sdxl, knowledge-distillation]
{license_front_matter}
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

## License and use restrictions

{license_text}

## Training data

{data_text}
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
    from recaption.dataset_card import model_card_fields

    # The pipeline is run_dir/koala/pipeline; the dataset it was trained on is run_dir/dataset.
    terms = model_card_fields(cfg.teacher, folder.parent.parent / "dataset")
    (tmp / "README.md").write_text(
        MODEL_CARD.format(
            preset=cfg.preset,
            teacher=cfg.teacher,
            params=params,
            steps=cfg.max_steps,
            resolution=cfg.resolution,
            **terms,
        )
    )
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("KOALA pipeline written to %s", folder)
