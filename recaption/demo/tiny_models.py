"""Tiny models for the demo and the tests: real classes, toy sizes, random weights.

Each builder writes a folder with ``save_pretrained`` that loads back through the same
``from_pretrained`` path as the real checkpoint (:mod:`recaption.demo.models` resolves
``demo:NAME`` specs to them):

- :func:`build_tiny_llava`: a LLaVA-1.5 or LLaVA-NeXT (``llava-hf`` classes) with a few
  thousand random weights and a tokenizer trained on the spot, loaded by
  :func:`recaption.models.llava.load_captioner`. Its captions are noise.
- :func:`build_tiny_clip`: a ``CLIPModel`` + ``CLIPProcessor`` with a tokenizer built on the
  spot (``demo:tiny-clip``), loaded like ``openai/clip-vit-large-patch14``.
- :func:`build_tiny_sdxl`: a complete ``StableDiffusionXLPipeline`` folder with the same
  classes as ``stabilityai/stable-diffusion-xl-base-1.0`` (two CLIP text encoders, two CLIP
  tokenizers, an ``AutoencoderKL``, a ``UNet2DConditionModel`` and an
  ``EulerDiscreteScheduler``). The tiny U-Net (:data:`TINY_SDXL_UNET_CONFIG`) keeps SDXL's
  block layout (no attention in the first down block, transformer depths ``[1, 2, 10]``, a
  cross-attention mid-block, ``text_time`` conditioning) so the KOALA presets apply to it
  unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from recaption.models.sdxl import SDXL_BASE_UNET_CONFIG

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------------------

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


# The tiny LLaVA's vision tower: 32 px images cut into 8 px patches.
_TINY_LLAVA_IMAGE_SIZE = 32
_TINY_LLAVA_PATCH_SIZE = 8
# CLIP's pixel normalisation, as in the llava-hf image processors.
_CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _tiny_llava_config_kwargs(tokenizer: Any) -> dict[str, Any]:
    """The arguments ``LlavaConfig`` and ``LlavaNextConfig`` share, sized for ``tokenizer``.

    A CLIP vision tower on 32 px images (8 px patches) and a 2-layer Llama, hidden size 64.
    """
    from transformers import CLIPVisionConfig, LlamaConfig

    image_size, patch_size = _TINY_LLAVA_IMAGE_SIZE, _TINY_LLAVA_PATCH_SIZE
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
    return {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": image_token_id,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "image_seq_length": n_patches,
    }


def _tiny_llava_processor_kwargs() -> dict[str, Any]:
    """The processor arguments both variants share (how many image tokens a picture takes)."""
    return {
        "patch_size": _TINY_LLAVA_PATCH_SIZE,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # the CLS token, as in the llava-hf processors
    }


def _tiny_llava_15(config_kw: dict[str, Any], tokenizer: Any, template: str) -> tuple[Any, Any]:
    """A random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_size = _TINY_LLAVA_IMAGE_SIZE
    model = LlavaForConditionalGeneration(LlavaConfig(**config_kw))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(_CLIP_IMAGE_MEAN),
        image_std=list(_CLIP_IMAGE_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        **_tiny_llava_processor_kwargs(),
    )
    return model, processor


def _tiny_llava_next(config_kw: dict[str, Any], tokenizer: Any, template: str) -> tuple[Any, Any]:
    """A random ``LlavaNextForConditionalGeneration`` and its ``LlavaNextProcessor``.

    The any-resolution grid goes up to 64x64 px (2x2 tiles of 32 px).
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    image_size = _TINY_LLAVA_IMAGE_SIZE
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    model = LlavaNextForConditionalGeneration(
        LlavaNextConfig(**config_kw, image_grid_pinpoints=pinpoints)
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=list(_CLIP_IMAGE_MEAN),
        image_std=list(_CLIP_IMAGE_STD),
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        **_tiny_llava_processor_kwargs(),
    )
    return model, processor


def _save_tiny_llava(
    path: Path, model: Any, processor: Any, tokenizer: Any, variant: str, seed: int
) -> None:
    """Give ``model`` the tokenizer's special tokens to generate with and save everything."""
    from transformers import GenerationConfig

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


def build_tiny_llava(path: Path, variant: str = "llava-1.5", seed: int = 0) -> Path:
    """Build a tiny random LLaVA-1.5 or LLaVA-NeXT and ``save_pretrained`` it into ``path``.

    The real classes at toy sizes: a CLIP vision tower on 32 px images (8 px patches), a
    2-layer Llama with hidden size 64, and a byte-level BPE tokenizer trained on the spot with
    an ``<image>`` token and the checkpoint family's chat template. The build is seeded, so the
    same ``seed`` gives the same weights and tokenizer. Returns ``path``.
    """
    import torch

    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny LLaVA variant {variant!r}; use one of {TINY_VARIANTS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    template = LLAVA_15_CHAT_TEMPLATE if variant == "llava-1.5" else LLAVA_NEXT_CHAT_TEMPLATE
    tokenizer = _tiny_tokenizer(template)
    config_kw = _tiny_llava_config_kwargs(tokenizer)
    torch.manual_seed(seed)
    build = _tiny_llava_15 if variant == "llava-1.5" else _tiny_llava_next
    model, processor = build(config_kw, tokenizer, template)
    _save_tiny_llava(path, model, processor, tokenizer, variant, seed)
    return path


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_tiny_clip(path: Path) -> Path:
    """Build a tiny random ``CLIPModel`` + ``CLIPProcessor`` and ``save_pretrained`` them.

    The tokenizer is CLIP's own byte-level BPE with a character-level vocabulary (every byte,
    alone and as a word end, and a few merges), so any text, emoji and right-to-left scripts
    included, tokenizes without an unknown token.
    """
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = ["t h", "th e</w>", "a n", "an d</w>", "o n</w>", "i n</w>", "o f</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    tokenizer.model_max_length = 77

    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# SDXL
# ---------------------------------------------------------------------------------------------

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


def _tiny_sdxl_text_encoders(tokenizer: Any) -> tuple[Any, Any]:
    """SDXL's two text encoders at toy width, both for ``tokenizer``.

    A ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` (the pooled embedding).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = {
        "vocab_size": len(tokenizer),
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
    return text_encoder, text_encoder_2


def _tiny_sdxl_vae() -> Any:
    """A small ``AutoencoderKL`` that downsamples by 8 and scales latents like SDXL's VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
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


def _sdxl_base_scheduler() -> Any:
    """The ``EulerDiscreteScheduler`` with the scheduler config of SDXL-Base-1.0."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
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


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised ``StableDiffusionXLPipeline`` folder to ``path``.

    Same classes and folder layout as ``stabilityai/stable-diffusion-xl-base-1.0``; weights
    as safetensors. The VAE downsamples by 8 like SDXL's, so a 64x64 image has 8x8 latents.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    # Built in this order from one seeded generator: the weights depend on it.
    text_encoder, text_encoder_2 = _tiny_sdxl_text_encoders(tokenizer)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    vae = _tiny_sdxl_vae()
    scheduler = _sdxl_base_scheduler()
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
