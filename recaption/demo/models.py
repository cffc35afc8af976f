"""Tiny models for the demo and the tests, named ``demo:NAME`` in a config.

A config value such as ``caption.model: demo:tiny-llava-1.5`` resolves to a folder under the
run's ``demo_models_dir``; the first use builds the model there (random weights, the same
transformers/diffusers classes as the real checkpoints) and ``save_pretrained``-s it, so every
stage then loads it through the very same ``from_pretrained`` path a hub checkpoint takes.
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


def build_demo_model(name: str, path: Path) -> Path:
    """Build tiny model ``name`` into ``path`` unless it is already there.

    The model is written to a temporary folder and renamed into place, so concurrent workers
    (several ranks starting at once) never see half a model.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(sorted(BUILDERS))}")
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
    """A hub id or folder as given, or the folder of demo model ``demo:NAME`` (built if absent)."""
    if not spec.startswith(DEMO_PREFIX):
        return spec
    name = spec[len(DEMO_PREFIX) :]
    return str(build_demo_model(name, config.demo_models_dir / name))
