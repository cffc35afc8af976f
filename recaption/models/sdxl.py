"""The SDXL teacher: the SDXL-Base-1.0 U-Net config and a tiny SDXL pipeline for tests and demo.

No model hub is reachable from where tests run, so the U-Net config of
``stabilityai/stable-diffusion-xl-base-1.0`` is embedded here (it is what the KOALA student
configs are derived from and what the parameter counts of the model card refer to).

:func:`build_tiny_sdxl` writes a complete ``StableDiffusionXLPipeline`` folder with the same
classes as the real checkpoint (two CLIP text encoders, two CLIP tokenizers, an
``AutoencoderKL``, a ``UNet2DConditionModel`` and an ``EulerDiscreteScheduler``), random
weights and a tokenizer made on the spot; it is then loaded through ``from_pretrained`` like
the real one. The tiny U-Net keeps SDXL's block layout (no attention in the first down block,
transformer depths ``[1, 2, 10]``, a cross-attention mid-block, ``text_time`` conditioning) so
the KOALA presets apply to it unchanged.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (diffusers format).
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# Text encoder widths of the tiny pipeline; SDXL's are 768 (CLIP ViT-L) and 1280 (OpenCLIP bigG).
_TINY_TEXT_DIM_1 = 32
_TINY_TEXT_DIM_2 = 32
_TINY_PROJECTION_DIM = 32
_TINY_TIME_EMBED_DIM = 8

TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **{k: v for k, v in SDXL_BASE_UNET_CONFIG.items() if k != "_class_name"},
    "block_out_channels": [16, 32, 64],
    "attention_head_dim": [1, 2, 4],
    "norm_num_groups": 8,
    "cross_attention_dim": _TINY_TEXT_DIM_1 + _TINY_TEXT_DIM_2,
    "addition_time_embed_dim": _TINY_TIME_EMBED_DIM,
    # six time ids (original size, crop top-left, target size) plus the pooled text embedding
    "projection_class_embeddings_input_dim": 6 * _TINY_TIME_EMBED_DIM + _TINY_PROJECTION_DIM,
    "sample_size": 8,
}


def sdxl_base_unet_config() -> dict[str, Any]:
    """A copy of the SDXL-Base-1.0 U-Net config (safe to edit)."""
    return copy.deepcopy(SDXL_BASE_UNET_CONFIG)


def build_tiny_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A byte-level BPE ``CLIPTokenizer`` made on the spot (no download).

    Its vocabulary is the 256 byte symbols (plain and word-final), a few merges of common
    English pieces and CLIP's two special tokens, so any text tokenizes.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised ``StableDiffusionXLPipeline`` folder to ``path``.

    Same classes and folder layout as ``stabilityai/stable-diffusion-xl-base-1.0``; weights
    as safetensors. The VAE downsamples by 8 like SDXL's, so a 64x64 image has 8x8 latents.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    common = {
        "vocab_size": vocab_size,
        "max_position_embeddings": tokenizer.model_max_length,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_act": "gelu",
    }
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=_TINY_TEXT_DIM_1, intermediate_size=64, **common)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=_TINY_TEXT_DIM_2,
            intermediate_size=64,
            projection_dim=_TINY_PROJECTION_DIM,
            **common,
        )
    )
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
    )
    # The scheduler config of SDXL-Base-1.0.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    logger.info("tiny SDXL pipeline written to %s", path)
    return Path(path)
