"""KOALA benchmarks: U-Net step latency, distillation step cost, GPU pipeline latency.

    python benchmarks/koala.py                 # 1 and 2 (CPU)
    python benchmarks/koala.py --only unet     # 1: full-size U-Nets, bf16, 64x64 latents
    python benchmarks/koala.py --only train    # 2: tiny distillation vs fine-tune step
    python benchmarks/koala.py --gpu           # 3: full pipelines on CUDA, 1024px, 25 steps
    python benchmarks/koala.py --only cache    # 4: step with / without train.cache, 512px

1. One denoising step (U-Net forward, batch ``--batch``) of full-size SDXL-Base-1.0,
   KOALA-1B and KOALA-700M with random weights in bf16 on CPU at 512x512 (64x64 latents),
   one model at a time (built on the meta device, then allocated directly in bf16).
   The model card's RTX 4090 figures (1024px, fp16, 25 steps): KOALA-700M/SDXL = 1.257 s /
   3.133 s = 0.40, KOALA-1B/SDXL = 1.604 s / 3.133 s = 0.51.
2. One training step (forward, backward, AdamW) on the tiny demo models: the KOALA
   distillation step (teacher forward + hooks + three loss terms) against a plain fine-tune
   of the same student (task loss only), interleaved rounds in the same process.
3. ``--gpu``: full ``StableDiffusionXLPipeline``s with SDXL-size VAE and text encoders and
   random fp16 weights, 1024x1024, 25 Euler steps, guidance 7.5: seconds per image and peak
   GPU memory, KOALA-700M (and KOALA-1B) vs SDXL.
4. A KOALA-700M distillation step (forward + backward) with and without ``train.cache`` at
   the real sizes on CPU (bf16 autocast, 512px), the frozen weights the cache spares, and the
   cache's disk cost per million samples.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recaption.models.koala import count_parameters, student_config
from recaption.models.sdxl import SDXL_BASE_UNET_CONFIG

CARD_4090_SECONDS = {"sdxl": 3.133, "koala-1b": 1.604, "koala-700m": 1.257}


def unet_configs() -> dict[str, dict[str, Any]]:
    return {
        "sdxl": dict(SDXL_BASE_UNET_CONFIG),
        "koala-1b": student_config(SDXL_BASE_UNET_CONFIG, "koala-1b"),
        "koala-700m": student_config(SDXL_BASE_UNET_CONFIG, "koala-700m"),
    }


def random_model(cls: Any, config: Any, dtype: torch.dtype, device: str) -> Any:
    """A model with random weights allocated straight in ``dtype`` on ``device``."""
    with torch.device("meta"):
        if isinstance(config, dict):  # a diffusers config
            model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
        else:  # a transformers config object
            model = cls(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("position_ids"):
                tensor.copy_(torch.arange(tensor.shape[-1], device=device).expand_as(tensor))
            elif tensor.dim() > 1:
                tensor.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                tensor.fill_(1.0)
            else:
                tensor.zero_()
    return model.eval()


def unet_inputs(batch: int, latent: int, device: str, dtype: torch.dtype) -> tuple:
    cond = {
        "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
        "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=device).to(dtype),
    }
    sample = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    text = torch.randn(batch, 77, 2048, device=device, dtype=dtype)
    return sample, torch.tensor([500] * batch, device=device), text, cond


def bench_unet_cpu(batch: int, repeats: int) -> None:
    """Benchmark 1: one U-Net step per model, bf16, 64x64 latents, CPU."""
    from diffusers import UNet2DConditionModel

    print(
        f"\n== 1. U-Net step latency: random weights, bf16, CPU ({torch.get_num_threads()} "
        f"threads), 512x512 (64x64 latents), batch {batch}, median of {repeats} =="
    )
    seconds: dict[str, float] = {}
    for name, config in unet_configs().items():
        t0 = time.perf_counter()
        unet = random_model(UNet2DConditionModel, config, torch.bfloat16, "cpu")
        built = time.perf_counter() - t0
        inputs = unet_inputs(batch, 64, "cpu", torch.bfloat16)
        with torch.inference_mode():
            unet(*inputs[:3], added_cond_kwargs=inputs[3])  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                unet(*inputs[:3], added_cond_kwargs=inputs[3])
                times.append(time.perf_counter() - t0)
        seconds[name] = statistics.median(times)
        params = count_parameters(config) / 1e6
        print(
            f"{name:<11} {params:8.1f}M params  {seconds[name]:7.2f} s/step  "
            f"(built in {built:.1f}s)",
            flush=True,
        )
        del unet, inputs
        gc.collect()
    for name in ("koala-700m", "koala-1b"):
        ours = seconds[name] / seconds["sdxl"]
        card = CARD_4090_SECONDS[name] / CARD_4090_SECONDS["sdxl"]
        print(f"{name}/sdxl: {ours:.2f} here (CPU bf16)   vs {card:.2f} model card (RTX 4090 fp16)")


def bench_train_step(steps: int, batch: int) -> None:
    """Benchmark 2: tiny distillation step vs plain fine-tune step, same process."""

    from recaption.demo.tiny_models import build_tiny_sdxl
    from recaption.training.distiller import Distiller

    print(
        f"\n== 2. training step, tiny SDXL teacher -> KOALA-700M student, 64px, batch {batch}, "
        f"CPU ({torch.get_num_threads()} threads), median of {steps} interleaved steps =="
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_sdxl(Path(tmp) / "sdxl")
        teacher = Distiller.load_teacher(Path(tmp) / "sdxl", torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    batch_data = {
        "pixel_values": torch.rand(batch, 3, 64, 64) * 2 - 1,
        "captions": ["a red circle on a blue background"] * batch,
        "original_sizes": [(64, 64)] * batch,
        "crops_top_left": [(0, 0)] * batch,
    }
    results: dict[str, list[float]] = {"distill": [], "finetune": []}
    runs = {}
    for mode, weights in (("distill", (1.0, 1.0, 1.0)), ("finetune", (1.0, 0.0, 0.0))):
        distiller = Distiller(
            teacher, "koala-700m", device=torch.device("cpu"), resolution=64, weights=weights
        )
        optimizer = torch.optim.AdamW(distiller.student.parameters(), lr=1e-4)
        runs[mode] = (distiller, optimizer)

    def one_step(mode: str) -> float:
        distiller, optimizer = runs[mode]
        t0 = time.perf_counter()
        loss = distiller.step(batch_data)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up
        one_step("distill")
        one_step("finetune")
    for _ in range(steps):
        for mode in ("distill", "finetune"):
            results[mode].append(one_step(mode))
    distill, finetune = (statistics.median(results[m]) for m in ("distill", "finetune"))
    print(f"distillation step (teacher fwd + hooks + 3 losses): {distill * 1000:7.1f} ms")
    print(f"plain fine-tune step (task loss only):              {finetune * 1000:7.1f} ms")
    print(f"distill/fine-tune: {distill / finetune:.2f}")


def sdxl_pipeline(
    unet_config: dict[str, Any], device: str, dtype: torch.dtype = torch.float16
) -> Any:
    """A full-size SDXL pipeline with random weights (VAE and text encoders at SDXL size)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from recaption.demo.tiny_models import build_tiny_clip_tokenizer

    text_1 = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
    )
    text_2 = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
        hidden_act="gelu",
    )
    vae_config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": False,
    }
    return StableDiffusionXLPipeline(
        vae=random_model(AutoencoderKL, vae_config, dtype, device),
        text_encoder=random_model(CLIPTextModel, text_1, dtype, device),
        text_encoder_2=random_model(CLIPTextModelWithProjection, text_2, dtype, device),
        tokenizer=build_tiny_clip_tokenizer(),
        tokenizer_2=build_tiny_clip_tokenizer(),
        unet=random_model(UNet2DConditionModel, unet_config, dtype, device),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )


def bench_cache(repeats: int, resolution: int = 512, batch: int = 1) -> None:
    """Benchmark 4: a KOALA-700M distillation step with and without the training cache, at the
    real architecture sizes (random weights, bf16 autocast on CPU), and what the cache saves
    in memory and costs on disk."""
    from recaption.training.distiller import Distiller

    print(
        f"\n== 4. distillation step with / without train.cache: SDXL teacher (full size), "
        f"KOALA-700M student, {resolution}px, batch {batch}, CPU bf16 autocast, forward + "
        f"backward, median of {repeats} interleaved steps =="
    )
    device, dtype = torch.device("cpu"), torch.bfloat16
    pipe = sdxl_pipeline(SDXL_BASE_UNET_CONFIG, "cpu", dtype)
    distiller = Distiller(pipe, "koala-700m", device=device, teacher_dtype=dtype,
                          resolution=resolution)  # fmt: skip
    frozen = [pipe.vae.encoder, pipe.vae.quant_conv, pipe.text_encoder, pipe.text_encoder_2]
    n_frozen = sum(p.numel() for m in frozen for p in m.parameters())
    captions = ["a photograph of a red fox sitting in the snow, detailed fur, soft light"] * batch
    plain = {
        "pixel_values": torch.rand(batch, 3, resolution, resolution) * 2 - 1,
        "captions": captions,
        "original_sizes": [(resolution, resolution)] * batch,
        "crops_top_left": [(0, 0)] * batch,
    }
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        dist = pipe.vae.encode(plain["pixel_values"].to(dtype)).latent_dist
        prompt, _, pooled, _ = pipe.encode_prompt(captions, device=device,
                                                  do_classifier_free_guidance=False)  # fmt: skip
    cached = {
        "latents_mean": dist.mean,
        "latents_std": dist.std,
        "prompt_embeds": prompt,
        "pooled_embeds": pooled,
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch),
    }

    def one_step(batch_data: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype):
            loss = distiller.step(batch_data)[0]
        loss.backward()
        distiller.student.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    one_step(plain), one_step(cached)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "cached": []}
    for _ in range(repeats):
        times["plain"].append(one_step(plain))
        times["cached"].append(one_step(cached))
    plain_s, cached_s = (statistics.median(times[k]) for k in ("plain", "cached"))
    print(f"step encoding on the fly (VAE encoder + 2 text encoders): {plain_s:7.2f} s")
    print(f"step from the cache:                                      {cached_s:7.2f} s")
    print(f"cached/plain: {cached_s / plain_s:.2f}  (saves {1 - cached_s / plain_s:.0%} a step)")
    print(
        f"frozen weights no longer loaded (VAE encoder, text encoders): {n_frozen / 1e6:.0f}M "
        f"params = {n_frozen * 2 / 2**30:.2f} GiB in bf16 per process"
    )
    # Disk: what `recaption encode` stores per sample (bf16), at this size and at 1024 px.
    for side in (resolution, 1024):
        latent = 4 * (side // 8) ** 2 * 2 * 2  # mean and std, bf16
        text = (77 * 2048 + 1280) * 2  # prompt + pooled embeddings, bf16
        per_sample = latent + text + 6 * 4
        print(
            f"disk at {side}px: {per_sample / 1e3:.0f} KB a sample = "
            f"{per_sample:.2e} B/sample = {per_sample * 1e6 / 1e9:.0f} GB per million samples "
            f"(+{text * 1e6 / 1e9:.0f} GB with the alt-text's embeddings too)"
        )


def bench_gpu(repeats: int) -> None:
    """Benchmark 3: full pipeline, 1024x1024, 25 steps, fp16, CUDA."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    print(
        f"\n== 3. pipeline latency on {torch.cuda.get_device_name()}: random fp16 weights, "
        f"1024x1024, 25 Euler steps, guidance 7.5, median of {repeats} =="
    )
    seconds: dict[str, float] = {}
    for name, config in unet_configs().items():
        pipe = sdxl_pipeline(config, "cuda")
        pipe.set_progress_bar_config(disable=True)

        def sample(pipe: Any = pipe) -> None:
            pipe(
                prompt="A portrait painting of a Golden Retriever like Leonard da Vinci",
                negative_prompt="worst quality, low quality, illustration, low resolution",
                num_inference_steps=25,
                guidance_scale=7.5,
                height=1024,
                width=1024,
                output_type="pil",
            )
            torch.cuda.synchronize()

        sample()  # warm-up
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample()
            times.append(time.perf_counter() - t0)
        seconds[name] = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{name:<11} {seconds[name]:6.3f} s/image   peak {peak:5.2f} GiB", flush=True)
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    for name in ("koala-700m", "koala-1b"):
        card = CARD_4090_SECONDS[name] / CARD_4090_SECONDS["sdxl"]
        print(
            f"{name}/sdxl: {seconds[name] / seconds['sdxl']:.2f} here   vs {card:.2f} card (4090)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["unet", "train", "cache"], help="run one CPU benchmark")
    parser.add_argument("--gpu", action="store_true", help="run benchmark 3 on CUDA instead")
    parser.add_argument("--batch", type=int, default=1, help="U-Net batch (2 = one CFG step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        bench_gpu(args.repeats)
        return
    if args.only in (None, "unet"):
        bench_unet_cpu(args.batch, args.repeats)
    if args.only in (None, "train"):
        bench_train_step(args.train_steps, args.train_batch)
    if args.only in (None, "cache"):
        bench_cache(args.repeats)


if __name__ == "__main__":
    main()
