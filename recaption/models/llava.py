"""LLaVA captioners: loading real llava-hf checkpoints, and tiny ones for tests and the demo.

Real checkpoints (``llava-hf/llava-1.5-7b-hf``, ``llava-hf/llava-1.5-13b-hf``,
``llava-hf/llava-v1.6-mistral-7b-hf``, or a local folder holding one) load through
transformers' own ``AutoProcessor`` and ``AutoModelForImageTextToText``: safetensors only,
remote code off unless asked for, SDPA attention, left padding for batched generation, and
prompts written by the checkpoint's own chat template.

:func:`build_tiny_llava` writes a LLaVA-1.5 or LLaVA-NeXT with the same classes but a few
thousand random weights and a tokenizer trained on the spot, so that tests and the demo load
it through exactly the same :func:`load_captioner` path. Its captions are noise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The llava-hf LLaVA-1.5 template ("USER: <image>\n... ASSISTANT:"), as in its chat_template.json.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The llava-v1.6-mistral template ("[INST] <image>\n... [/INST]").
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% if message['role'] == 'user' %}{{ ' [/INST]' }}{% else %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
)

TINY_VARIANTS = ("llava-1.5", "llava-next")

# Words the tiny tokenizer learns from: the demo world's shapes, colours and caption phrasing.
_TINY_CORPUS_WORDS = (
    "a an the of on in with and is are this image shows depicts features photo painting "
    "drawing picture style detailed background foreground center left right top bottom "
    "red green blue yellow orange purple pink black white gray brown dark light bright "
    "circle square star triangle stripe stripes gradient pattern shape shapes small large "
    "describe its very manner short sentence original text hint colorful scene object "
    "USER ASSISTANT INST"
)


def _tiny_tokenizer(chat_template: str) -> Any:
    """A SentencePiece-style BPE tokenizer (400 tokens) trained here on a small corpus.

    Like Llama's tokenizer it marks word starts with "▁", so even random weights decode to
    word-like pieces; characters outside printable ASCII become ``<unk>``.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=[*string.printable.strip(), "▁", "\n"],
        show_progress=False,
    )
    words = _TINY_CORPUS_WORDS.split()
    corpus = [" ".join(words[i : i + 9]) + ".\n" for i in range(len(words))] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=chat_template,
        model_max_length=1024,
    )


def build_tiny_llava(path: Path, variant: str = "llava-1.5", seed: int = 0) -> Path:
    """Build a tiny random LLaVA-1.5 or LLaVA-NeXT and ``save_pretrained`` it into ``path``.

    The real classes at toy sizes: a CLIP vision tower on 32 px images (8 px patches), a
    2-layer Llama with hidden size 64, and a byte-level BPE tokenizer trained on the spot with
    an ``<image>`` token and the checkpoint family's chat template. The build is seeded, so the
    same ``seed`` gives the same weights and tokenizer. Returns ``path``.
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny LLaVA variant {variant!r}; use one of {TINY_VARIANTS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    template = LLAVA_15_CHAT_TEMPLATE if variant == "llava-1.5" else LLAVA_NEXT_CHAT_TEMPLATE
    tokenizer = _tiny_tokenizer(template)
    image_size, patch_size = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    n_patches = (image_size // patch_size) ** 2
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": image_token_id,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "image_seq_length": n_patches,
    }
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    proc_kw = {
        "patch_size": patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # the CLS token, as in the llava-hf processors
    }
    torch.manual_seed(seed)
    if variant == "llava-1.5":
        config = LlavaConfig(**common)
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=mean,
            image_std=std,
        )
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **proc_kw
        )
    else:
        pinpoints = [[32, 64], [64, 32], [64, 64]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
            image_mean=mean,
            image_std=std,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **proc_kw
        )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    (path / "recaption_tiny.json").write_text(
        json.dumps({"variant": variant, "seed": seed, "note": "random weights"}, indent=2)
    )
    return path


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

    Safetensors only, SDPA attention, the tokenizer padded on the left. Raises
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
            attn_implementation="sdpa",
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
