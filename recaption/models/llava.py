"""LLaVA captioners: loading llava-hf checkpoints for batched captioning.

Real checkpoints (``llava-hf/llava-1.5-7b-hf``, ``llava-hf/llava-1.5-13b-hf``,
``llava-hf/llava-v1.6-mistral-7b-hf``, or a local folder holding one) load through
transformers' own ``AutoProcessor`` and ``AutoModelForImageTextToText``: safetensors only,
remote code off unless asked for, SDPA attention, left padding for batched generation, and
prompts written by the checkpoint's own chat template. The tiny LLaVAs of the demo and the
tests (:func:`recaption.demo.tiny_models.build_tiny_llava`) load through the same
:func:`load_captioner` path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Captioner:
    """A loaded LLaVA checkpoint ready to caption: processor, model and where it runs."""

    processor: Any
    model: Any
    device: str
    dtype: Any
    name: str
    revision: str | None

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end a caption (the generation config's, else the tokenizer's)."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list | tuple) else {int(eos)}

    @property
    def pad_token_id(self) -> int:
        """The padding id generate() fills finished rows with."""
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.processor.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_token_ids)
        return int(pad[0] if isinstance(pad, list | tuple) else pad)


def resolve_dtype(dtype: str, device: str) -> Any:
    """The torch dtype for ``dtype`` ("auto": bf16 on GPUs that have it, else fp16; fp32 on CPU)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_checkpoint(model: str, revision: str | None, trust_remote_code: bool) -> Any:
    """Load the checkpoint's config, failing with a clear message if it is not a LLaVA-like VLM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    local = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or local.exists() or model.count("/") > 1
    if looks_local and not local.is_dir():
        raise FileNotFoundError(
            f"caption.model {model!r}: no such folder. Give a hub id such as "
            "llava-hf/llava-1.5-7b-hf or the folder of a saved checkpoint"
        )
    if local.is_dir() and not (local / "config.json").exists():
        raise FileNotFoundError(
            f"caption.model {model!r}: the folder has no config.json, so it is not a saved "
            "transformers checkpoint; point caption.model at the folder save_pretrained wrote"
        )
    try:
        config = AutoConfig.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"caption.model {model!r} (revision {revision or 'default'}) could not be loaded: "
            f"{exc}. Check the hub id and revision, or download the checkpoint and point "
            "caption.model at its folder"
        ) from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not trust_remote_code:
        raise RuntimeError(
            f"caption.model {model!r} is a {model_type!r} model, not a vision-language model "
            "that AutoModelForImageTextToText can load; use a LLaVA checkpoint such as "
            "llava-hf/llava-1.5-7b-hf"
        )
    if local.is_dir() and not any(local.glob("*.safetensors")):
        pickled = sorted(p.name for p in local.glob("*.bin")) or ["no weight files"]
        raise RuntimeError(
            f"caption.model {model!r} has no .safetensors weights ({', '.join(pickled)}); only "
            "safetensors are loaded, since pickled weights can run code. Convert with "
            "model.save_pretrained(folder) from a trusted environment"
        )
    return config


def load_captioner(
    model: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device: str = "cpu",
    name: str | None = None,
) -> Captioner:
    """Load a LLaVA checkpoint (hub id or folder) for batched captioning.

    Safetensors only, SDPA attention where the architecture has it (transformers' default),
    the tokenizer padded on the left. Raises
    :class:`FileNotFoundError` for a missing folder and :class:`RuntimeError` for a checkpoint
    that cannot be loaded or is not a vision-language model.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_checkpoint(model, revision, trust_remote_code)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code
        )
        vlm = AutoModelForImageTextToText.from_pretrained(
            model,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            dtype=torch_dtype,
            # No attn_implementation: transformers takes SDPA for every sub-model that has
            # it and eager for the others (a convolutional vision tower has no SDPA path, and
            # forcing it would refuse the whole checkpoint).
        )
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"caption.model {model!r}: loading failed: {exc}. Only safetensors weights are "
            "loaded; convert .bin checkpoints with save_pretrained(safe_serialization=True)"
        ) from exc
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise RuntimeError(
            f"caption.model {model!r}: its processor has no tokenizer and image processor; "
            "it is not a LLaVA-style checkpoint"
        )
    # Batched generation with a decoder-only model needs the padding on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(processor, "chat_template", None) is None and not tokenizer.chat_template:
        raise RuntimeError(
            f"caption.model {model!r} has no chat template; LLaVA prompts are written with the "
            "checkpoint's own template (chat_template.json), so add one to the folder"
        )
    vlm.to(device)
    vlm.eval()
    revision_used = revision or getattr(vlm.config, "_commit_hash", None)
    logger.info(
        "loaded %s (%s, %.1fM parameters) on %s as %s",
        name or model,
        type(vlm).__name__,
        sum(p.numel() for p in vlm.parameters()) / 1e6,
        device,
        str(torch_dtype).removeprefix("torch."),
    )
    return Captioner(processor, vlm, device, torch_dtype, name or model, revision_used)


def chat_prompt(processor: Any, instruction: str) -> str:
    """The full model prompt for one image and ``instruction``, from the checkpoint's template."""
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
    ]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
