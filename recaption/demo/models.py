"""Tiny models for the demo and the tests, named ``demo:NAME`` in a config.

Two kinds, both loaded by every stage through the very same ``from_pretrained`` path a hub
checkpoint takes:

- trained (:data:`SHIPPED`): ``demo:shapes-llava`` (the captioner), ``demo:shapes-sdxl`` (the
  SDXL teacher) and ``demo:shapes-clip`` (the filter's and evaluation's CLIP) have learned the
  demo world; their ``save_pretrained`` folders ship with the package under
  ``recaption/demo/weights/`` and ``python -m recaption.demo.train_models`` reproduces them.
- random (:data:`BUILDERS`): ``demo:tiny-llava-1.5`` and the other ``tiny-*`` names resolve to
  a folder under the run's ``demo_models_dir``; the first use builds the model there (random
  weights, the same transformers/diffusers classes as the real checkpoints). The fast tests
  use them where only the shapes of models matter.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path

from recaption.config import RunConfig

logger = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"

# name -> ("module:function", keyword arguments); each builder is ``fn(path: Path, **kw)``.
BUILDERS: dict[str, tuple[str, dict[str, str]]] = {
    "tiny-llava-1.5": ("recaption.demo.tiny_models:build_tiny_llava", {"variant": "llava-1.5"}),
    "tiny-llava-next": ("recaption.demo.tiny_models:build_tiny_llava", {"variant": "llava-next"}),
    "tiny-clip": ("recaption.demo.tiny_models:build_tiny_clip", {}),
    "tiny-sdxl": ("recaption.demo.tiny_models:build_tiny_sdxl", {}),
}


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# name -> what it is; the folder is WEIGHTS_DIR / name.
SHIPPED: dict[str, str] = {
    "shapes-llava": "LLaVA-1.5 captioner trained on the demo world",
    "shapes-sdxl": "SDXL pipeline (VAE, text encoders, U-Net) trained on the demo world",
    "shapes-clip": "CLIP trained contrastively on demo-world images and descriptions",
}


def shipped_model(name: str) -> Path:
    """The folder of trained demo model ``name``, shipped with the package."""
    path = WEIGHTS_DIR / name
    if not (path / "config.json").exists() and not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"the trained demo model {name!r} is missing from {path}; this checkout lacks the "
            "shipped weights: reinstall the package, or reproduce them with "
            "python -m recaption.demo.train_models"
        )
    return path


def build_demo_model(name: str, path: Path) -> Path:
    """Build tiny model ``name`` into ``path`` unless it is already there.

    The model is written to a temporary folder and renamed into place, so concurrent workers
    (several ranks starting at once) never see half a model.
    """
    if name not in BUILDERS:
        known = ", ".join(sorted([*BUILDERS, *SHIPPED]))
        raise ValueError(f"unknown demo model {name!r}; known: {known}")
    path = Path(path)
    if path.exists():
        return path
    target, kwargs = BUILDERS[name]
    module_name, func_name = target.split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building tiny demo model %s in %s", name, path)
    builder(tmp, **kwargs)
    try:
        os.replace(tmp, path)
    except OSError:  # another worker got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(config: RunConfig, spec: str) -> str:
    """A hub id or folder as given, or the folder of demo model ``demo:NAME``.

    Trained demo models are the shipped folders; random ones are built on first use.
    """
    if not spec.startswith(DEMO_PREFIX):
        return spec
    name = spec[len(DEMO_PREFIX) :]
    if name in SHIPPED:
        return str(shipped_model(name))
    return str(build_demo_model(name, config.demo_models_dir / name))
