"""Checkpoints and the training record: what a resumed run needs and what ``status`` reads.

- ``koala/checkpoints/checkpoint-NNNNNNNN/``: accelerate's ``save_state`` (student, optimizer,
  LR scheduler, EMA, RNG states, :class:`TrainProgress`), written under a temporary name and
  renamed, so a kill never leaves half a checkpoint;
- ``koala/train_state.json``: step, epoch, losses and counts, rewritten at every log step;
- ``koala/train_log.jsonl``: one line per logged step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recaption.config import TrainConfig
from recaption.ledger import write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_STATE_FILE = "train_state.json"
TRAIN_LOG_FILE = "train_log.jsonl"


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


def stretch_schedule(lr_scheduler: Any, cfg: TrainConfig, step: int) -> None:
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


def save_checkpoint(accelerator: Any, folder: Path, step: int, cfg: TrainConfig) -> None:
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


def logged_terms(koala_dir: Path) -> dict[str, float]:
    """The loss terms of the last line of ``train_log.jsonl`` (empty when there is none)."""
    try:
        lines = (koala_dir / TRAIN_LOG_FILE).read_text().splitlines()
        record = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, float)}


def append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_train_state(
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
