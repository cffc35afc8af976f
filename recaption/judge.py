"""A pixel judge for the demo world: which colours an image shows, read from its pixels.

The evaluate stage asks it what a generated sample shows and compares that with what the
prompt asked for. It knows only the demo world's flat palette (:data:`recaption.demo.world.
COLOURS`), so it judges only what that palette makes readable:

- each pixel takes the nearest palette colour (RGB distance); only *stable* pixels count,
  those whose 3x3 neighbourhood has the same colour, so the blended pixels along an edge (red
  next to blue resizes to purple) never vote. Where no pixel is stable (a noisy sample) every
  pixel votes;
- ``background_colour``: the most frequent colour on the border ring (the outer
  :data:`BORDER_FRACTION` of the shorter side);
- ``object_colour``: the most frequent colour that is not the background's.

What it declines to judge, because its measured accuracy there is far below the goal
(:func:`measure_judge` on held-out world images, 64x64):

- gradient and textured backgrounds (two colours): neither attribute (background 0%: the
  ring mixes both colours and their blends; main object about 30-65%);
- the object colour when the prompt names more than one object (about 73% on plain
  backgrounds): the world's main object is the largest *size class*, but a large star covers
  fewer pixels than a medium circle, and equal sizes overlap;
- a prompt that names no background, or a colour outside the palette.

So it judges ``background_colour`` for prompts with a plain (one-colour) background and
``object_colour`` for prompts with a plain background and one object. Its accuracy on those
kinds is measured, not assumed, every time the stage runs (:func:`measure_judge`), and
reported beside the samples' accuracy. Pure numpy and PIL.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from recaption.demo.describe import background_colours
from recaption.demo.world import COLOURS, draw_image

logger = logging.getLogger(__name__)

# Bump when the judge's rules change: a stored evaluation is then redone.
JUDGE_VERSION = 1
ATTRIBUTES: tuple[str, ...] = ("background_colour", "object_colour")
# The border ring whose colours decide the background: this share of the shorter side.
BORDER_FRACTION = 0.06
# How held-out world images are brought to the evaluation size (never JPEG-encoded).
RESAMPLE = Image.Resampling.BICUBIC
# Larger images are judged on a copy reduced to this longer side (box filter): flat colours
# survive, and a 1024x1024 sample costs what a 256x256 one does.
MAX_SIDE = 256

KINDS = {
    "background_colour": "prompts naming a plain (one-colour) background",
    "object_colour": "prompts naming a plain background and exactly one object",
}
DECLINED = (
    "gradient and textured backgrounds (both attributes); the object colour of prompts with "
    "more than one object; prompts naming no background or colours outside the palette"
)


@dataclass(frozen=True)
class Judgement:
    """What the judge read from one image; ``None`` where it could not tell.

    ``*_share`` is the share of the voting pixels that had the winning colour (the border
    ring's for the background, the non-background pixels' for the object).
    """

    background_colour: str | None
    object_colour: str | None
    background_share: float = 0.0
    object_share: float = 0.0

    def get(self, attribute: str) -> str | None:
        """The judged value of ``attribute`` (one of :data:`ATTRIBUTES`)."""
        return getattr(self, attribute)


@dataclass(frozen=True)
class Expected:
    """What a prompt (or a world image's ground truth) says, in the judge's terms.

    ``background_colours``: one colour for a plain background, two for a gradient or a
    texture, none when not said; ``object_colours``: each named object's colour (``None``
    when not said), the main object first; ``count``: the number of objects stated, if any.
    """

    background_colours: tuple[str, ...]
    object_colours: tuple[str | None, ...]
    count: int | None = None

    @classmethod
    def from_claims(cls, claims: Any) -> Expected:
        """From :func:`recaption.caption_accuracy.parse_caption`'s ``CaptionClaims``."""
        return cls(
            background_colours=tuple(sorted(claims.background_colours)),
            object_colours=tuple(obj.colour for obj in claims.objects),
            count=claims.count,
        )

    @classmethod
    def from_truth(cls, truth: Mapping[str, Any]) -> Expected:
        """From a demo-world image's ground truth (:func:`recaption.demo.world.draw_image`)."""
        objects = list(truth["objects"])
        return cls(
            background_colours=tuple(background_colours(dict(truth))),
            object_colours=tuple(str(obj["colour"]) for obj in objects),
            count=len(objects),
        )


def judged_attributes(expected: Expected, palette: Iterable[str] = COLOURS) -> dict[str, str]:
    """The attributes the judge judges for a prompt of this kind, with their expected values.

    ``background_colour`` when the prompt names a plain background in a palette colour;
    ``object_colour`` when, besides, it names exactly one object, of a palette colour.
    Everything else is declined (see the module docstring for the measured reasons).
    """
    names = set(palette)
    judged: dict[str, str] = {}
    if len(expected.background_colours) != 1 or expected.background_colours[0] not in names:
        return judged
    judged["background_colour"] = expected.background_colours[0]
    single = len(expected.object_colours) == 1 and expected.count in (None, 1)
    if single and expected.object_colours[0] in names:
        judged["object_colour"] = str(expected.object_colours[0])
    return judged


class PixelJudge:
    """Reads the background colour and the main object's colour of a flat-colour image."""

    name = "pixel"

    def __init__(
        self,
        palette: Mapping[str, tuple[int, int, int]] = COLOURS,
        border_fraction: float = BORDER_FRACTION,
    ) -> None:
        if len(palette) < 2:
            raise ValueError("the judge's palette needs at least two colours")
        self.names = list(palette)
        self.palette = np.array([palette[n] for n in self.names], dtype=np.int32)
        self.border_fraction = border_fraction

    def labels(self, image: Image.Image) -> np.ndarray:
        """Each pixel's nearest palette colour, as an index into :attr:`names` (H x W);
        an image larger than :data:`MAX_SIDE` is reduced first."""
        image = image.convert("RGB")
        if max(image.size) > MAX_SIDE:
            scale = MAX_SIDE / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BOX)
        pixels = np.asarray(image, dtype=np.int32)
        distance = ((pixels[:, :, None, :] - self.palette[None, None]) ** 2).sum(-1)
        return distance.argmin(-1)

    @staticmethod
    def stable(labels: np.ndarray) -> np.ndarray:
        """True where the 3x3 neighbourhood (edge pixels repeated) has one colour."""
        h, w = labels.shape
        padded = np.pad(labels, 1, mode="edge")
        mask = np.ones_like(labels, dtype=bool)
        for dy in range(3):
            for dx in range(3):
                mask &= padded[dy : dy + h, dx : dx + w] == labels
        return mask

    def _vote(self, labels: np.ndarray) -> tuple[int | None, float]:
        """The most frequent label and its share; ``(None, 0.0)`` for no votes."""
        if labels.size == 0:
            return None, 0.0
        counts = np.bincount(labels.ravel(), minlength=len(self.names))
        winner = int(counts.argmax())
        return winner, float(counts[winner] / labels.size)

    def judge(self, image: Image.Image) -> Judgement:
        """The background colour (border ring) and the main object colour of ``image``."""
        labels = self.labels(image)
        h, w = labels.shape
        stable = self.stable(labels)
        b = max(1, round(min(h, w) * self.border_fraction))
        ring = np.zeros((h, w), dtype=bool)
        ring[:b], ring[-b:], ring[:, :b], ring[:, -b:] = True, True, True, True
        voters = ring & stable if (ring & stable).any() else ring
        background, background_share = self._vote(labels[voters])
        assert background is not None  # the ring is never empty
        others = labels != background
        voters = others & stable if (others & stable).any() else others
        colour, object_share = self._vote(labels[voters])
        return Judgement(
            background_colour=self.names[background],
            object_colour=None if colour is None else self.names[colour],
            background_share=round(background_share, 4),
            object_share=round(object_share, 4),
        )


def chance_levels(palette: Iterable[str] = COLOURS) -> dict[str, float]:
    """Accuracy of a uniform guess, per attribute: 1/colours for the background, and
    1/(colours - 1) for the object (the judge never names the background's colour for it,
    and the world never draws an object in its background's colour)."""
    n = len(list(palette))
    return {"background_colour": 1.0 / n, "object_colour": 1.0 / (n - 1)}


def measure_judge(
    judge: PixelJudge,
    *,
    seed: int,
    n: int,
    width: int,
    height: int,
    max_draws_per_image: int = 50,
) -> dict[str, dict[str, Any]]:
    """The judge's accuracy per attribute on held-out demo-world images of the kind it judges.

    Images are drawn from ``random.Random(seed)`` (a world nobody trained on), resized to
    ``width`` x ``height`` with :data:`RESAMPLE` and never JPEG-encoded; an image counts for an
    attribute when :func:`judged_attributes` of its ground truth includes it (the same rule
    that picks the prompts), until every attribute has ``n`` images. A declined answer
    (``None``) counts as wrong.
    """
    rng = random.Random(seed)
    correct = dict.fromkeys(ATTRIBUTES, 0)
    seen = dict.fromkeys(ATTRIBUTES, 0)
    draws = 0
    while min(seen.values()) < n and draws < max_draws_per_image * n:
        image, truth = draw_image(rng)
        draws += 1
        wanted = {
            attr: value
            for attr, value in judged_attributes(Expected.from_truth(truth)).items()
            if seen[attr] < n
        }
        if not wanted:
            continue
        judgement = judge.judge(image.resize((width, height), RESAMPLE))
        for attr, value in wanted.items():
            seen[attr] += 1
            correct[attr] += judgement.get(attr) == value
    result = {
        attr: {
            "accuracy": round(correct[attr] / seen[attr], 4) if seen[attr] else None,
            "correct": correct[attr],
            "n": seen[attr],
            "kind": KINDS[attr],
        }
        for attr in ATTRIBUTES
    }
    logger.info(
        "judge accuracy on %d held-out world images (seed %d, %dx%d): %s",
        draws,
        seed,
        width,
        height,
        ", ".join(f"{a} {r['correct']}/{r['n']}" for a, r in result.items()),
    )
    return result
