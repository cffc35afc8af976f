"""Descriptive captions of demo-world images, written from their ground truth.

These are the captions a good captioner should produce for the demo world: every object's
size, colour, shape and position, the background's kind and colour(s), in varied wording and
sentence order so that a model trained on them learns the attributes and not one template.
The demo's captioner and its SDXL teacher are trained on them
(:mod:`recaption.demo.train_models`); :mod:`recaption.caption_accuracy` reads the same
vocabulary back out of any caption.
"""

from __future__ import annotations

import random
from typing import Any

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# How a position of the world's 3x3 grid is said: "in the top left corner", "on the left", ...
_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "near the top", "at the top centre"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the left side", "on the left side"),
    "centre": ("in the centre", "in the center", "in the middle"),
    "right": ("on the right", "at the right side", "on the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom centre"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}


def background_colours(truth: dict[str, Any]) -> list[str]:
    """The background's colour names: one for a plain background, two for the others."""
    colour = str(truth["colour"])
    for sep in (" to ", " and "):
        if sep in colour:
            return colour.split(sep)
    return [colour]


def _background_phrase(rng: random.Random, truth: dict[str, Any]) -> str:
    """A noun phrase for the background, e.g. "a plain blue background"."""
    colours = background_colours(truth)
    kind = truth["background"]
    if kind == "plain":
        return rng.choice(
            (
                f"a plain {colours[0]} background",
                f"a solid {colours[0]} background",
                f"a {colours[0]} background",
            )
        )
    c1, c2 = colours
    if kind == "gradient":
        return rng.choice(
            (
                f"a {c1} to {c2} gradient background",
                f"a gradient background from {c1} to {c2}",
                f"a background that fades from {c1} to {c2}",
            )
        )
    return rng.choice(
        (
            f"a textured {c1} and {c2} background",
            f"a grainy {c1} and {c2} background",
            f"a noisy background of {c1} and {c2}",
        )
    )


def _object_phrase(rng: random.Random, obj: dict[str, Any], with_position: bool) -> str:
    """A noun phrase for one object, e.g. "a large red circle in the centre"."""
    words = [obj["colour"], obj["shape"]]
    if rng.random() < 0.7:
        words.insert(0, obj["size"])
    phrase = "a " + " ".join(words)
    if with_position:
        phrase += " " + rng.choice(_POSITION_PHRASES[obj["position"]])
    return phrase


def _join(phrases: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def describe(truth: dict[str, Any], rng: random.Random) -> str:
    """One descriptive caption of the image whose ground truth is ``truth``.

    ``truth`` is a row of the world's ``truth.parquet`` ``attributes`` (background kind and
    colour, objects with shape, colour, size and position; the first object is the main one).
    The wording, the order of the sentences and whether sizes and the count are said vary
    with ``rng``; every colour and shape named is true of the image.
    """
    objects = list(truth["objects"])
    with_position = rng.random() < 0.85
    phrases = [_object_phrase(rng, obj, with_position) for obj in objects]
    background = _background_phrase(rng, truth)
    n = len(objects)
    count = NUMBER_WORDS.get(n, str(n))
    style = rng.randrange(5)
    if style == 0:
        text = f"{_join(phrases)} on {background}."
    elif style == 1:
        lead = "The image shows" if n == 1 else f"The image shows {count} shapes:"
        text = f"{lead} {_join(phrases)} on {background}."
    elif style == 2:
        text = f"Against {background}, there is {_join(phrases)}."
        if n > 1:
            text = f"Against {background}, there are {count} shapes: {_join(phrases)}."
    elif style == 3:
        noun = "shape" if n == 1 else "shapes"
        text = f"A simple picture of {count} {noun}. It shows {_join(phrases)} on {background}."
    else:
        sentences = [_capitalise(p) + "." for p in phrases]
        verb = "It sits" if n == 1 else "They sit"
        text = " ".join(sentences) + f" {verb} on {background}."
    return _capitalise(text)
