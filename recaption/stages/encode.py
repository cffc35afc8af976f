"""Encode: the training cache, VAE latents and text embeddings computed once per sample.

At 1024 px the frozen VAE encoder and the two text encoders of SDXL cost a large share of
every training step, every epoch again, and keep ~1.5 GB of frozen weights on every GPU
(diffusers' SDXL training example precomputes both for the same reason). With
``train.cache: true`` this stage writes, for each merged shard, ``cache/{shard}.safetensors``:

- ``latents_mean``, ``latents_std``: the teacher VAE's latent distribution of the sample's
  crop (``train.resolution``); training draws ``mean + std · ε`` each step, exactly as
  ``latent_dist.sample()`` does without the cache;
- ``prompt_embeds``, ``pooled_embeds``: both text encoders' embeddings of the synthetic
  caption, and ``prompt_embeds_original``, ``pooled_embeds_original`` of the alt-text when
  ``train.synthetic_caption_ratio < 1``; ``empty_prompt_embeds``/``empty_pooled_embeds`` of
  the empty prompt (classifier-free guidance);
- ``time_ids``: SDXL's size conditioning; the metadata lists the sample keys in row order.

Random crops and flips are drawn once, when the sample is encoded (with the trainer's own
seeded draw for epoch 0), and kept for every epoch, as in diffusers' example; without the cache
they are drawn again each epoch. Which caption a step trains on is still drawn per epoch.

The cache is stamped like every stage: the teacher and the preprocessing settings are its
config (changing them is refused without ``--overwrite``), and each shard's input is the
merged shard's marker, so a changed caption redoes exactly the shards it is in.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import torch

from recaption.driver import ShardedStage
from recaption.ledger import atomic_path
from recaption.shards import iter_samples_by_key
from recaption.training.data import cache_config, decode_sample, original_prompt
from recaption.training.distiller import TORCH_DTYPES, add_time_ids

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".safetensors"


class EncodeStage(ShardedStage):
    """Encode every merged shard's images and captions with the teacher's frozen parts."""

    name = "encode"
    input_stage = "merge"
    output_suffixes = (CACHE_SUFFIX,)

    def skip_reason(self) -> str | None:
        if not self.config.train.cache:
            return "train.cache is off: training encodes on the fly (nothing to do)"
        return None

    def stage_config(self) -> dict[str, Any]:
        return cache_config(self.config.train)

    def check(self) -> None:
        from recaption.demo.models import resolve_model
        from recaption.training.distiller import check_teacher

        self.teacher_spec = resolve_model(self.config, self.config.train.teacher)
        check_teacher(self.teacher_spec)

    def setup(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        from recaption.distributed import default_device

        cfg = self.config.train
        self.device = torch.device(default_device())
        dtype = TORCH_DTYPES[cfg.teacher_dtype]
        if self.device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        teacher = StableDiffusionXLPipeline.from_pretrained(
            self.teacher_spec,
            unet=None,  # only the VAE and the text encoders are needed here
            torch_dtype=dtype,
            revision=cfg.teacher_revision,
            variant=cfg.teacher_variant,
            use_safetensors=True,
        )
        vae_dtype = torch.float32 if teacher.vae.config.get("force_upcast", True) else dtype
        teacher.vae.to(self.device, dtype=vae_dtype)
        teacher.text_encoder.to(self.device)
        teacher.text_encoder_2.to(self.device)
        teacher.set_progress_bar_config(disable=True)
        self.teacher = teacher

    @torch.no_grad()
    def embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and pooled embeddings of both text encoders."""
        prompt, _, pooled, _ = self.teacher.encode_prompt(
            captions, device=self.device, do_classifier_free_guidance=False
        )
        return prompt, pooled

    @torch.no_grad()
    def encode_batch(self, batch: list[dict[str, Any]], with_original: bool) -> dict[str, Any]:
        """The cache rows of a batch of decoded samples."""
        vae = self.teacher.vae
        pixels = torch.stack([b["pixel_values"] for b in batch]).to(self.device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        rows = {"latents_mean": dist.mean, "latents_std": dist.std}
        rows["prompt_embeds"], rows["pooled_embeds"] = self.embed([b["synthetic"] for b in batch])
        if with_original:
            cfg = self.config.train
            originals = [original_prompt(b["original"], b["synthetic"], cfg) for b in batch]
            rows["prompt_embeds_original"], rows["pooled_embeds_original"] = self.embed(originals)
        rows["time_ids"] = add_time_ids(
            [b["original_size"] for b in batch],
            [b["crop_top_left"] for b in batch],
            self.config.train.resolution,
        )
        return rows

    def process(self, shard: str) -> dict[str, Any]:
        from safetensors.torch import save_file

        cfg = self.config.train
        with_original = cfg.synthetic_caption_ratio < 1
        dtype = TORCH_DTYPES[cfg.cache_dtype]
        tar = self.input_dir / f"{shard}.tar"
        keys: list[str] = []
        parts: dict[str, list[torch.Tensor]] = {}
        batch: list[dict[str, Any]] = []
        n_input = 0

        def flush() -> None:
            if batch:
                for name, value in self.encode_batch(batch, with_original).items():
                    parts.setdefault(name, []).append(value.to("cpu", dtype))
                keys.extend(b["key"] for b in batch)
                batch.clear()

        for sample in iter_samples_by_key(tar):
            self.check_stop()
            n_input += 1
            # The trainer's own draw for epoch 0: the crop and flip the cache keeps.
            rng = random.Random(f"{cfg.seed}-0-{shard}-{sample.key}")
            decoded = decode_sample(sample, shard, rng, cfg)
            if decoded is not None:
                batch.append(decoded)
            if len(batch) == cfg.batch_size:
                flush()
        flush()
        tensors = {name: torch.cat(values).contiguous() for name, values in parts.items()}
        empty_prompt, empty_pooled = self.embed([""])
        tensors["empty_prompt_embeds"] = empty_prompt.to("cpu", dtype).contiguous()
        tensors["empty_pooled_embeds"] = empty_pooled.to("cpu", dtype).contiguous()
        with atomic_path(self.output_dir / f"{shard}{CACHE_SUFFIX}") as tmp:
            save_file(tensors, tmp, metadata={"keys": json.dumps(keys), "teacher": cfg.teacher})
        n_bytes = (self.output_dir / f"{shard}{CACHE_SUFFIX}").stat().st_size
        logger.info("encode: shard %s: %d samples, %.1f MB", shard, len(keys), n_bytes / 1e6)
        return {
            "n_input": n_input,
            "n_ok": len(keys),
            "n_failed": n_input - len(keys),
            "bytes": n_bytes,
            "bytes_per_sample": round(n_bytes / max(1, len(keys))),
        }
