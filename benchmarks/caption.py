"""Caption stage benchmarks: data-path efficiency, batching, streaming memory, GPU throughput.

CPU, with the tiny demo LLaVA-1.5 (one run, side by side)::

    python benchmarks/caption.py

1. efficiency: the stage's images/s over a model-only loop (same model, same batch size, same
   fixed number of new tokens, inputs already decoded and preprocessed in memory). The data
   path (tar streaming, decoding in DataLoader workers, parquet) must not be the bottleneck:
   goal >= 0.85.
2. batching: the stage's images/s at batch 32 over batch 1.
3. memory: peak RSS of the stage's main process over 2 shards and over 20 shards (a fresh
   process each); streaming means the two are about equal.

GPU (CUDA), the real LLaVA-1.5-7B architecture from its published config, random weights,
bf16, a fixed 64 new tokens per image, images/s at several batch sizes::

    python benchmarks/caption.py --gpu --batch-sizes 1,8,16,32,64
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# -- inputs ----------------------------------------------------------------------------------
def write_shards(images_dir: Path, n_shards: int, per_shard: int, image_size: int) -> None:
    """Shards in img2dataset's layout: JPEG photos-like noise + shapes, txt, json, stats."""
    import numpy as np
    import webdataset as wds
    from PIL import Image, ImageDraw

    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for shard in range(n_shards):
        name = f"{shard:05d}"
        with wds.TarWriter(str(images_dir / f"{name}.tar")) as sink:
            for i in range(per_shard):
                key = f"{name}{i:04d}"
                w = image_size
                h = int(image_size * rng.uniform(0.6, 1.0))
                noise = np.random.default_rng(shard * 10_000 + i).integers(0, 255, (h, w, 3))
                image = Image.fromarray(noise.astype("uint8"))
                draw = ImageDraw.Draw(image)
                draw.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(200, 40, 40))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                meta = {"key": key, "status": "success", "caption": f"picture {i}"}
                sink.write(
                    {"__key__": key, "jpg": buffer.getvalue(), "txt": meta["caption"], "json": meta}
                )
        stats = {"count": per_shard, "successes": per_shard}
        (images_dir / f"{name}_stats.json").write_text(json.dumps(stats))


def write_config(run_dir: Path, models_dir: Path, **caption: Any) -> Path:
    import yaml

    data = {
        "run_dir": str(run_dir),
        "demo": {"models_dir": str(models_dir)},
        "caption": {"model": "demo:tiny-llava-1.5", "dtype": "float32", "device": "cpu", **caption},
    }
    path = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def caption_settings(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    return {
        "batch_size": batch_size,
        "num_workers": args.workers,
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,  # every image costs the same generation
    }


# -- measurements ----------------------------------------------------------------------------
def stage_images_per_s(config_path: Path) -> tuple[float, int, float]:
    """Run the stage over every shard of the config's run.

    Returns images/s over the shard loop, the number of images, and the share of the shard
    time the model waited for decoded images (from the shards' stats).
    """
    import shutil

    from recaption.config import load_config
    from recaption.stages import StageContext
    from recaption.stages.caption import run

    config = load_config(config_path)
    shutil.rmtree(config.captions_dir, ignore_errors=True)
    summary = run(StageContext(config))
    assert summary.ok, summary.describe()
    n = summary.samples_ok + summary.samples_failed
    stats = [json.loads(p.read_text()) for p in config.captions_dir.glob("*_stats.json")]
    waiting = sum(s["seconds_waiting_for_images"] for s in stats) / sum(s["seconds"] for s in stats)
    return n / summary.seconds, n, waiting


def model_only_images_per_s(config_path: Path) -> tuple[float, int]:
    """Generate over the same batches with inputs decoded and preprocessed beforehand."""
    from recaption.config import load_config
    from recaption.demo.models import resolve_model
    from recaption.ledger import list_shards
    from recaption.models.llava import load_captioner
    from recaption.shards import iter_tar_samples
    from recaption.signals import StopSignals
    from recaption.stages.caption import ShardBatches, ShardCaptioner

    config = load_config(config_path)
    section = config.caption
    captioner = load_captioner(
        resolve_model(config, section.model), dtype=section.dtype, device=section.device or "cpu"
    )
    worker = ShardCaptioner(config, captioner, Path(tempfile.mkdtemp()), StopSignals())
    batches = []
    for shard in list_shards(config.images_dir, "_stats.json"):
        tar = config.images_dir / f"{shard}.tar"
        dataset = ShardBatches(tar, captioner.processor, worker.template, section)
        samples = list(iter_tar_samples(tar))
        size = section.batch_size
        for start in range(0, len(samples), size):
            batches.append(dataset.prepare(len(batches), samples[start : start + size]))
    n = sum(len(b.good) for b in batches)
    worker.generate(batches[0].inputs, 0)  # warm-up, as the stage's first shard pays it too
    t0 = time.perf_counter()
    for batch in batches:
        worker.generate(batch.inputs, batch.index)
    return n / (time.perf_counter() - t0), n


def peak_rss_mib(config_path: Path) -> float:
    """Peak RSS (VmHWM) of a fresh process that runs the stage over the config's shards."""
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(config_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return float(out.stdout.strip().splitlines()[-1])


def rss_child(config_path: str) -> None:
    logging.disable(logging.INFO)
    stage_images_per_s(Path(config_path))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            sys.stdout.write(f"{int(line.split()[1]) / 1024:.1f}\n")


def cpu_benchmarks(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="caption-bench-"))
    models = root / "models"
    main_run = root / "efficiency"
    write_shards(main_run / "images", args.shards, args.per_shard, args.image_size)

    rows: list[tuple[str, str, str, str]] = []
    cfg = write_config(main_run, models, **caption_settings(args, args.batch_size))
    # Interleaved repeats, best of each: the machine may be shared, and noise only slows runs.
    stage_ips, model_ips, waiting = 0.0, 0.0, 1.0
    for _ in range(args.repeats):
        ips, n, wait = stage_images_per_s(cfg)
        stage_ips, waiting = max(stage_ips, ips), min(waiting, wait)
        model_ips = max(model_ips, model_only_images_per_s(cfg)[0])
    rows.append(
        (
            f"1. efficiency (batch {args.batch_size}, {n} images, {args.new_tokens} new tokens)",
            f"stage {stage_ips:.1f} img/s",
            f"model-only {model_ips:.1f} img/s",
            f"ratio {stage_ips / model_ips:.2f} (goal >= 0.85); "
            f"model idle for images {100 * waiting:.1f}% of the stage time",
        )
    )

    batching_run = root / "batching"
    write_shards(batching_run / "images", 1, args.batching_images, args.image_size)
    per_batch = {}
    for batch_size in (1, 32):
        cfg = write_config(batching_run, models, **caption_settings(args, batch_size))
        per_batch[batch_size] = max(stage_images_per_s(cfg)[0] for _ in range(args.repeats))
    rows.append(
        (
            f"2. batching (stage, {args.batching_images} images)",
            f"batch 32 {per_batch[32]:.1f} img/s",
            f"batch 1 {per_batch[1]:.1f} img/s",
            f"ratio {per_batch[32] / per_batch[1]:.2f}",
        )
    )

    rss = {}
    for n_shards in (2, 20):
        run_dir = root / f"memory{n_shards}"
        write_shards(run_dir / "images", n_shards, args.memory_per_shard, args.image_size)
        settings = {**caption_settings(args, args.batch_size), "max_new_tokens": 8}
        settings["min_new_tokens"] = 8  # memory does not depend on caption length
        rss[n_shards] = peak_rss_mib(write_config(run_dir, models, **settings))
    rows.append(
        (
            f"3. memory ({args.memory_per_shard} images/shard)",
            f"20 shards {rss[20]:.0f} MiB",
            f"2 shards {rss[2]:.0f} MiB",
            f"ratio {rss[20] / rss[2]:.2f} (streaming: ~1.0)",
        )
    )
    width = max(len(r[0]) for r in rows)
    sys.stdout.write(
        f"\ncaption benchmarks (CPU, tiny LLaVA-1.5, torch threads "
        f"{torch.get_num_threads()}, DataLoader workers {args.workers})\n"
    )
    for r in rows:
        sys.stdout.write(f"{r[0]:<{width}}  {r[1]:>24}  {r[2]:>26}  {r[3]}\n")


# -- GPU: the real LLaVA-1.5-7B architecture ---------------------------------------------------
def llava_15_7b_config() -> Any:
    """llava-hf/llava-1.5-7b-hf's config.json, written out (no hub access needed)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(  # CLIP ViT-L/14 at 336 px
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(  # Vicuna-7B v1.5 (Llama 2 7B)
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def gpu_benchmark(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; none is visible here")
    from recaption.distributed import default_device

    device = default_device()
    config = llava_15_7b_config()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):  # initialised on the GPU, directly in bf16
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    sys.stdout.write(
        f"LLaVA-1.5-7B architecture, random weights, bf16, {n_params:.2f}B parameters, "
        f"{torch.cuda.get_device_name(device)}, built in {time.perf_counter() - t0:.0f}s\n"
    )
    # "USER: <image>\n<dense prompt> ASSISTANT:" is about 20 text tokens around 576 image ones.
    text_ids = [1, 3148, 1001, 29901] + [32000] * 576 + [13] + list(range(500, 516)) + [319, 29901]
    new_tokens = args.gpu_new_tokens
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        input_ids = torch.tensor([text_ids] * batch_size, device=device)
        pixel_values = torch.randn(batch_size, 3, 336, 336, device=device, dtype=torch.bfloat16)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "do_sample": False,
            "pad_token_id": 32001,
        }
        try:
            with torch.inference_mode():
                model.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                for _ in range(args.gpu_repeats):
                    model.generate(**kwargs)
                torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            sys.stdout.write(f"batch {batch_size}: out of memory\n")
            torch.cuda.empty_cache()
            break
        seconds = (time.perf_counter() - t0) / args.gpu_repeats
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        results.append((batch_size, batch_size / seconds, batch_size * new_tokens / seconds, peak))
    base = results[0][1] if results else 1.0
    header = f"{'batch':>5}  {'img/s/GPU':>10}  {'new tok/s':>10}  {'vs b1':>6}  peak GiB\n"
    sys.stdout.write(header)
    for batch_size, ips, tps, peak in results:
        line = f"{batch_size:>5}  {ips:>10.2f}  {tps:>10.0f}  {ips / base:>6.2f}  {peak:.1f}\n"
        sys.stdout.write(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2, help="shards for 1.")
    parser.add_argument("--per-shard", type=int, default=128, help="images per shard for 1.")
    parser.add_argument("--memory-per-shard", type=int, default=32, help="images/shard for 3.")
    parser.add_argument("--image-size", type=int, default=256, help="JPEG width in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64, help="fixed new tokens per image")
    parser.add_argument("--batching-images", type=int, default=64, help="images for 2.")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure, best kept")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decode workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, 0: torch default")
    parser.add_argument("--workdir", help="keep inputs and outputs here (default: a temp dir)")
    parser.add_argument("--gpu", action="store_true", help="run the LLaVA-1.5-7B GPU benchmark")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64", help="GPU batch sizes")
    parser.add_argument("--gpu-new-tokens", type=int, default=64)
    parser.add_argument("--gpu-repeats", type=int, default=2)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.rss_child:
        rss_child(args.rss_child)
    elif args.gpu:
        gpu_benchmark(args)
    else:
        cpu_benchmarks(args)


if __name__ == "__main__":
    main()
