"""The pipeline's stages, in order: the registry the command line and ``recaption run`` use.

Each entry names a stage class (:class:`recaption.driver.ShardedStage` or
:class:`recaption.driver.SingleOutputStage`) by ``module:Class``. Modules are imported only
when their stage runs, so ``recaption --help`` stays fast and a CPU-only download does not
import torch. Adding a stage is one module and one line here.
"""

from __future__ import annotations

import importlib

from recaption.driver import Stage, StageContext, run_stage
from recaption.ledger import StageSummary

STAGES: dict[str, str] = {
    "download": "recaption.stages.download:DownloadStage",
    "caption": "recaption.stages.caption:CaptionStage",
    "filter": "recaption.stages.filter:FilterStage",
    "merge": "recaption.stages.merge:MergeStage",
    "encode": "recaption.stages.encode:EncodeStage",
    "train": "recaption.stages.train:TrainStage",
    "sample": "recaption.stages.sample:SampleStage",
    "evaluate": "recaption.stages.evaluate:EvaluateStage",
}

STAGE_HELP: dict[str, str] = {
    "download": "pre-filter metadata and download images into webdataset shards (img2dataset)",
    "caption": "write a new caption for every image with LLaVA, in GPU batches",
    "filter": "apply named caption rules: keep, clean or reject each caption",
    "merge": "join images, captions and decisions into webdataset + parquet + dataset card",
    "encode": "precompute VAE latents and text embeddings for training (train.cache)",
    "train": "distil the SDXL teacher into a KOALA student on the new pairs (accelerate)",
    "sample": "sample the trained KOALA pipeline (Euler, 25 steps, guidance 7.5)",
    "evaluate": "score the trained pipeline on held-out prompts: CLIP score, judged attributes",
}

__all__ = ["STAGES", "STAGE_HELP", "StageContext", "run", "stage_class"]


def stage_class(name: str) -> type[Stage]:
    """The class of stage ``name``."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    module, _, cls = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def run(name: str, ctx: StageContext) -> StageSummary:
    """Run stage ``name`` for the worker ``ctx`` describes."""
    return run_stage(stage_class(name)(ctx))
