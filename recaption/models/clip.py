"""CLIP image–text alignment scores through transformers' ``CLIPModel``.

The score is the cosine similarity of the image and text embeddings times 100, the number
CLIP-filtered datasets (LAION's ``similarity`` column is the same cosine, unscaled) and the
CLIPScore paper (Hessel et al., 2021) report. Texts longer than CLIP's 77 tokens are truncated,
as CLIP itself does.

``build_tiny_clip`` makes a randomly initialised CLIP with a tokenizer built on the spot, for
the demo (``demo:tiny-clip``) and the tests; it loads back through the same ``from_pretrained``
path as ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


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


class ClipScorer:
    """Batched CLIP scores of (image, text) pairs with a ``CLIPModel`` loaded by name or folder."""

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        batch_size: int = 64,
        revision: str | None = None,
    ) -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        try:
            self.model = CLIPModel.from_pretrained(model, revision=revision, use_safetensors=True)
            self.processor = CLIPProcessor.from_pretrained(model, revision=revision)
        except OSError as exc:
            raise FileNotFoundError(
                f"cannot load CLIP model {model!r}: {exc}. Set filter.clip_model to a hub id "
                "you can reach, a local folder saved with save_pretrained, or demo:tiny-clip"
            ) from exc
        self.model.to(self.device).eval()
        self.name = model

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """100 x cosine(image, text) for each pair, in batches; float32 array of len(texts)."""
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        out = np.empty(len(texts), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            stop = start + self.batch_size
            batch_images = [im.convert("RGB") for im in images[start:stop]]
            batch_texts = [t if t else " " for t in texts[start:stop]]
            inputs = self.processor(
                text=batch_texts,
                images=batch_images,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
            ).to(self.device)
            with torch.inference_mode():
                image_emb = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                text_emb = self.model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            image_emb = _as_tensor(image_emb)
            text_emb = _as_tensor(text_emb)
            image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
            text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
            out[start:stop] = (100.0 * (image_emb * text_emb).sum(-1)).cpu().numpy()
        return out


def _as_tensor(features: object) -> object:
    """``get_*_features`` return a tensor or, in newer transformers, an output object."""
    if hasattr(features, "pooler_output"):
        return features.pooler_output  # type: ignore[attr-defined]
    return features
