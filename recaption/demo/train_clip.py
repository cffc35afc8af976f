"""Train the demo's CLIP on the demo world (the ``shapes-clip`` weights).

The caption filter scores (image, caption) pairs with CLIP. A randomly initialised tiny CLIP
(:func:`recaption.demo.tiny_models.build_tiny_clip`) gives scores that mean nothing; this
one is trained contrastively (CLIP's symmetric InfoNCE loss) on world images
(:func:`recaption.demo.world.draw_image`, every aspect ratio, preprocessed by the model's own
``CLIPImageProcessor``: short side resized, centre crop) paired with their
:func:`recaption.demo.describe.describe` captions, drawn fresh every step from world seeds
:data:`~recaption.demo.train_sdxl.TRAIN_SEED_START` upward. Each batch also carries, as hard
negatives (NegCLIP, Yuksekgonul et al., 2023), every caption with its main object's colour
swapped, so that the score depends on which colour is named and not only on which words
appear. The tokenizer is the world tokenizer of the SDXL teacher
(:func:`~recaption.demo.train_sdxl.build_world_tokenizer`: one token per world word, CLIP's
byte fallback for any other text).

:func:`evaluate_clip` measures what the score means on held-out images: how often the true
caption outscores the captions of 15 other images (1-of-16 retrieval), and how often it
outscores the same caption with the main object's colour swapped.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from recaption.demo import world
from recaption.demo.train_sdxl import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    HELD_OUT_SEED_START,
    TRAIN_SEED_START,
    _cosine_lr,
    build_world_tokenizer,
    caption_pair,
    contrastive_loss,
    save_clip_tokenizer,
    write_record,
)

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
PATCH_SIZE = 4


def world_clip(tokenizer: Any) -> tuple[Any, Any]:
    """A small ``CLIPModel`` (32 px images in 4 px patches, 2+2 layers of width 64) and its
    ``CLIPProcessor`` with ``tokenizer``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    common = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**common, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        projection_dim=64,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_IMAGE_MEAN),
        image_std=list(CLIP_IMAGE_STD),
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return CLIPModel(config), processor


class _ClipBatches:
    """Fresh world images (any aspect), one seed after the other from ``start``."""

    def __init__(self, processor: Any, start: int) -> None:
        self.processor = processor
        self.next_seed = start
        self.first = start

    def batch(self, n: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        images, truths = [], []
        for _ in range(n):
            image, truth = world.draw_image(random.Random(self.next_seed))
            self.next_seed += 1
            images.append(image)
            truths.append(truth)
        pixels = self.processor.image_processor(images, return_tensors="pt").pixel_values
        return pixels, truths


def _tokens(processor: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    return processor.tokenizer(
        list(texts), padding="longest", truncation=True, return_tensors="pt"
    ).data


def _pooled(output: Any) -> torch.Tensor:
    """The projected embeddings of ``get_*_features`` (a tensor before transformers 5, an
    output with ``pooler_output`` since)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _text_embeds(model: Any, processor: Any, texts: Sequence[str]) -> torch.Tensor:
    return F.normalize(_pooled(model.get_text_features(**_tokens(processor, texts))), dim=-1)


def _clip_loss(model: Any, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """CLIP's loss for ``len(pixels)`` pairs; further texts are hard negatives."""
    image_embeds = _pooled(model.get_image_features(pixel_values=pixels))
    text_embeds = _pooled(model.get_text_features(**tokens))
    return contrastive_loss(image_embeds, text_embeds, model.logit_scale)


@torch.no_grad()
def evaluate_clip(
    model: Any, processor: Any, n: int = 512, group: int = 16, seed: int = 0
) -> dict[str, Any]:
    """On ``n`` held-out images: the fraction whose true caption outscores the captions of
    ``group - 1`` other images (retrieval) and the fraction where it outscores the same
    caption with the main object's colour swapped."""
    model.eval()
    rng = random.Random(seed)
    batches = _ClipBatches(processor, HELD_OUT_SEED_START)
    pixels, truths = batches.batch(n)
    captions, swapped = zip(*(caption_pair(t, rng) for t in truths), strict=True)
    image_embeds = F.normalize(_pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
    text_embeds = _text_embeds(model, processor, captions)
    swap_embeds = _text_embeds(model, processor, swapped)
    retrieved = 0
    for start in range(0, n - group + 1, group):
        scores = image_embeds[start : start + group] @ text_embeds[start : start + group].T
        retrieved += int((scores.argmax(dim=1) == torch.arange(group)).sum())
    true_scores = (image_embeds * text_embeds).sum(-1)
    swap_scores = (image_embeds * swap_embeds).sum(-1)
    return {
        "held_out_images": n,
        f"retrieval_accuracy_1_of_{group}": round(retrieved / (n - n % group), 3),
        "chance": round(1 / group, 3),
        "colour_swap_accuracy": round(float((true_scores > swap_scores).float().mean()), 3),
    }


def train_clip(
    out: Path,
    *,
    seed: int = 2,
    steps: int = 300,
    batch_size: int = 96,
    learning_rate: float = 2e-3,
    hard_negatives: bool = True,
    eval_n: int = 512,
) -> dict[str, Any]:
    """Train the demo's CLIP on the demo world and ``save_pretrained`` model and processor to
    ``out``; returns what is written to ``out/recaption_demo.json`` (0 ``eval_n``: no
    held-out evaluation)."""
    out = Path(out)
    started, cpu_started = time.time(), time.process_time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, processor = world_clip(build_world_tokenizer())
    batches = _ClipBatches(processor, TRAIN_SEED_START)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_lr(s, steps, max(1, min(30, steps // 10)), floor=0.05)
    )
    model.train()
    losses = []
    for step in range(steps):
        pixels, truths = batches.batch(batch_size)
        captions, swapped = zip(*(caption_pair(t, rng) for t in truths), strict=True)
        texts = list(captions) + (list(swapped) if hard_negatives else [])
        loss = _clip_loss(model, pixels, _tokens(processor, texts))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # at most 100, as CLIP
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("clip step %d/%d: loss %.4f", step + 1, steps, loss.item())
    model.eval()
    trained = time.time()

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    save_clip_tokenizer(processor.tokenizer, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)

    evaluation = evaluate_clip(model, processor, eval_n) if eval_n else {}
    logger.info("CLIP held-out evaluation: %s", evaluation)
    record = {
        "model": "shapes-clip",
        "world_version": world.WORLD_VERSION,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "hard_negatives": hard_negatives,
        "train_world_seeds": {
            "first": batches.first,
            "last": batches.next_seed - 1,
            "rule": "world.draw_image(random.Random(s)) for every seed s in [first, last]",
        },
        "held_out_world_seeds": f"from {HELD_OUT_SEED_START}",
        "evaluation": evaluation,
        "losses": [round(x, 4) for x in losses],
        "wall_time_s": {
            "train": round(trained - started, 1),
            "total": round(time.time() - started, 1),
        },
    }
    return write_record(out, record, cpu_started)
