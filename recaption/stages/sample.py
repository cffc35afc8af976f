"""Sample: generate images with the trained KOALA pipeline (and optionally its SDXL teacher).

Reads ``run_dir/koala/pipeline`` (or ``sample.model``) with
``StableDiffusionXLPipeline.from_pretrained`` exactly as the model card does, samples every
prompt once per seed with KOALA's published settings (Euler discrete, 25 steps, guidance 7.5,
negative prompt "worst quality, low quality, illustration, low resolution", 1024x1024) and
writes, in ``run_dir/samples/``:

- ``{model}/{prompt:04d}_seed{seed}.png`` for ``model`` in ``koala`` (and ``teacher``);
- ``samples.parquet``: one row per image: model, prompt, seed, file, steps, guidance,
  height, width, seconds (per image) and ``clip_score`` when ``sample.clip_model`` is set;
- ``grid.png``: one row per prompt (the prompt written on the left), one column per model and
  seed, so student and teacher sit side by side.

Sampling runs on one worker (rank 0); the other ranks of a multi-process launch return.
"""

from __future__ import annotations

import logging
import textwrap
import time
from pathlib import Path
from typing import Any

from recaption.config import RunConfig, SampleConfig
from recaption.demo.models import resolve_model
from recaption.driver import SingleOutputStage
from recaption.ledger import StageSummary, atomic_path
from recaption.signals import StopSignals

logger = logging.getLogger(__name__)

GRID_FILE = "grid.png"
TABLE_FILE = "samples.parquet"


def read_prompts(cfg: SampleConfig) -> list[str]:
    """The prompts: ``prompts_file`` (one a line, blank lines and ``#`` comments skipped)
    when set, else ``prompts``."""
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"sample.prompts_file {path} does not exist")
        prompts = [
            line.strip()
            for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if not prompts:
            raise ValueError(f"sample.prompts_file {path} holds no prompts")
        return prompts
    if not cfg.prompts:
        raise ValueError("sample.prompts is empty; give prompts or sample.prompts_file")
    return list(cfg.prompts)


def pipeline_path(config: RunConfig) -> str:
    """The pipeline to sample: ``sample.model`` (resolved) or ``run_dir/koala/pipeline``."""
    if config.sample.model:
        spec = resolve_model(config, config.sample.model)
    else:
        spec = str(config.koala_dir / "pipeline")
    path = Path(spec)
    if (path.is_absolute() or path.exists() or not config.sample.model) and not (
        path / "model_index.json"
    ).is_file():
        raise FileNotFoundError(
            f"no diffusers pipeline at {path} (model_index.json missing); run "
            "`recaption train CONFIG` first or set sample.model to a pipeline folder or hub id"
        )
    return spec


def _model_stamp(spec: str) -> str:
    """Changes when the sampled weights change (a local pipeline retrained in place)."""
    path = Path(spec)
    if not path.is_dir():
        return spec
    files = sorted(path.glob("unet/*.safetensors"))
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


class SampleStage(SingleOutputStage):
    """Sample the KOALA pipeline (and the teacher when asked); write PNGs, grid and table."""

    name = "sample"
    output_name = "samples"

    def check(self) -> None:
        cfg = self.config.sample
        self.prompts = read_prompts(cfg)
        if cfg.height % 8 or cfg.width % 8:
            raise ValueError(
                f"sample.height/width {cfg.height}x{cfg.width} must be divisible by 8 "
                "(the VAE's downsampling factor)"
            )
        if not cfg.seeds:
            raise ValueError("sample.seeds is empty; give at least one seed")
        self.models = {"koala": pipeline_path(self.config)}
        if cfg.with_teacher:
            self.models["teacher"] = resolve_model(self.config, self.config.train.teacher)
        self.clip_spec = resolve_model(self.config, cfg.clip_model) if cfg.clip_model else None

    def stage_config(self) -> dict[str, Any]:
        return {
            **self.config.sample.fingerprint_dict(),
            "prompts": self.prompts,
            "models": dict(self.models),
        }

    def input_stamp(self) -> Any:
        # Retraining the pipeline in place changes the stamp: the samples are then redone.
        return {name: _model_stamp(spec) for name, spec in self.models.items()}

    def run_once(self, summary: StageSummary) -> dict[str, Any]:
        cfg = self.config.sample
        rows = sample_all(self.config, self.prompts, self.models, self.clip_spec, self.stop)
        write_outputs(self.config.samples_dir, rows, self.prompts, cfg)
        summary.messages.append(f"samples grid: {self.config.samples_dir / GRID_FILE}")
        return {
            "n_input": len(rows),
            "n_ok": len(rows),
            "n_failed": 0,
            "seconds_per_image": {
                name: sum(r["seconds"] for r in rows if r["model"] == name)
                / max(1, sum(r["model"] == name for r in rows))
                for name in self.models
            },
        }


def _dtype_and_device(cfg: SampleConfig) -> tuple[Any, str]:
    import torch

    from recaption.distributed import default_device

    device = cfg.device or default_device()
    if cfg.dtype == "auto":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return dtype, device


def sample_all(
    config: RunConfig,
    prompts: list[str],
    models: dict[str, str],
    clip_spec: str | None,
    stop: StopSignals,
) -> list[dict[str, Any]]:
    """Sample every (prompt, seed) with every model; returns one row per image."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from tqdm.auto import tqdm

    cfg = config.sample
    dtype, device = _dtype_and_device(cfg)
    if cfg.cpu_threads and device == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    jobs = [(p, prompt, seed) for p, prompt in enumerate(prompts) for seed in cfg.seeds]
    rows: list[dict[str, Any]] = []
    for name, spec in models.items():
        pipe = StableDiffusionXLPipeline.from_pretrained(spec, torch_dtype=dtype)
        # KOALA's published sampler, whatever scheduler the folder was saved with.
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        out_dir = config.samples_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(jobs), desc=f"sample {name}", unit="img")
        for start in range(0, len(jobs), cfg.batch_size):
            stop.check()
            batch = jobs[start : start + cfg.batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(s) for _, _, s in batch]
            t0 = time.perf_counter()
            images = pipe(
                prompt=[prompt for _, prompt, _ in batch],
                negative_prompt=[cfg.negative_prompt] * len(batch),
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
                height=cfg.height,
                width=cfg.width,
                generator=generators,
            ).images
            seconds = (time.perf_counter() - t0) / len(batch)
            for (p, prompt, seed), image in zip(batch, images, strict=True):
                file = out_dir / f"{p:04d}_seed{seed}.png"
                with atomic_path(file) as tmp:
                    image.save(tmp, format="PNG")
                rows.append(
                    {
                        "model": name,
                        "model_path": spec,
                        "prompt": prompt,
                        "prompt_index": p,
                        "seed": seed,
                        "file": str(file.relative_to(config.samples_dir)),
                        "steps": cfg.num_inference_steps,
                        "guidance": cfg.guidance_scale,
                        "negative_prompt": cfg.negative_prompt,
                        "height": cfg.height,
                        "width": cfg.width,
                        "seconds": round(seconds, 4),
                        "image": image,
                    }
                )
            bar.update(len(batch))
        bar.close()
        del pipe
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if clip_spec is not None:
        scores = clip_scores(clip_spec, [r["image"] for r in rows], [r["prompt"] for r in rows])
        for row, score in zip(rows, scores, strict=True):
            row["clip_score"] = score
    return rows


def clip_scores(
    spec: str, images: list[Any], texts: list[str], batch_size: int = 16
) -> list[float]:
    """CLIP score of each image against its text: ``max(100 · cos(image, text), 0)``."""
    import torch
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(spec).eval()
    processor = AutoProcessor.from_pretrained(spec)
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            inputs = processor(
                text=texts[start : start + batch_size],
                images=images[start : start + batch_size],
                return_tensors="pt",
                padding="max_length",
                truncation=True,
            )
            out = model(**inputs)
            image_emb = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            text_emb = torch.nn.functional.normalize(out.text_embeds, dim=-1)
            cos = (image_emb * text_emb).sum(-1)
            scores += [max(100.0 * float(c), 0.0) for c in cos]
    return scores


def write_outputs(
    folder: Path, rows: list[dict[str, Any]], prompts: list[str], cfg: SampleConfig
) -> None:
    """``samples.parquet`` and ``grid.png`` (rows: prompts; columns: model x seed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "image"} for r in rows])
    with atomic_path(folder / TABLE_FILE) as tmp:
        pq.write_table(table, tmp)
    grid = make_grid(rows, prompts, cfg.seeds)
    with atomic_path(folder / GRID_FILE) as tmp:
        grid.save(tmp, format="PNG")


def make_grid(rows: list[dict[str, Any]], prompts: list[str], seeds: list[int]) -> Any:
    """A labelled grid: the prompt left of each row, ``model seed`` above each column."""
    from PIL import Image, ImageDraw

    models = list(dict.fromkeys(r["model"] for r in rows))
    columns = [(m, s) for m in models for s in seeds]
    by_cell = {(r["model"], r["prompt_index"], r["seed"]): r["image"] for r in rows}
    # Cells between 96 (room for the column labels) and 256 pixels wide.
    cell = max(96, min(256, max(im.width for im in by_cell.values())))
    cell_h = round(cell * rows[0]["height"] / rows[0]["width"])
    label_w, header_h, pad = 220, 20, 4
    width = label_w + len(columns) * (cell + pad)
    height = header_h + len(prompts) * (cell_h + pad)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, (model, seed) in enumerate(columns):
        draw.text((label_w + c * (cell + pad) + 2, 4), f"{model} seed {seed}", fill="black")
    for p, prompt in enumerate(prompts):
        y = header_h + p * (cell_h + pad)
        lines = textwrap.wrap(prompt, width=34)[: max(1, cell_h // 12)]
        draw.multiline_text((4, y + 2), "\n".join(lines), fill="black", spacing=2)
        for c, (model, seed) in enumerate(columns):
            image = by_cell.get((model, p, seed))
            if image is not None:
                grid.paste(image.resize((cell, cell_h)), (label_w + c * (cell + pad), y))
    return grid
