"""Reproduce the demo's trained models: ``python -m recaption.demo.train_models``.

Trains, on a CPU and from random weights, the three models the demo uses by default and writes
their ``save_pretrained`` folders to ``recaption/demo/weights/`` (or ``--out``):

- ``shapes-llava``: the captioner (:mod:`recaption.demo.train_llava`);
- ``shapes-sdxl``: the SDXL teacher, VAE and text encoders included
  (:mod:`recaption.demo.train_sdxl`);
- ``shapes-clip``: the CLIP the filter and the evaluation score with
  (:mod:`recaption.demo.train_clip`).

Each is trained on demo-world images drawn fresh from seeds no demo run or test draws with, and
records its seeds, steps, world version and measured quality in ``recaption_demo.json`` next to
its weights. A folder is written beside its target and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from recaption.demo.models import SHIPPED, WEIGHTS_DIR

logger = logging.getLogger(__name__)

# name -> "module:function"; each is ``fn(out: Path, **kwargs) -> dict``.
TRAINERS: dict[str, str] = {
    "shapes-llava": "recaption.demo.train_llava:train_llava",
    "shapes-sdxl": "recaption.demo.train_sdxl:train_sdxl",
    "shapes-clip": "recaption.demo.train_clip:train_clip",
}
# The shipped weights' arguments where they differ from the trainer's defaults (each
# folder's recaption_demo.json records them).
RECIPES: dict[str, dict[str, Any]] = {
    "shapes-llava": {},
    "shapes-sdxl": {"steps": 900, "vae_steps": 450},
    "shapes-clip": {"steps": 300},
}
# A smoke run's arguments (seconds, not minutes: the code path, not the quality).
SMOKE: dict[str, dict[str, Any]] = {
    "shapes-llava": {"steps": 2, "vision_steps": 2, "vision_bank_size": 16, "eval_images": 4},
    "shapes-sdxl": {"steps": 2},
    "shapes-clip": {"steps": 2},
}


def train_model(
    name: str, out_dir: Path, smoke: bool = False, device: str | None = None
) -> dict[str, Any]:
    """Train demo model ``name`` into ``out_dir / name``: the shipped recipe, or a smoke run.

    ``device`` (e.g. ``"cuda"``) is passed to trainers that take one; the others train on the
    CPU, and asking them for another device is an error.
    """
    if name not in TRAINERS:
        raise ValueError(f"unknown demo model {name!r}; trainable: {', '.join(TRAINERS)}")
    module, _, func = TRAINERS[name].partition(":")
    trainer = getattr(importlib.import_module(module), func)
    device_kwargs: dict[str, Any] = {}
    if device is not None:
        if "device" in inspect.signature(trainer).parameters:
            device_kwargs["device"] = device
        elif device != "cpu":
            raise ValueError(
                f"{name} trains on the CPU only; leave out --device or use --only shapes-llava"
            )
    final = Path(out_dir) / name
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = SMOKE[name] if smoke else RECIPES[name]
    logger.info("training %s (%s) into %s", name, SHIPPED.get(name, name), final)
    record = trainer(tmp, **kwargs, **device_kwargs)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return record


def main(argv: list[str] | None = None) -> int:
    """The command line: train the chosen (default: all) demo models."""
    parser = argparse.ArgumentParser(
        prog="python -m recaption.demo.train_models", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(TRAINERS), help="train just this model"
    )
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where the folders go")
    parser.add_argument(
        "--smoke", action="store_true", help="a few steps each: checks the code, not the models"
    )
    parser.add_argument(
        "--device", help="train on this torch device, e.g. cuda (shapes-llava; default: cpu)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in args.only or list(TRAINERS):
        try:
            record = train_model(name, args.out, args.smoke, args.device)
        except ValueError as exc:
            parser.error(str(exc))
        logger.info("%s: %s", name, json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
