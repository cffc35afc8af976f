"""CLIP image–text alignment scores through transformers' ``CLIPModel``.

The score is the cosine similarity of the image and text embeddings times 100, the number
CLIP-filtered datasets (LAION's ``similarity`` column is the same cosine, unscaled) and the
CLIPScore paper (Hessel et al., 2021) report. Texts longer than CLIP's 77 tokens are truncated,
as CLIP itself does. The tiny CLIP of the demo (``demo:tiny-clip``,
:func:`recaption.demo.tiny_models.build_tiny_clip`) loads through the same ``from_pretrained``
path as ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


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
