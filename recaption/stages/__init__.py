"""The pipeline's stages, in order. Each module has ``run(ctx: StageContext) -> StageSummary``.

Stage modules are imported only when their stage runs, so ``recaption --help`` stays fast
and a CPU-only download does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from recaption.config import STAGE_NAMES, RunConfig
from recaption.ledger import StageSummary


@dataclass
class StageContext:
    """What a stage needs to run: the config and which worker this is."""

    config: RunConfig
    rank: int = 0
    world_size: int = 1
    overwrite: bool = False


STAGE_HELP: dict[str, str] = {
    "download": "pre-filter metadata and download images into webdataset shards (img2dataset)",
    "caption": "write a new caption for every image with LLaVA, in GPU batches",
    "filter": "apply named caption rules: keep, clean or reject each caption",
    "merge": "join images, captions and decisions into webdataset + parquet + dataset card",
    "train": "distil the SDXL teacher into a KOALA student on the new pairs (accelerate)",
    "sample": "sample the trained KOALA pipeline (Euler, 25 steps, guidance 7.5)",
}


def stage_runner(name: str) -> Callable[[StageContext], StageSummary]:
    """The ``run`` function of stage ``name``."""
    if name not in STAGE_NAMES:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")
    module = importlib.import_module(f"recaption.stages.{name}")
    return module.run
