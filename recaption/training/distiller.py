"""KOALA distillation: the frozen SDXL teacher, the compressed student, the hooks, the losses.

One micro-batch (:meth:`Distiller.step`): encode images with the teacher's VAE and captions
with its two text encoders (or take both from the cache), add noise, run teacher and student,
and compute

    loss = w_task · MSE(ε_student, ε) + w_out · MSE(ε_student, ε_teacher)
           + w_feat · Σ_pairs MSE(attn1_student, attn1_teacher)

KOALA's task + output + self-attention feature distillation. A zero weight skips that term's
work (with ``w_out == w_feat == 0`` the teacher U-Net does not run: a plain fine-tune).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_teacher(spec: str) -> None:
    """Refuse a local teacher folder that is missing or not an SDXL pipeline.

    Hub ids are checked when they load (``from_pretrained`` names the problem).
    """
    path = Path(spec)
    looks_local = path.is_absolute() or spec.startswith(".") or path.exists()
    if not looks_local:
        return
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"teacher {spec}: no model_index.json there; train.teacher must be an SDXL pipeline "
            "folder (save_pretrained of StableDiffusionXLPipeline) or a hub id such as "
            "stabilityai/stable-diffusion-xl-base-1.0"
        )
    components = json.loads(index.read_text())
    needed = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    missing = [c for c in needed if c not in components]
    if missing:
        raise ValueError(
            f"teacher {spec} is not an SDXL pipeline ({components.get('_class_name')}, missing "
            f"{', '.join(missing)}); KOALA distils StableDiffusionXLPipeline checkpoints"
        )


def add_time_ids(
    original_sizes: list[tuple[int, int]],
    crops_top_left: list[tuple[int, int]],
    resolution: int,
) -> torch.Tensor:
    """SDXL micro-conditioning: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    rows = [
        [*size, *crop, resolution, resolution]
        for size, crop in zip(original_sizes, crops_top_left, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float32)


@dataclass
class Conditioning:
    """What the U-Nets are conditioned on, and the clean latents they denoise."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    time_ids: torch.Tensor


def training_noise(
    latents: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise shaped like ``latents`` (drawn from ``generator``, else torch's default
    one), plus ``noise_offset`` times a constant per sample and channel (offset noise, as
    diffusers' SDXL training script's ``--noise_offset``).

    The offset hides the image's mean colour at the noisiest steps, where plain noise on small
    latents still shows it; the model then learns that colour from the prompt, not from the
    starting noise (which, at sampling time, carries no information)."""
    like = {"device": latents.device, "dtype": latents.dtype, "generator": generator}
    noise = torch.randn(latents.shape, **like)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), **like)
    return noise


class Distiller:
    """Teacher and student with their aligned self-attention hooks; one ``step`` a batch.

    ``teacher`` is a ``StableDiffusionXLPipeline`` (frozen, moved to ``device``); the student
    is a KOALA U-Net initialised from the teacher's (``preset``). Replace :attr:`student` by
    the ``accelerator.prepare``-d module before training: the hooks stay on the same module.
    """

    def __init__(
        self,
        teacher: Any,
        preset: str,
        *,
        device: torch.device,
        teacher_dtype: torch.dtype = torch.float32,
        resolution: int,
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        gradient_checkpointing: bool = False,
        scaling_factor: float | None = None,
        noise_offset: float = 0.0,
    ) -> None:
        from diffusers import DDPMScheduler

        from recaption.models.koala import (
            SelfAttentionFeatures,
            aligned_self_attention_pairs,
            init_student_from_teacher,
        )

        self.teacher = teacher
        self.device = device
        self.teacher_dtype = teacher_dtype
        self.resolution = resolution
        self.weights = weights
        self.noise_offset = noise_offset
        self.noise_scheduler = DDPMScheduler.from_config(teacher.scheduler.config)
        # The VAE's latent scale: from the VAE, or given when training from the cache (the
        # VAE is then not loaded).
        self.scaling_factor = (
            scaling_factor if scaling_factor is not None else teacher.vae.config.scaling_factor
        )
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.student = init_student_from_teacher(teacher.unet, preset).to(device)
        if gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.pairs = aligned_self_attention_pairs(self.student, teacher.unet)
        self.student_features = SelfAttentionFeatures(self.student, [s for s, _ in self.pairs])
        self.teacher_features = SelfAttentionFeatures(teacher.unet, [t for _, t in self.pairs])
        logger.info("distilling %d self-attention pairs", len(self.pairs))

    @staticmethod
    def load_teacher(
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        revision: str | None = None,
        variant: str | None = None,
        *,
        unet_only: bool = False,
    ) -> Any:
        """The SDXL teacher pipeline, frozen, on ``device`` (the VAE in fp32 when it must be).

        ``unet_only`` (training from the cache) loads neither the VAE nor the text encoders
        (their tokenizers and the scheduler are light and kept).
        """
        from diffusers import StableDiffusionXLPipeline

        skip = dict(vae=None, text_encoder=None, text_encoder_2=None) if unet_only else {}
        try:
            teacher = StableDiffusionXLPipeline.from_pretrained(
                spec,
                torch_dtype=dtype,
                revision=revision,
                variant=variant,
                use_safetensors=True,
                **skip,
            )
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"teacher {spec} could not be loaded: {exc}") from exc
        teacher.set_progress_bar_config(disable=True)
        modules = [teacher.unet]
        if not unet_only:
            vae_dtype = torch.float32 if teacher.vae.config.get("force_upcast", True) else dtype
            teacher.vae.to(device, dtype=vae_dtype)
            modules += [teacher.vae, teacher.text_encoder, teacher.text_encoder_2]
        for module in modules:
            module.to(device).requires_grad_(False).eval()
        return teacher

    @staticmethod
    def vae_scaling_factor(spec: str, revision: str | None = None) -> float:
        """The teacher VAE's ``scaling_factor``, read from its config without loading it."""
        from diffusers import AutoencoderKL

        return float(
            AutoencoderKL.load_config(spec, subfolder="vae", revision=revision)["scaling_factor"]
        )

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> Conditioning:
        """Latents of the images (teacher VAE) and embeddings of the captions (both encoders),
        or the cached ones (``recaption encode``): then the latent is drawn from the cached
        distribution exactly as ``latent_dist.sample()`` draws it."""
        if "latents_mean" in batch:
            mean = batch["latents_mean"].to(self.device, torch.float32)
            std = batch["latents_std"].to(self.device, torch.float32)
            latents = mean + std * torch.randn(mean.shape, device=self.device, dtype=mean.dtype)
            return Conditioning(
                (latents * self.scaling_factor).float().contiguous(),
                batch["prompt_embeds"].to(self.device),
                batch["pooled_embeds"].to(self.device),
                batch["time_ids"].to(self.device, torch.float32),
            )
        teacher = self.teacher
        pixels = batch["pixel_values"].to(self.device, dtype=teacher.vae.dtype)
        latents = teacher.vae.encode(pixels).latent_dist.sample()
        # Contiguous: the VAE may return channels-last latents, and randn_like would then lay
        # the same random numbers out differently than for cached (contiguous) latents.
        latents = (latents * self.scaling_factor).float().contiguous()
        prompt_embeds, _, pooled_embeds, _ = teacher.encode_prompt(
            batch["captions"], device=self.device, do_classifier_free_guidance=False
        )
        time_ids = add_time_ids(batch["original_sizes"], batch["crops_top_left"], self.resolution)
        return Conditioning(latents, prompt_embeds, pooled_embeds, time_ids.to(self.device))

    def step(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward one micro-batch: ``(loss, task, output KD, feature KD)``, loss not scaled."""
        w_task, w_out, w_feat = self.weights
        cond = self.encode(batch)
        latents = cond.latents
        noise = training_noise(latents, self.noise_offset)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            device=self.device,
        ).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = (
            self.noise_scheduler.get_velocity(latents, noise, timesteps)
            if self.prediction_type == "v_prediction"
            else noise
        )
        added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
        zero = torch.zeros((), device=self.device)
        teacher_pred = None
        if w_out or w_feat:
            dtype = self.teacher_dtype
            with torch.no_grad(), self.teacher_features.record():
                teacher_pred = self.teacher.unet(
                    noisy.to(dtype),
                    timesteps,
                    cond.prompt_embeds.to(dtype),
                    added_cond_kwargs={k: v.to(dtype) for k, v in added.items()},
                ).sample
        recording = self.student_features.record() if w_feat else contextlib.nullcontext()
        with recording:
            student_pred = self.student(
                noisy,
                timesteps,
                cond.prompt_embeds.float(),
                added_cond_kwargs={k: v.float() for k, v in added.items()},
            ).sample.float()
        task = F.mse_loss(student_pred, target.float()) if w_task else zero
        out_kd = (
            F.mse_loss(student_pred, teacher_pred.float()) if teacher_pred is not None else zero
        )
        feat_kd = zero
        if w_feat:
            feat_kd = sum(
                F.mse_loss(
                    self.student_features.outputs[s].float(),
                    self.teacher_features.outputs[t].float(),
                )
                for s, t in self.pairs
            )
        loss = w_task * task + w_out * out_kd + w_feat * feat_kd
        return loss, task, out_kd, feat_kd

    def remove_hooks(self) -> None:
        """Detach the feature hooks (end of training)."""
        self.student_features.remove()
        self.teacher_features.remove()
