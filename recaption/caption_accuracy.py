"""How often a caption states the demo world's ground truth, and how often it says something false.

The demo world (:mod:`recaption.demo.world`) keeps what every image shows in
``truth.parquet``: the background's kind and colour(s) and one to three objects (shape, colour,
size, position; the first is the largest, the main object). This module reads the same
vocabulary back out of any caption, with plain token rules and no NLP dependency:

- :func:`parse_caption` turns a caption into :class:`CaptionClaims`: the objects it names (a
  noun phrase is anchored on a shape word; colour and size words bind to the next shape word
  of the same phrase, a position phrase to the object before it), the background's colours,
  colours bound to neither, and an explicit number of shapes. Negated mentions ("no red
  circle", "not a square", "without any stars") state nothing. Words outside the vocabulary
  (other languages included) state nothing.
- :func:`score_caption` compares the claims with one image's truth; :func:`accuracy_table`
  aggregates over many captions into the numbers ``stats.json``, the card and the report show.

The wording it understands is the wording :func:`recaption.demo.describe.describe` writes;
the tests check that every caption ``describe`` writes parses back with every attribute right
and nothing false.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from recaption.demo.describe import NUMBER_WORDS, background_colours
from recaption.demo.world import COLOURS, POSITIONS, SHAPES, SIZES

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_LABELS",
    "DEMO_VOCABULARY",
    "FALSE_STATEMENTS",
    "CaptionClaims",
    "ObjectClaim",
    "Vocabulary",
    "accuracy_rows",
    "accuracy_table",
    "load_truth",
    "match_truth",
    "parse_caption",
    "score_caption",
]

logger = logging.getLogger(__name__)

# What score_caption measures: attributes a caption can state right or wrong ...
ATTRIBUTES = (
    "main_shape",
    "main_colour",
    "main_shape_colour",
    "background_colour",
    "position",
    "count",
)
# ... and false statements (True: the caption says something the image does not show).
FALSE_STATEMENTS = ("false_colour", "false_shape", "hallucination")
ATTRIBUTE_LABELS: dict[str, str] = {
    "main_shape": "main object's shape",
    "main_colour": "main object's colour",
    "main_shape_colour": "main object's colour and shape together",
    "background_colour": "background colour(s)",
    "position": "main object's position",
    "count": "number of objects",
    "false_colour": "names a false colour (object or background)",
    "false_shape": "names a shape that is not there",
    "hallucination": "names a false colour or shape",
}
_DIGITS = 4  # rounding of the aggregate's fractions


@dataclass(frozen=True)
class Vocabulary:
    """The words a caption's claims are read from, each mapped to its canonical value.

    Only the words listed count: a synonym (``"oval"`` for ellipse) is understood only when it
    is a key here. ``positions`` keys are phrases of one or more words (``"upper left"``); the
    longest phrase that matches wins, so ``"top left"`` is never read as ``"top"``.
    """

    colours: Mapping[str, str]
    shapes: Mapping[str, str]
    sizes: Mapping[str, str]
    positions: Mapping[str, str]
    counts: Mapping[str, int]
    # Nouns a number counts ("two shapes"); they name no shape themselves.
    count_nouns: frozenset[str] = frozenset(
        {"shape", "shapes", "object", "objects", "figure", "figures", "item", "items"}
        | {"form", "forms", "element", "elements"}
    )
    # Words that open a phrase about the background.
    background_words: frozenset[str] = frozenset(
        {"background", "backgrounds", "backdrop", "gradient"}
    )

    @cached_property
    def position_phrases(self) -> dict[tuple[str, ...], str]:
        """Each position phrase as a tuple of words -> its canonical position."""
        return {tuple(phrase.lower().split()): canon for phrase, canon in self.positions.items()}

    @cached_property
    def longest_position(self) -> int:
        """The number of words of the longest position phrase."""
        return max((len(words) for words in self.position_phrases), default=0)


def _demo_positions() -> dict[str, str]:
    positions = {name: name for name in POSITIONS}
    for side in ("left", "right"):
        positions[f"upper {side}"] = f"top {side}"
        positions[f"lower {side}"] = f"bottom {side}"
        positions[f"{side} side"] = side
    for word in ("centre", "center", "middle"):
        positions[word] = "centre"
        positions[f"top {word}"] = "top"
        positions[f"bottom {word}"] = "bottom"
    return positions


DEMO_VOCABULARY = Vocabulary(
    colours={colour: colour for colour in COLOURS},
    shapes={
        **{shape: shape for shape in SHAPES},
        **{f"{shape}s": shape for shape in SHAPES},
        "oval": "ellipse",
        "ovals": "ellipse",
    },
    sizes={size: size for size in SIZES},
    positions=_demo_positions(),
    counts={**{word: n for n, word in NUMBER_WORDS.items()}, "four": 4, "five": 5, "single": 1},
)


@dataclass(frozen=True)
class ObjectClaim:
    """One object a caption names: its shape, and whatever colour, size, position it gives."""

    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionClaims:
    """Everything a caption states that the demo's ground truth can check."""

    objects: tuple[ObjectClaim, ...] = ()
    background_colours: frozenset[str] = frozenset()
    unbound_colours: frozenset[str] = frozenset()
    count: int | None = None


# -- parsing -------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[.;:!?()\[\],]")
_HARD_BREAKS = frozenset(".;:!?()[]")
_NEGATIONS = frozenset({"no", "not", "without", "never", "neither", "nor", "none", "nothing"})
_DETERMINERS = frozenset({"a", "an", "the", "some", "another", "each", "every", "any"})
_COPULAS = frozenset({"is", "are", "was", "were"})
# Words that, right after a background word, open its colours: "background of red and blue",
# "from red to blue", "that fades from ...", "is blue", "in shades of ...".
_BACKGROUND_OPENERS = frozenset(
    {"of", "from", "is", "are", "was", "that", "which", "fades", "fading", "goes", "going"}
    | {"changes", "changing", "transitions", "transitioning", "in", "colour", "color", "colours"}
    | {"colors", "shades", "tones", "hues"}
)
# Words allowed between colours and the background word they describe ("a red and blue textured
# background"); any other word between them ("white download sale background") and the colours
# are not the background's.
_BACKGROUND_ADJECTIVES = frozenset(
    {"and", "to", "or", "plain", "solid", "textured", "grainy", "noisy", "speckled", "mottled"}
    | {"smooth", "light", "dark", "pale", "bright", "deep", "coloured", "colored", "simple"}
    | {"uniform", "soft", "vivid", "blurred", "blurry", "faded", "subtle", "gradient"}
)
# Adjectives allowed between a number and the noun it counts ("three small coloured shapes").
_COUNT_FILLERS = frozenset(
    {"different", "coloured", "colored", "colourful", "colorful", "geometric", "simple"}
    | {"distinct", "basic", "flat", "solid", "bright", "separate", "other", "more"}
)
# A shape word before one of these describes the picture's format, not an object.
_FRAME_NOUNS = frozenset(
    {"image", "images", "picture", "photo", "format", "frame", "canvas", "crop", "aspect"}
)
# Words allowed between "<object> is" and its colour or size ("is bright red", "is painted blue").
_PREDICATE_FILLERS = frozenset(
    {"light", "dark", "bright", "pale", "deep", "vivid", "coloured", "colored", "painted"}
    | {"also", "mostly", "entirely", "all", "and", "or", "quite", "very", "rather"}
)
_DROPPED = -1  # "the last object" was a negated one: what follows it is negated too


def _tokens(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return _TOKEN.findall(text)


@dataclass
class _Parser:
    """A left-to-right pass over one caption's tokens (see :func:`parse_caption`)."""

    vocabulary: Vocabulary
    tokens: list[str]
    objects: list[ObjectClaim] = field(default_factory=list)
    background: set[str] = field(default_factory=set)
    unbound: set[str] = field(default_factory=set)
    count: int | None = None
    # State of the current phrase.
    colours: list[str] = field(default_factory=list)  # colour words waiting for their noun
    size: str | None = None
    position: str | None = None  # a position said before its object ("on the left, a ...")
    last: int | None = None  # index of the last object of the clause, or _DROPPED
    background_mode: str | None = None  # None, "pre" (just after the word) or "open"
    negated: bool = False
    negated_shape: bool = False  # a negated shape just ended: "or"/"nor" carries the negation
    predicate: bool = False  # after "<object> is": a colour or size describes that object
    gap: bool = False  # a word since the last colour that cannot sit inside a background phrase

    def run(self) -> CaptionClaims:
        i = 0
        while i < len(self.tokens):
            i += self.step(i)
        self.hard_break()
        return CaptionClaims(
            objects=tuple(self.objects),
            background_colours=frozenset(self.background),
            unbound_colours=frozenset(self.unbound),
            count=self.count,
        )

    def step(self, i: int) -> int:
        """Read the token(s) at ``i``; return how many were read."""
        vocab, tok = self.vocabulary, self.tokens[i]
        if self.negated_shape:
            self.negated_shape = False
            if tok in ("or", "nor"):
                return 1
            self.negated = False
        if tok in _HARD_BREAKS:
            self.hard_break()
            return 1
        if tok == ",":
            self.soft_break()
            return 1
        matched = self.match_position(i)
        if matched:
            return matched
        if tok in _NEGATIONS or tok.endswith("n't"):
            self.negated = True
        elif tok == "but":
            self.negated = False
        elif tok in vocab.colours:
            self.add_colour(vocab.colours[tok])
        elif tok in vocab.shapes and self.next_token(i) not in _FRAME_NOUNS:
            self.add_shape(vocab.shapes[tok])
        elif tok in vocab.sizes:
            self.add_size(vocab.sizes[tok])
        elif tok in vocab.background_words and not (self.colours and self.gap):
            self.open_background()
        elif tok in vocab.count_nouns:
            self.generic_noun()
        else:
            self.other_word(i, tok)
        return 1

    def next_token(self, i: int) -> str | None:
        return self.tokens[i + 1] if i + 1 < len(self.tokens) else None

    def other_word(self, i: int, tok: str) -> None:
        """Numbers, determiners, copulas and every word outside the vocabulary."""
        if tok not in _BACKGROUND_ADJECTIVES:
            self.gap = True
        if self.predicate and tok not in _PREDICATE_FILLERS:
            self.predicate = False
        number = tok in self.vocabulary.counts or tok.isdecimal()
        if number:
            self.read_count(i, tok)
        if tok in _DETERMINERS or number:
            self.predicate = False
            if self.background_mode is not None:
                self.close_background()
        elif tok in _COPULAS:
            if self.background_mode == "pre":
                self.background_mode = "open"
            elif self.background_mode is None and self.last is not None:
                self.predicate = True
        elif self.background_mode == "pre":
            if tok in _BACKGROUND_OPENERS:
                self.background_mode = "open"
            else:
                self.close_background()

    def read_count(self, i: int, tok: str) -> None:
        """``two shapes``, ``3 objects``, ``a single red circle``: an explicit number."""
        if self.negated or self.count is not None:
            return
        value = int(tok) if tok.isdecimal() else self.vocabulary.counts[tok]
        vocab = self.vocabulary
        for word in self.tokens[i + 1 : i + 5]:
            if word in vocab.count_nouns or (tok == "single" and word in vocab.shapes):
                self.count = value
                return
            if not (word in vocab.colours or word in vocab.sizes or word in _COUNT_FILLERS):
                return

    def match_position(self, i: int) -> int:
        """Read the longest position phrase at ``i``; return its length (0: none there)."""
        table = self.vocabulary.position_phrases
        for length in range(self.vocabulary.longest_position, 0, -1):
            canon = table.get(tuple(self.tokens[i : i + length]))
            if canon is not None:
                self.add_position(canon)
                self.gap = True
                return length
        return 0

    def add_position(self, position: str) -> None:
        # Inside a background phrase ("fades from left to right") a position is no object's.
        if self.negated or self.background_mode is not None or self.last == _DROPPED:
            return
        if self.last is not None and self.objects[self.last].position is None:
            self.objects[self.last] = replace(self.objects[self.last], position=position)
        else:
            self.position = position

    def add_colour(self, colour: str) -> None:
        if self.negated:
            return
        if self.background_mode == "pre":  # "background red": not a phrase about it
            self.close_background()
        if self.predicate and self.last is not None and self.last != _DROPPED:
            claim = self.objects[self.last]
            if claim.colour is None:
                self.objects[self.last] = replace(claim, colour=colour)
            elif claim.colour != colour:
                self.objects.append(replace(claim, colour=colour))
            return
        self.colours.append(colour)
        self.gap = False

    def add_size(self, size: str) -> None:
        if self.negated:
            return
        if self.predicate and self.last is not None and self.last != _DROPPED:
            claim = self.objects[self.last]
            if claim.size is None:
                self.objects[self.last] = replace(claim, size=size)
            return
        self.size = size

    def add_shape(self, shape: str) -> None:
        """A shape word: the phrase's colours, size and earlier position bind to it."""
        self.background_mode = None
        self.predicate = False
        if self.negated:
            self.colours, self.size, self.position = [], None, None
            self.last = _DROPPED
            self.negated_shape = True
            return
        for colour in self.colours or [None]:
            self.objects.append(ObjectClaim(shape, colour, self.size, self.position))
        self.last = len(self.objects) - 1
        self.colours, self.size, self.position = [], None, None

    def open_background(self) -> None:
        """A background word: the colours before it are the background's."""
        if self.negated:
            self.negated = False
        else:
            self.background.update(self.colours)
        self.colours, self.size = [], None
        self.predicate = False
        self.background_mode = "pre"

    def close_background(self) -> None:
        """End a background phrase: the colours read in it are the background's."""
        if self.background_mode == "open":
            self.background.update(self.colours)
            self.colours = []
        self.background_mode = None

    def generic_noun(self) -> None:
        """``shape``, ``object``: it names no shape, so the colours before it bind to none."""
        if self.background_mode is None:
            self.unbound.update(self.colours)
            self.colours, self.size = [], None

    def soft_break(self) -> None:
        """A comma ends a background phrase and a negation; "a large, red circle" still binds."""
        self.close_background()
        self.negated = self.negated_shape = self.predicate = False

    def hard_break(self) -> None:
        """The end of a sentence or clause: what is still waiting binds to nothing."""
        self.close_background()
        self.unbound.update(self.colours)
        self.colours, self.size, self.position, self.last = [], None, None, None
        self.negated = self.negated_shape = self.predicate = False


def parse_caption(text: str | None, vocabulary: Vocabulary = DEMO_VOCABULARY) -> CaptionClaims:
    """The objects, background colours, loose colours and count that ``text`` states.

    Case and punctuation do not matter. A noun phrase is anchored on a shape word: the colour
    and size words before it in the same phrase bind to it (each colour of "red and blue
    circles" makes its own claim), a position phrase after it ("in the top left corner") too,
    and "<object> is <colour>" binds the colour to that object. Colours before a background
    word ("a plain blue background", "a red to blue gradient background") or after it and an
    opening word ("a background that fades from purple to white", "The background is blue")
    are the background's; other colours are unbound. An explicit count is a number before a
    noun such as "shapes" ("two shapes", "one shape") or "a single ...". Negated mentions
    ("no red circle", "not a square", "without any stars or circles") state nothing.
    """
    return _Parser(vocabulary, _tokens(text or "")).run()


# -- scoring -------------------------------------------------------------------------------------


def score_caption(claims: CaptionClaims, truth: Mapping[str, Any]) -> dict[str, bool | None]:
    """Which ground-truth attributes ``claims`` state right, and whether they state anything false.

    ``truth`` is one image's attributes from ``truth.parquet``. Every value is ``None`` when the
    caption does not state that thing at all (a silent caption is neither right nor false):

    - ``main_shape``: some object claim has the main object's shape (None: no object claims).
    - ``main_colour``: the main object's colour is among the colours the caption gives to
      objects, bound to any shape or unbound (None: it gives no colour except the background's).
      The binding to the right shape is ``main_shape_colour``.
    - ``main_shape_colour``: some claim has both the main object's colour and shape (None: no
      claim has a colour). "A red square" for a red circle is False here.
    - ``background_colour``: the background colours stated are exactly the truth's set.
    - ``position``: a claim of the main object's shape (and its colour, or none) has the main
      object's position (None: no such claim gives a position).
    - ``count``: the explicit count, else the number of object claims when there are two or
      more (a single claim states no count), equals the number of objects.
    - ``false_colour``: a colour bound to a shape where no object has that colour and shape, or
      a background colour the background does not have (None: no colour bound to anything).
    - ``false_shape``: a shape no object has (None: no object claims).
    - ``hallucination``: ``false_colour or false_shape`` (None when both are None).
    """
    objects = list(truth["objects"])
    main = objects[0]
    pairs = {(o["colour"], o["shape"]) for o in objects}
    shapes = {o["shape"] for o in objects}
    true_background = set(background_colours(dict(truth)))
    claimed = claims.objects
    coloured = [c for c in claimed if c.colour is not None]
    object_colours = {c.colour for c in coloured} | set(claims.unbound_colours)
    placed = [
        c
        for c in claimed
        if c.shape == main["shape"] and c.colour in (main["colour"], None) and c.position
    ]
    stated_count = claims.count
    if stated_count is None and len(claimed) > 1:
        stated_count = len(claimed)

    def stated(condition: bool, value: bool) -> bool | None:
        return value if condition else None

    scores: dict[str, bool | None] = {
        "main_shape": stated(bool(claimed), any(c.shape == main["shape"] for c in claimed)),
        "main_colour": stated(bool(object_colours), main["colour"] in object_colours),
        "main_shape_colour": stated(
            bool(coloured),
            any((c.colour, c.shape) == (main["colour"], main["shape"]) for c in coloured),
        ),
        "background_colour": stated(
            bool(claims.background_colours), set(claims.background_colours) == true_background
        ),
        "position": stated(bool(placed), any(c.position == main["position"] for c in placed)),
        "count": stated(stated_count is not None, stated_count == len(objects)),
        "false_colour": stated(
            bool(coloured or claims.background_colours),
            any((c.colour, c.shape) not in pairs for c in coloured)
            or not set(claims.background_colours) <= true_background,
        ),
        "false_shape": stated(bool(claimed), any(c.shape not in shapes for c in claimed)),
    }
    falses = [scores["false_colour"], scores["false_shape"]]
    scores["hallucination"] = None if falses == [None, None] else any(falses)
    return scores


def _fraction(count: int, n: int) -> float | None:
    return round(count / n, _DIGITS) if n else None


def accuracy_table(rows: Iterable[tuple[str | None, Mapping[str, Any]]]) -> dict[str, Any]:
    """Aggregate :func:`score_caption` over ``(caption, truth)`` pairs (JSON-able).

    Returns ``{"n": ..., "attributes": {name: {"right": r, "false": f}}, "false_statements":
    {name: fraction}}``: per attribute of :data:`ATTRIBUTES` the fraction of all captions that
    state it right and the fraction that state it wrong (a silent caption is neither, so
    ``right + false <= 1``), and per :data:`FALSE_STATEMENTS` the fraction of all captions that
    state something false. Fractions are rounded to 4 digits; ``None`` when ``n`` is 0.
    """
    n = 0
    right = dict.fromkeys(ATTRIBUTES, 0)
    wrong = dict.fromkeys(ATTRIBUTES, 0)
    false = dict.fromkeys(FALSE_STATEMENTS, 0)
    for text, truth in rows:
        scores = score_caption(parse_caption(text), truth)
        n += 1
        for name in ATTRIBUTES:
            right[name] += scores[name] is True
            wrong[name] += scores[name] is False
        for name in FALSE_STATEMENTS:
            false[name] += scores[name] is True
    return {
        "n": n,
        "attributes": {
            name: {"right": _fraction(right[name], n), "false": _fraction(wrong[name], n)}
            for name in ATTRIBUTES
        },
        "false_statements": {name: _fraction(false[name], n) for name in FALSE_STATEMENTS},
    }


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def accuracy_rows(accuracy: Mapping[str, Any]) -> list[list[str]]:
    """``stats["caption_accuracy"]`` as table rows for the card and the report.

    Each row: label, synthetic right %, synthetic false %, alt-text right %, alt-text false %
    (``-`` where a cell does not apply: false statements have no "right").
    """
    tables = [accuracy.get("synthetic") or {}, accuracy.get("alt_text") or {}]
    rows = []
    for name in ATTRIBUTES:
        cells = [ATTRIBUTE_LABELS[name]]
        for table in tables:
            values = (table.get("attributes") or {}).get(name) or {}
            cells += [_percent(values.get("right")), _percent(values.get("false"))]
        rows.append(cells)
    for name in FALSE_STATEMENTS:
        cells = [ATTRIBUTE_LABELS[name]]
        for table in tables:
            cells += ["-", _percent((table.get("false_statements") or {}).get(name))]
        rows.append(cells)
    return rows


# -- ground truth --------------------------------------------------------------------------------


def load_truth(path: str | Path) -> dict[str, dict[str, Any]]:
    """URL -> ground-truth attributes (the parsed ``attributes`` JSON) of a ``truth.parquet``."""
    table = pq.read_table(path, columns=["URL", "attributes"])
    return {
        url: json.loads(attributes)
        for url, attributes in zip(
            table.column("URL").to_pylist(), table.column("attributes").to_pylist(), strict=True
        )
        if url is not None and attributes is not None
    }


def _url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def match_truth(
    urls: Iterable[str | None], truth: Mapping[str, dict[str, Any]]
) -> list[dict[str, Any] | None]:
    """The truth of each URL (``None`` where there is none).

    A URL matches its truth row exactly, or by its path: the demo's download points the
    world's placeholder host at its loopback server, so a dataset URL is
    ``http://127.0.0.1:PORT/files/00001.jpg`` where the truth has
    ``http://demo.invalid/files/00001.jpg``.
    """
    by_path: dict[str, dict[str, Any] | None] = {}
    for url, attributes in truth.items():
        path = _url_path(url)
        by_path[path] = None if path in by_path else attributes  # ambiguous: no match
    out: list[dict[str, Any] | None] = []
    for url in urls:
        if not url:
            out.append(None)
        elif url in truth:
            out.append(truth[url])
        else:
            out.append(by_path.get(_url_path(url)))
    return out
