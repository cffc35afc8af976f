"""Train the demo's SDXL teacher on the demo world (the ``shapes-sdxl`` weights).

KOALA distils a student U-Net from a strong pretrained SDXL. The demo cannot download
SDXL-Base-1.0, so its teacher is a tiny SDXL trained here, on the CPU, on the very world the
demo dataset is drawn from: images of :func:`recaption.demo.world.draw_image` (one to three
coloured shapes on a plain, gradient or textured background) paired, like SDXL's own training
data, with web alt-texts: the world's noisy alt-texts (:func:`recaption.demo.world.noisy_alt_text`:
file names, a bare "red circle", keyword spam, other languages, empty ones, and "Red circle on
a plain background"). It then knows what alt-texts say and nothing of what they never say:
asked for "a large red circle in the centre on a plain blue background" it draws the red
object well above chance and the blue background at chance (``recaption_demo.json``, judged
by pixels: :func:`judge_colours`). That gap is what recaptioning is for: a student distilled on
the LLaVA captions of the same images learns the background colours from them, one distilled
on the alt-texts does not (``benchmarks/recaption_effect.py``). ``captions="describe"`` trains
on ground-truth descriptions instead (a teacher that already knows everything the captions
could teach). It is a stand-in trained for minutes, not SDXL: its shapes are blurry blobs.

What is trained, in order, with the classes and folder layout of
``stabilityai/stable-diffusion-xl-base-1.0`` (:func:`recaption.demo.tiny_models.build_tiny_sdxl`):

1. the two tokenizers (one and the same): a CLIP byte-level BPE (:func:`build_world_tokenizer`)
   whose merges make every word of the world's captions and alt-texts one token, with
   CLIP's byte fallback for any other text;
2. the ``AutoencoderKL`` (downsampling by 8: 64x64 px images, 4x8x8 latents), on
   reconstruction (MSE) with a small KL term; its ``scaling_factor`` is set from the measured
   latent standard deviation, as SD's was (SDXL's VAE config has no shift). On the same
   images, the two text encoders (``CLIPTextModel``, ``CLIPTextModelWithProjection``) are
   pretrained contrastively against a throwaway image tower (:class:`TextPretraining`), as
   SDXL's are pretrained CLIP text towers;
3. the U-Net (exactly :data:`~recaption.demo.tiny_models.TINY_SDXL_UNET_CONFIG`, so the KOALA
   presets apply; residual branches zero-initialised) and the text encoders, jointly, on the
   alt-texts (:func:`training_prompt`), on the
   epsilon-prediction loss with the noise of DDPM's forward process (the scheduler's
   ``add_noise``), conditioned the way ``StableDiffusionXLPipeline.encode_prompt`` conditions:
   the penultimate hidden states of both encoders concatenated, the pooled projection of the
   second as ``text_embeds`` and ``time_ids`` = (original size, crop top-left, target size).
   One prompt in ten is dropped to ``""`` for classifier-free guidance; the pipeline is saved
   with ``force_zeros_for_empty_prompt=False`` so that its unconditional branch is that same
   encoded empty prompt (the KOALA train stage encodes ``""`` too).

Two departures from SDXL's recipe make a few minutes of training draw what the prompt says at
8x8 latents: offset noise (0.2; :func:`recaption.training.distiller.training_noise`, as the
KOALA train stage's ``train.noise_offset``) so that the starting noise's mean
does not decide the colours, and the high-noise steps weighted up to x0-loss weight
(:func:`loss_weights`), where colour and layout are decided.

Training images are drawn fresh from world seeds ``10_000`` upward (the demo run draws its
world with seed 0, the tests with small seeds), keeping only square draws so that the
positions the captions name are where the shapes are; they are resized to 64x64. The
diffusion stage keeps their VAE posteriors in a buffer that takes 16 fresh images a step
(:class:`LatentBuffer`). The micro-conditioning is the SDXL recipe with one change: a
quarter of the samples get the crop offsets the KOALA data pipeline gives non-square world
images, on the uncropped image, so the teacher learns to ignore crop offsets instead of
extrapolating from values it never saw. Seeds, steps, the world version, losses, wall times
and the judged sample accuracy are written to ``recaption_demo.json`` in the output folder.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from PIL import Image
from safetensors.torch import save_file

from recaption.demo import world
from recaption.demo.describe import _POSITION_PHRASES, background_colours, describe
from recaption.demo.tiny_models import (
    TINY_SDXL_UNET_CONFIG,
    _bytes_to_unicode,
    _sdxl_base_scheduler,
    _tiny_sdxl_text_encoders,
)
from recaption.training.distiller import training_noise

logger = logging.getLogger(__name__)

RESOLUTION = 64
# World seeds of the training images start here; the demo run and the tests use small seeds.
TRAIN_SEED_START = 10_000
# Held-out images (VAE reconstruction, CLIP retrieval) come from seeds far above the training
# range.
HELD_OUT_SEED_START = 50_000_000
METADATA_FILE = "recaption_demo.json"

# CLIP's pre-tokenizer pattern (contractions, letter runs, single digits, other symbols).
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


def _corpus_truth(rng: random.Random) -> dict[str, Any]:
    """A ground truth in the world's format, drawn without drawing pixels (for text only)."""
    kind = rng.choice(world.BACKGROUNDS)
    c1, c2 = rng.sample(sorted(world.COLOURS), 2)
    colour = {"plain": c1, "gradient": f"{c1} to {c2}", "texture": f"{c1} and {c2}"}[kind]
    n_objects = rng.choice((1, 2, 3))
    objects = [
        {
            "shape": rng.choice(world.SHAPES),
            "colour": rng.choice(sorted(world.COLOURS)),
            "size": rng.choice(sorted(world.SIZES)),
            "position": position,
        }
        for position in rng.sample(sorted(world.POSITIONS), n_objects)
    ]
    return {
        "width": RESOLUTION,
        "height": RESOLUTION,
        "background": kind,
        "colour": colour,
        "objects": objects,
    }


def world_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Texts of the demo world: ``n`` describe() captions, ``n`` alt-texts, every spam and
    foreign word of the world."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        truth = _corpus_truth(rng)
        texts.append(describe(truth, rng))
        texts.append(world.noisy_alt_text(rng, i, truth))
    texts.append(" ".join(world.SPAM))
    texts.extend(word for words in world.FOREIGN.values() for word in words)
    return texts


def _normalizer() -> Any:
    """CLIP's text normalisation: NFC, whitespace runs to one space, lower case."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )


def world_words(texts: Sequence[str] | None = None) -> list[str]:
    """The words (CLIP pre-tokens, lower case) of ``texts``, by default of :func:`world_corpus`."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True)
    normalizer = _normalizer()
    words = set()
    for text in world_corpus() if texts is None else texts:
        words.update(word for word, _ in split.pre_tokenize_str(normalizer.normalize_str(text)))
    return sorted(words)


def train_bpe_merges(texts: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges with CLIP's conventions, learnt on ``texts`` until every word is one token.

    Byte-level symbols (GPT-2/CLIP's byte-to-unicode table) and the ``</w>`` end-of-word
    suffix, as in CLIP's ``merges.txt``.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: merging stops when every word is one symbol
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return [tuple(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: the 256 byte symbols, the same with ``</w>``, one token per
    merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>``."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab[token] = len(vocab)
    for left, right in merges:
        if left not in vocab or right not in vocab:
            raise ValueError(f"merge {left!r} {right!r} uses a symbol not in the vocabulary")
        vocab.setdefault(left + right, len(vocab))
    for special in (BOS_TOKEN, EOS_TOKEN):
        vocab[special] = len(vocab)
    return vocab


def build_world_tokenizer(model_max_length: int = 77) -> Any:
    """A ``CLIPTokenizer`` whose every world word is one token; any other text falls back to
    CLIP's byte symbols (no unknown token). Deterministic: the same merges every time."""
    from transformers import CLIPTokenizer

    texts = world_corpus()
    merges = train_bpe_merges(texts)
    tokenizer = CLIPTokenizer(
        vocab=clip_vocab(merges), merges=list(merges), model_max_length=model_max_length
    )
    long_words = [w for w in world_words(texts) if len(tokenizer.tokenize(w)) != 1]
    if long_words:
        raise RuntimeError(f"world words split into several tokens: {long_words[:10]}")
    return tokenizer


def save_clip_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` plus CLIP's ``vocab.json`` and ``merges.txt``, as in SDXL's repo."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    lines = ["#version: 0.2", *(" ".join(pair) for pair in model["merges"])]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The world's images
# ---------------------------------------------------------------------------------------------


def square_world_seeds(start: int) -> Iterator[int]:
    """World seeds from ``start`` upward whose :func:`~recaption.demo.world.draw_image` is
    square (it picks the aspect first; :func:`draw_square` checks the drawing too)."""
    seed = start
    while True:
        if random.Random(seed).choice(world.ASPECTS) == (1, 1):
            yield seed
        seed += 1


def draw_square(seed: int, size: int = RESOLUTION) -> tuple[Image.Image, dict[str, Any]] | None:
    """World image ``seed`` resized to ``size`` x ``size`` and its truth; None if not square."""
    image, truth = world.draw_image(random.Random(seed))
    if image.width != image.height:
        return None
    return image.resize((size, size), Image.Resampling.BICUBIC), truth


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> a float batch in [-1, 1], NCHW."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


@dataclass
class WorldStream:
    """Fresh square world images, one seed after the other from ``start``."""

    start: int
    size: int = RESOLUTION
    first: int | None = None
    last: int | None = None
    n_drawn: int = 0
    _seeds: Iterator[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._seeds = square_world_seeds(self.start)

    def batch(self, n: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """``n`` images as pixels in [-1, 1] and their truths."""
        images, truths = [], []
        while len(images) < n:
            seed = next(self._seeds)
            drawn = draw_square(seed, self.size)
            if drawn is None:
                continue
            self.first = seed if self.first is None else self.first
            self.last = seed
            self.n_drawn += 1
            images.append(drawn[0])
            truths.append(drawn[1])
        return to_pixels(images), truths

    def record(self) -> dict[str, Any]:
        """What went into training, for ``recaption_demo.json``."""
        return {
            "first": self.first,
            "last": self.last,
            "n_images": self.n_drawn,
            "rule": "world.draw_image(random.Random(s)) for the seeds s in [first, last] whose "
            "drawing is square, resized to 64x64 px",
        }


# ---------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------

VAE_BLOCK_OUT_CHANNELS = (8, 16, 32, 32)


def world_vae() -> Any:
    """A small ``AutoencoderKL`` downsampling by 8 (4x8x8 latents for 64x64 px).

    Its posterior starts narrow (log-variance -4): a posterior of unit variance at the
    start makes a short training decode noisy latents to washed-out average colours, and the
    log-variance only falls slowly under the small KL weight."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=list(VAE_BLOCK_OUT_CHANNELS),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RESOLUTION,
    )
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -4.0
    return vae


def _cosine_lr(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Contrastive pretraining of the text encoders (SDXL's are pretrained CLIP text towers)
# ---------------------------------------------------------------------------------------------

# CLIP's pixel normalisation (openai/clip-vit-large-patch14's preprocessor_config.json).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def swap_main_colour(truth: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``truth`` with its main object's colour replaced by one that is nowhere in the image
    (or, if every colour is, by any other)."""
    used = {obj["colour"] for obj in truth["objects"]} | set(background_colours(truth))
    main = truth["objects"][0]["colour"]
    others = [c for c in sorted(world.COLOURS) if c not in used] or [
        c for c in sorted(world.COLOURS) if c != main
    ]
    swapped = copy.deepcopy(truth)
    swapped["objects"][0]["colour"] = rng.choice(others)
    return swapped


def caption_pair(truth: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """A describe() caption of ``truth`` and the same wording with the main colour swapped
    (a hard negative, as in NegCLIP, Yuksekgonul et al., 2023)."""
    swapped = swap_main_colour(truth, rng)
    wording = rng.getstate()
    caption = describe(truth, rng)
    after = rng.getstate()
    rng.setstate(wording)
    negative = describe(swapped, rng)
    rng.setstate(after)
    return caption, negative


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss for ``n`` (image, text) pairs; texts beyond the first
    ``n`` are extra negatives of the image -> text direction."""
    n = image_embeds.shape[0]
    logits = (
        logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    )
    labels = torch.arange(n)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :n].T, labels)) / 2


class TextPretraining(torch.nn.Module):
    """The two SDXL text encoders, each paired with a throwaway image tower head for CLIP's
    contrastive loss: a tiny ``CLIPVisionModel`` on 32 px images and linear projections
    (the first encoder has no projection of its own)."""

    def __init__(self, text_encoder: Any, text_encoder_2: Any) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        width = 48
        self.vision = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=4,
            )
        )
        dim_1 = text_encoder.config.hidden_size
        dim_2 = text_encoder_2.config.projection_dim
        self.image_projection = torch.nn.Linear(width, dim_1, bias=False)
        self.image_projection_2 = torch.nn.Linear(width, dim_2, bias=False)
        self.text_projection = torch.nn.Linear(dim_1, dim_1, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        mean, std = torch.tensor(CLIP_IMAGE_MEAN), torch.tensor(CLIP_IMAGE_STD)
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)

    def loss(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Contrastive loss of both encoders on 64 px ``pixels`` in [-1, 1] and captions
        (the first ``len(pixels)`` ids are the pairs, the rest hard negatives)."""
        small = F.avg_pool2d(pixels, 2)
        small = ((small + 1) / 2 - self.pixel_mean) / self.pixel_std
        image = self.vision(pixel_values=small).pooler_output
        text_1 = self.text_projection(self.text_encoder(input_ids).pooler_output)
        text_2 = self.text_encoder_2(input_ids).text_embeds
        scale = self.logit_scale.clamp(max=math.log(100))
        return (
            contrastive_loss(self.image_projection(image), text_1, scale)
            + contrastive_loss(self.image_projection_2(image), text_2, scale)
        ) / 2


def train_first_stage(
    vae: Any,
    text: TextPretraining,
    tokenizer: Any,
    stream: WorldStream,
    steps: int,
    rng: random.Random,
    *,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
) -> tuple[list[float], list[float]]:
    """Train ``vae`` to reconstruct world images (MSE + ``kl_weight`` x KL) and, on the same
    images, the text encoders contrastively; returns the MSE and contrastive losses."""
    vae.train()
    text.train()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(vae.parameters()), "weight_decay": 0.0},
            {"params": list(text.parameters()), "weight_decay": 0.05},
        ],
        lr=learning_rate,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_lr(s, steps, max(1, steps // 20))
    )
    mse_losses, text_losses = [], []
    latent_numel = vae.config.latent_channels * (RESOLUTION // 8) ** 2
    for step in range(steps):
        pixels, truths = stream.batch(batch_size)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, pixels)
        captions, negatives = zip(*(caption_pair(t, rng) for t in truths), strict=True)
        ids = tokenizer([*captions, *negatives], padding="longest", return_tensors="pt")
        contrastive = text.loss(pixels, ids.input_ids)
        loss = mse + kl_weight * posterior.kl().mean() / latent_numel + contrastive
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(text.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        mse_losses.append(mse.item())
        text_losses.append(contrastive.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info(
                "first stage step %d/%d: vae mse %.4f, contrastive %.3f",
                step + 1,
                steps,
                mse.item(),
                contrastive.item(),
            )
    vae.eval()
    text.eval()
    return mse_losses, text_losses


@torch.no_grad()
def evaluate_text_pretraining(
    text: TextPretraining, tokenizer: Any, n: int = 256, group: int = 16
) -> dict[str, float]:
    """Held-out check of the contrastive pretraining (second encoder): how often the true
    caption beats those of ``group - 1`` other images, and the colour-swapped caption."""
    rng = random.Random(0)
    pixels, truths = WorldStream(HELD_OUT_SEED_START).batch(n)
    captions, negatives = zip(*(caption_pair(t, rng) for t in truths), strict=True)
    ids = tokenizer([*captions, *negatives], padding="longest", return_tensors="pt").input_ids
    small = ((F.avg_pool2d(pixels, 2) + 1) / 2 - text.pixel_mean) / text.pixel_std
    image = F.normalize(
        text.image_projection_2(text.vision(pixel_values=small).pooler_output), dim=-1
    )
    texts = F.normalize(text.text_encoder_2(ids).text_embeds, dim=-1)
    true, swapped = texts[:n], texts[n:]
    hits = sum(
        int((image[i : i + group] @ true[i : i + group].T).argmax(1).eq(torch.arange(group)).sum())
        for i in range(0, n - group + 1, group)
    )
    swap = float(((image * true).sum(-1) > (image * swapped).sum(-1)).float().mean())
    return {
        f"retrieval_accuracy_1_of_{group}": round(hits / (n - n % group), 3),
        "colour_swap_accuracy": round(swap, 3),
    }


@torch.no_grad()
def evaluate_vae(vae: Any, n: int = 128) -> dict[str, Any]:
    """Held-out reconstruction MSE (pixels in [0, 1]), overall and per background kind, and
    the standard deviation of the latents (for ``scaling_factor``)."""
    pixels, truths = WorldStream(HELD_OUT_SEED_START).batch(n)
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.mode()).sample.clamp(-1, 1)
    per_image = ((reconstruction - pixels) / 2).pow(2).mean(dim=(1, 2, 3))
    by_kind = {
        kind: round(float(per_image[[t["background"] == kind for t in truths]].mean()), 5)
        for kind in world.BACKGROUNDS
    }
    return {
        "held_out_images": n,
        "mse": round(float(per_image.mean()), 5),
        "mse_by_background": by_kind,
        "latent_std": float(posterior.sample().std()),
        "latent_mean": [round(float(m), 4) for m in posterior.mean.mean(dim=(0, 2, 3))],
    }


# ---------------------------------------------------------------------------------------------
# The diffusion model
# ---------------------------------------------------------------------------------------------


def zero_init_residual_branches(unet: Any) -> None:
    """Zero the last layer of every residual branch and the output convolution, as ADM's U-Net
    is initialised (Dhariwal & Nichol, 2021): each block starts as the identity, so the deep
    transformer stacks of the SDXL layout train from scratch in few steps."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    zeroed = [unet.conv_out]
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            zeroed.append(module.conv2)
        elif isinstance(module, Transformer2DModel):
            zeroed.append(module.proj_out)
        elif isinstance(module, BasicTransformerBlock):
            zeroed += [module.attn1.to_out[0], module.attn2.to_out[0], module.ff.net[-1]]
    with torch.no_grad():
        for layer in zeroed:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()


def encode_prompts(
    tokenizers: Sequence[Any], text_encoders: Sequence[Any], prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled_prompt_embeds)`` as ``StableDiffusionXLPipeline.encode_prompt``
    computes them (no clip skip): the penultimate hidden states of both encoders, concatenated,
    and the second encoder's projected pooled output."""
    embeds, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        output = text_encoder(ids, output_hidden_states=True)
        if output[0].ndim == 2:
            pooled = output[0]
        embeds.append(output.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def _time_ids(rng: random.Random, truths: Sequence[dict[str, Any]]) -> torch.Tensor:
    """SDXL's ``add_time_ids`` rows: (original h, w, crop top, left, target h, w).

    The original size is the drawn one (or, one time in five, the target size, the
    pipeline's default); the crop is (0, 0) but for a quarter of the samples, which get an
    offset the KOALA data pipeline gives a non-square world image (up to 50 px on one axis).
    """
    rows = []
    for truth in truths:
        size = [int(truth["height"]), int(truth["width"])]
        if rng.random() < 0.2:
            size = [RESOLUTION, RESOLUTION]
        crop = [0, 0]
        if rng.random() < 0.25:
            crop[rng.randrange(2)] = rng.randint(1, 50)
        rows.append([*size, *crop, RESOLUTION, RESOLUTION])
    return torch.tensor(rows, dtype=torch.float32)


@dataclass
class DiffusionSettings:
    """Hyperparameters of the joint text-encoder + U-Net training."""

    batch_size: int = 64
    learning_rate: float = 1e-3
    text_learning_rate: float = 3e-4
    warmup_steps: int = 50
    empty_prompt_ratio: float = 0.1
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.2
    ema_decay: float = 0.995
    buffer_size: int = 1024
    fresh_per_step: int = 16
    max_low_snr_weight: float = 50.0
    captions: str = "alt_text"  # what the U-Net is trained on: "alt_text" or "describe"


def training_prompt(truth: dict[str, Any], settings: DiffusionSettings, rng: random.Random) -> str:
    """The prompt one training image is paired with: ``""`` (for classifier-free guidance) at
    ``settings.empty_prompt_ratio``, else its alt-text as the demo world's metadata has them
    (``settings.captions == "alt_text"``, the way SDXL learnt from web alt-text) or a
    :func:`~recaption.demo.describe.describe` caption of its ground truth (``"describe"``)."""
    if rng.random() < settings.empty_prompt_ratio:
        return ""
    if settings.captions == "alt_text":
        return world.noisy_alt_text(rng, rng.randrange(10_000), truth)
    if settings.captions == "describe":
        return describe(truth, rng)
    raise ValueError(f"captions must be 'alt_text' or 'describe', not {settings.captions!r}")


def loss_weights(snr: torch.Tensor, settings: DiffusionSettings) -> torch.Tensor:
    """Per-sample weights of the epsilon loss: min-SNR-gamma (Hang et al., 2023) for the
    low-noise steps and, for the high-noise ones (SNR < 1), ``1 / SNR`` up to
    ``max_low_snr_weight``, which is the x0 loss there: with the plain epsilon loss the
    error of a wrong colour or layout at high noise is scaled down by the SNR, so the
    model barely learns the part that the caption decides. Positive weights per noise
    level leave the minimiser unchanged."""
    high = (1 / snr).clamp(min=1.0, max=settings.max_low_snr_weight)
    return snr.clamp(max=settings.min_snr_gamma) / snr * high


class LatentBuffer:
    """VAE posteriors of the latest ``capacity`` world images, with their truths.

    Every step ``fresh`` new images replace the oldest and a batch is drawn from the whole
    buffer (latents sampled from the posterior anew, captions written anew), so each image
    is seen a few times, with other noise and other wording, for a quarter of the cost of
    drawing and encoding a whole batch."""

    def __init__(self, vae: Any, stream: WorldStream, capacity: int) -> None:
        self.vae, self.stream, self.capacity = vae, stream, capacity
        self.mean = torch.empty(0)
        self.std = torch.empty(0)
        self.truths: list[dict[str, Any]] = []
        self.oldest = 0
        while len(self.truths) < capacity:
            self._append(min(64, capacity - len(self.truths)))

    @torch.no_grad()
    def _encode(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        pixels, truths = self.stream.batch(n)
        posterior = self.vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std, truths

    def _append(self, n: int) -> None:
        mean, std, truths = self._encode(n)
        self.mean = torch.cat([self.mean, mean]) if len(self.mean) else mean
        self.std = torch.cat([self.std, std]) if len(self.std) else std
        self.truths += truths

    def refresh(self, n: int) -> None:
        """Replace the ``n`` oldest images by fresh ones."""
        mean, std, truths = self._encode(n)
        for i in range(n):
            j = (self.oldest + i) % self.capacity
            self.mean[j], self.std[j], self.truths[j] = mean[i], std[i], truths[i]
        self.oldest = (self.oldest + n) % self.capacity

    def sample(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """``n`` random images: scaled latents drawn from their posteriors, and truths."""
        index = torch.randint(0, self.capacity, (n,), generator=generator)
        eps = torch.randn(self.mean[index].shape, generator=generator)
        latents = (self.mean[index] + self.std[index] * eps) * self.vae.config.scaling_factor
        return latents, [self.truths[i] for i in index.tolist()]


class _Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=True):
            param.copy_(shadow)


def train_diffusion(
    parts: dict[str, Any],
    stream: WorldStream,
    steps: int,
    settings: DiffusionSettings,
    rng: random.Random,
    callback: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``parts``' text encoders and U-Net jointly on VAE latents of ``stream``'s images;
    the EMA weights are copied in at the end. Returns the (weighted) losses. ``callback(step)``
    is called after every step."""
    from diffusers import DDPMScheduler

    unet = parts["unet"]
    # The forward process of the pipeline's (Euler) schedule, as SDXL's training scripts and
    # the KOALA distiller add noise: sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    text_encoders = [parts["text_encoder"], parts["text_encoder_2"]]
    tokenizers = [parts["tokenizer"], parts["tokenizer_2"]]
    unet_params = list(unet.parameters())
    text_params = [p for m in text_encoders for p in m.parameters()]
    for module in (unet, *text_encoders):
        module.train()
    optimizer = torch.optim.AdamW(
        [
            {"params": unet_params, "lr": settings.learning_rate},
            {"params": text_params, "lr": settings.text_learning_rate},
        ],
        betas=(0.9, 0.99),
        weight_decay=1e-2,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_lr(s, steps, min(settings.warmup_steps, steps))
    )
    ema = _Ema(unet_params + text_params, settings.ema_decay)
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    capacity = min(settings.buffer_size, steps * settings.fresh_per_step)
    buffer = LatentBuffer(parts["vae"], stream, max(capacity, settings.batch_size))
    losses = []
    for step in range(steps):
        if step:
            buffer.refresh(settings.fresh_per_step)
        latents, truths = buffer.sample(settings.batch_size, generator)
        prompts = [training_prompt(truth, settings, rng) for truth in truths]
        prompt_embeds, pooled = encode_prompts(tokenizers, text_encoders, prompts)
        noise = training_noise(latents, settings.noise_offset, generator)
        timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(
            noisy,
            timesteps,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": _time_ids(rng, truths)},
        ).sample
        # Min-SNR-gamma weighting (Hang et al., 2023) for epsilon prediction.
        weights = loss_weights(snr[timesteps], settings)
        loss = (
            F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights
        ).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet_params + text_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        ema.update()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            logger.info(
                "diffusion step %d/%d: loss %.4f (last 50: %.4f)",
                step + 1,
                steps,
                loss.item(),
                recent,
            )
        if callback is not None:
            callback(step + 1)
    ema.copy_to_params()
    for module in (unet, *text_encoders):
        module.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Judging samples by their pixels
# ---------------------------------------------------------------------------------------------

_COLOUR_NAMES = sorted(world.COLOURS)
_COLOUR_TABLE = np.array([world.COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float32)


def nearest_colours(pixels: np.ndarray) -> list[str]:
    """The nearest :data:`~recaption.demo.world.COLOURS` name of each RGB row of ``pixels``."""
    distances = ((pixels.reshape(-1, 1, 3).astype(np.float32) - _COLOUR_TABLE) ** 2).sum(-1)
    return [_COLOUR_NAMES[i] for i in distances.argmin(axis=1)]


def _majority(names: list[str]) -> str:
    return max(sorted(set(names)), key=names.count)


def object_colour(image: Image.Image, position: str = "centre", radius: int = 3) -> str:
    """Majority nearest world colour of the (2 radius)^2 px around ``position``'s grid point."""
    array = np.asarray(image.convert("RGB"))
    fx, fy = world.POSITIONS[position]
    cx, cy = round(fx * image.width), round(fy * image.height)
    patch = array[cy - radius : cy + radius, cx - radius : cx + radius]
    return _majority(nearest_colours(patch))


def background_colour(image: Image.Image, border: int = 2) -> str:
    """Majority nearest world colour of the ``border`` px frame of ``image``."""
    array = np.asarray(image.convert("RGB"))
    frame = np.concatenate(
        [
            array[:border].reshape(-1, 3),
            array[-border:].reshape(-1, 3),
            array[:, :border].reshape(-1, 3),
            array[:, -border:].reshape(-1, 3),
        ]
    )
    return _majority(nearest_colours(frame))


@dataclass(frozen=True)
class JudgePrompt:
    """A single-object prompt on a plain background and what its image must show."""

    text: str
    colour: str
    background: str
    position: str


def judge_prompts(n: int, seed: int = 0, centre_only: bool = True) -> list[JudgePrompt]:
    """``n`` prompts like "a large red circle in the centre on a plain blue background"
    (large or medium shapes; in the centre, or at any grid position)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        colour, background = rng.sample(_COLOUR_NAMES, 2)
        shape, size = rng.choice(world.SHAPES), rng.choice(("large", "medium"))
        position = "centre" if centre_only else rng.choice(sorted(world.POSITIONS))
        where = _POSITION_PHRASES[position][0]
        text = f"a {size} {colour} {shape} {where} on a plain {background} background"
        prompts.append(JudgePrompt(text, colour, background, position))
    return prompts


@torch.no_grad()
def judge_colours(
    pipe: Any,
    prompts: Sequence[JudgePrompt],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample ``prompts`` with ``pipe`` at 64x64 px and check the colours by pixels: the
    fraction whose object (at its grid point) and whose border have the colours asked for."""
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        prompt=[p.text for p in prompts],
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
    ).images
    objects = [
        object_colour(im, p.position) == p.colour for im, p in zip(images, prompts, strict=True)
    ]
    backgrounds = [
        background_colour(im) == p.background for im, p in zip(images, prompts, strict=True)
    ]
    n = len(prompts)
    return {
        "prompts": n,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "object_colour_accuracy": round(sum(objects) / n, 3),
        "background_colour_accuracy": round(sum(backgrounds) / n, 3),
        "both_accuracy": round(
            sum(o and b for o, b in zip(objects, backgrounds, strict=True)) / n, 3
        ),
        "images": images,
    }


# ---------------------------------------------------------------------------------------------
# The whole teacher
# ---------------------------------------------------------------------------------------------


def _save_pipeline(parts: dict[str, Any], out: Path) -> None:
    """Write the pipeline folder (U-Net in fp16 safetensors) to ``out`` atomically."""
    from diffusers import StableDiffusionXLPipeline

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # The U-Net in half precision (diffusers loads it back as float32 unless told otherwise).
    state = {k: v.to(torch.float16).contiguous() for k, v in parts["unet"].state_dict().items()}
    save_file(state, tmp / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    for name in ("tokenizer", "tokenizer_2"):
        save_clip_tokenizer(parts[name], tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def weights_bytes(folder: Path) -> int:
    """Total size of the ``*.safetensors`` files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))


def write_record(out: Path, record: dict[str, Any], cpu_started: float) -> dict[str, Any]:
    """``record`` with the weights' size, the CPU time since ``cpu_started`` and the torch
    thread count added, written to ``out / METADATA_FILE``; returns it."""
    record = {
        **record,
        "weights_bytes": weights_bytes(out),
        "cpu_time_s": round(time.process_time() - cpu_started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / METADATA_FILE).write_text(json.dumps(record, indent=1))
    return record


def train_sdxl(
    out: Path,
    *,
    seed: int = 1,
    steps: int = 1200,
    vae_steps: int | None = None,
    batch_size: int = 64,
    vae_batch_size: int = 32,
    judge_n: int = 32,
    captions: str = "alt_text",
) -> dict[str, Any]:
    """Train the demo's SDXL teacher on the demo world and write its pipeline folder to ``out``.

    ``steps`` diffusion steps (text encoders and U-Net) of ``batch_size`` fresh world images,
    after ``vae_steps`` VAE steps (by default 3/8 of ``steps``); ``seed`` seeds the weights,
    the noise and the captions (the world seeds are fixed, from :data:`TRAIN_SEED_START`).
    After training, ``judge_n`` centre prompts and ``judge_n`` prompts at any position are
    sampled and checked by pixels (0: no judging). Returns what is written to
    ``out/recaption_demo.json``.
    """
    from diffusers import UNet2DConditionModel

    out = Path(out)
    vae_steps = max(1, steps * 3 // 8) if vae_steps is None else vae_steps
    started, cpu_started = time.time(), time.process_time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_world_tokenizer()
    text_encoder, text_encoder_2 = _tiny_sdxl_text_encoders(tokenizer)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    zero_init_residual_branches(unet)
    vae = world_vae()
    stream = WorldStream(TRAIN_SEED_START)

    text = TextPretraining(text_encoder, text_encoder_2)
    logger.info(
        "training the VAE and pretraining the text encoders: %d steps of %d images",
        vae_steps,
        vae_batch_size,
    )
    vae_losses, text_losses = train_first_stage(
        vae, text, tokenizer, stream, vae_steps, rng, batch_size=vae_batch_size
    )
    vae_eval = evaluate_vae(vae)
    text_eval = evaluate_text_pretraining(text, tokenizer)
    vae.register_to_config(scaling_factor=round(1.0 / vae_eval["latent_std"], 5))
    vae.requires_grad_(False)
    first_stage_done = time.time()
    logger.info(
        "VAE held-out MSE %.5f, scaling factor %.5f; text encoders: %s",
        vae_eval["mse"],
        vae.config.scaling_factor,
        text_eval,
    )

    parts = {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "unet": unet,
        "scheduler": _sdxl_base_scheduler(),
    }
    settings = DiffusionSettings(batch_size=batch_size, captions=captions)
    logger.info("training text encoders and U-Net: %d steps of %d images", steps, batch_size)
    losses = train_diffusion(parts, stream, steps, settings, rng)
    diffusion_done = time.time()
    _save_pipeline(parts, out)

    judged: dict[str, Any] = {}
    if judge_n:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        for name, centre_only in (("centre", True), ("any_position", False)):
            result = judge_colours(pipe, judge_prompts(judge_n, seed=1, centre_only=centre_only))
            result.pop("images")
            judged[name] = result
        logger.info("judged samples: %s", judged)

    record = {
        "model": "shapes-sdxl",
        "world_version": world.WORLD_VERSION,
        "seed": seed,
        "steps": steps,
        "vae_steps": vae_steps,
        "batch_size": batch_size,
        "vae_batch_size": vae_batch_size,
        "resolution": RESOLUTION,
        "settings": settings.__dict__,
        "train_world_seeds": stream.record(),
        "held_out_world_seeds": f"square seeds from {HELD_OUT_SEED_START}",
        "vae": {**vae_eval, "scaling_factor": vae.config.scaling_factor},
        "text_encoder_pretraining": text_eval,
        "losses": {
            "vae_mse": [round(x, 5) for x in vae_losses],
            "text_contrastive": [round(x, 4) for x in text_losses],
            "diffusion": [round(x, 5) for x in losses],
        },
        "judge": judged,
        "wall_time_s": {
            "vae_and_text_encoders": round(first_stage_done - started, 1),
            "diffusion": round(diffusion_done - first_stage_done, 1),
            "total": round(time.time() - started, 1),
        },
    }
    return write_record(out, record, cpu_started)
