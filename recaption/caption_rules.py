"""Named caption rules: each keeps, cleans or rejects one synthetic caption.

Modelled on datatrove's filters: a rule is a small class with a ``name``, its thresholds as
named constructor arguments with sensible defaults, and a docstring saying where the
heuristic comes from. ``rule.apply(caption, sample)`` returns a :class:`Verdict`: keep or not,
the rule's name as the rejection reason, the scores it computed and, when it rewrote the
caption, the cleaned text. :class:`CaptionRules` runs them in order; the first rejection wins,
and the scores of every rule that ran are recorded, so the stats can count reasons and the
report can show distributions.

Every rule declares its score columns (``score_columns``, collected into the filtered
schema by :mod:`recaption.schemas`) and how the filter config builds it (``from_config``);
:data:`RULES` is the chain's order, so a new rule is its class plus one line there (and its
keys in ``FilterConfig``). Rules that need the whole run (exact duplicates across shards, CLIP
scores and percentiles) get their run-level inputs as a :class:`RunInputs`; computing those
is the filter stage's job.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

if TYPE_CHECKING:
    from recaption.config import FilterConfig

# Scores are numbers, or short strings such as a language code.
Scores = dict[str, Any]


@dataclass(slots=True)
class CaptionSample:
    """What rules may look at: the caption being filtered plus its caption-stage record."""

    key: str
    caption: str
    finish_reason: str | None = None
    original_text: str | None = None
    caption_hash: int | None = None  # caption_hash(caption), when the stage computed it


@dataclass(slots=True)
class Verdict:
    """One rule's decision about one caption."""

    keep: bool
    reason: str | None = None
    scores: Scores = field(default_factory=dict)
    caption: str | None = None  # the cleaned caption, when the rule rewrote it


@dataclass
class RunInputs:
    """What rules that need the whole run are given, computed by the filter stage first.

    ``duplicate_counts`` maps :func:`caption_hash` to copies over every caption shard (only
    counts above 1); ``count_text_tokens(text)`` counts a caption's tokens with the teacher's
    tokenizer; ``clip_scores(shard)`` returns ``key -> (clip_score, clip_score_original)``
    for a shard's ok captions; ``clip_threshold`` is the minimum
    CLIP score (set directly, or the run-wide percentile).
    """

    duplicate_counts: Mapping[int, int] | None = None
    count_text_tokens: Callable[[str], int] | None = None
    clip_scores: Callable[[str], Mapping[str, tuple[float, float]]] | None = None
    clip_threshold: float | None = None


class CaptionView:
    """One caption as the rules see it, with derived forms computed once and shared.

    :class:`CaptionRules` builds one view per caption and passes it through every rule, so
    the lower-cased text and its words are computed once, not once per rule. A rule reads
    ``text`` (the caption as cleaned so far), ``lower`` and ``lower_words`` (``text.lower()``
    and its whitespace-split words, computed on first use), records its scores in
    ``scores`` and replaces the caption with :meth:`rewrite`, which drops the cached forms.
    """

    __slots__ = ("_lower", "_lower_words", "rewritten", "sample", "scores", "text")

    def __init__(self, text: str, sample: CaptionSample) -> None:
        self.sample = sample
        self.text = text
        self.scores: Scores = {}
        self.rewritten = False
        self._lower: str | None = None
        self._lower_words: list[str] | None = None

    @property
    def lower(self) -> str:
        """``text.lower()``."""
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def lower_words(self) -> list[str]:
        """``text.lower().split()``: as many words as ``text.split()``, lower-cased."""
        if self._lower_words is None:
            self._lower_words = self.lower.split()
        return self._lower_words

    def rewrite(self, text: str) -> None:
        """Replace the caption (a cleaning rule's output) and forget the derived forms."""
        self.text = text
        self.rewritten = True
        self._lower = self._lower_words = None


class CaptionRule:
    """Base class: ``name`` is the rejection reason.

    A rule implements ``check(view)``: it reads a :class:`CaptionView`, writes its scores
    into ``view.scores``, may :meth:`CaptionView.rewrite` the caption, and returns ``None``
    to keep the caption or the rejection reason (usually ``self.name``). ``apply(caption,
    sample)`` runs the rule on its own and returns a :class:`Verdict`. A rule written
    against ``apply`` alone also works: the default ``check`` calls it.
    """

    name: str = "rule"
    # The columns this rule writes into ``view.scores``, with their parquet types.
    score_columns: ClassVar[dict[str, pa.DataType]] = {}
    # True for rules whose inputs span the whole run (built by the filter stage first).
    needs_run: ClassVar[bool] = False
    # True for rules that record their scores even for a caption an earlier rule rejected.
    scores_rejected: ClassVar[bool] = False

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> CaptionRule | None:
        """The rule as ``section`` configures it, or ``None`` when the config turns it off."""
        raise NotImplementedError(f"{cls.__name__} does not say how to build it from a config")

    def begin_shard(self, shard: str) -> None:
        """Load what the rule needs for one shard (per-shard scores); most rules need none."""

    def annotate(self, view: CaptionView) -> None:
        """Record this rule's scores without deciding (``scores_rejected`` rules)."""

    def check(self, view: CaptionView) -> str | None:
        """Decide ``view.text``: ``None`` keeps it, a string is the rejection reason."""
        if type(self).apply is CaptionRule.apply:
            raise NotImplementedError(f"{type(self).__name__} implements neither check nor apply")
        verdict = self.apply(view.text, view.sample)
        if verdict.scores:
            view.scores.update(verdict.scores)
        if verdict.caption is not None:
            view.rewrite(verdict.caption)
        return None if verdict.keep else verdict.reason or self.name

    def apply(self, caption: str, sample: CaptionSample) -> Verdict:
        """Run this rule alone on ``caption``."""
        if type(self).check is CaptionRule.check:
            raise NotImplementedError(f"{type(self).__name__} implements neither check nor apply")
        view = CaptionView(caption, sample)
        reason = self.check(view)
        return Verdict(reason is None, reason, view.scores, view.text if view.rewritten else None)


# -- cleaning -------------------------------------------------------------------------------
_TAG = re.compile(r"<[^<>]{0,200}>")
_WORD = re.compile(r"\w", re.UNICODE)


class TextNormaliser(CaptionRule):
    """Strip HTML tags and entities, control and zero-width characters; collapse whitespace.

    LLaVA output and scraped alt-text both carry stray markup (``<br>``, ``&amp;``), newlines
    and tabs; C4 and datatrove's ``FineWebQualityFilter`` normalise whitespace the same way
    before measuring anything. Never rejects.
    """

    name = "normalise"

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> TextNormaliser:
        return cls()

    def check(self, view: CaptionView) -> str | None:
        text = caption = view.text
        if "<" in text:
            text = _TAG.sub(" ", text)
        if "&" in text:
            text = html.unescape(text)
        if text.isprintable():
            # No control, format or separator characters but the ASCII space (the common
            # case): only runs of spaces and spaces at the ends need collapsing.
            if "  " in text or text[:1] == " " or text[-1:] == " ":
                text = " ".join(text.split())
        else:
            if not text.isascii():
                # Cc/Cf: control and format characters (zero-width joiners, bidi marks).
                text = "".join(
                    ch
                    for ch in text
                    if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf")
                )
            # str.split() splits on every Unicode whitespace, newlines and tabs included.
            text = " ".join(text.split())
        if text != caption:
            view.rewrite(text)
        return None


class EmptyCaptionFilter(CaptionRule):
    """Reject empty, whitespace-only and punctuation/symbol-only captions.

    A captioner that emits only the end-of-sequence token, or ``"..."``, leaves nothing to
    train on (the "empty output" failure in the design notes).
    """

    name = "empty"

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> EmptyCaptionFilter:
        return cls()

    def check(self, view: CaptionView) -> str | None:
        caption = view.text
        if not caption or _WORD.search(caption) is None:
            return self.name
        return None


class RepetitionFilter(CaptionRule):
    """Reject repetition loops: many repeated word n-grams, or a phrase repeated at the end.

    The repeated n-gram fraction follows Gopher's repetition filter (Rae et al., 2021,
    table A1; datatrove's ``GopherRepetitionFilter``), on words, which suits short texts.
    The repeated tail is the classic greedy-decoding loop of LLaVA ("... and a tree, and a
    tree, and a tree") that runs until ``max_new_tokens``: the last ``p`` words repeated
    ``max_tail_repeats`` or more times back to back, for any period ``p <= max_period``.
    """

    name = "repetition"
    score_columns: ClassVar[dict[str, pa.DataType]] = {
        "duplicate_ngram_fraction": pa.float32(),
        "tail_repeats": pa.int32(),
    }

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> RepetitionFilter:
        return cls(
            ngram_size=section.ngram_size,
            max_duplicate_ngram_fraction=section.max_duplicate_ngram_fraction,
            max_tail_repeats=section.max_tail_repeats,
        )

    def __init__(
        self,
        ngram_size: int = 3,
        max_duplicate_ngram_fraction: float = 0.3,
        max_tail_repeats: int = 3,
        max_period: int = 12,
    ) -> None:
        self.n = ngram_size
        self.max_fraction = max_duplicate_ngram_fraction
        self.max_tail_repeats = max_tail_repeats
        self.max_period = max_period

    def check(self, view: CaptionView) -> str | None:
        words = strip_punctuation(view.lower).split()
        n = self.n
        total = len(words) - n + 1
        if total > 1:
            if n == 3:
                grams = set(zip(words, words[1:], words[2:], strict=False))
            else:
                grams = set(zip(*[words[i:] for i in range(n)], strict=False))
            fraction = 1.0 - len(grams) / total
        else:
            fraction = 0.0
        repeats = tail_repeats(words, self.max_period)
        scores = view.scores
        # The score is rounded; the threshold compares the exact fraction.
        scores["duplicate_ngram_fraction"] = round(fraction, 4) if fraction else 0.0
        scores["tail_repeats"] = repeats
        if fraction > self.max_fraction or repeats >= self.max_tail_repeats:
            return self.name
        return None


_PUNCTUATION = ".,;:!?\"'()[]"
_STRIP_PUNCTUATION = str.maketrans("", "", _PUNCTUATION)
_PUNCTUATION_BYTES = _PUNCTUATION.encode("ascii")


def strip_punctuation(text: str) -> str:
    """``text`` without ``.,;:!?"'()[]`` (ASCII text through ``bytes.translate``, faster)."""
    if text.isascii():
        return text.encode("ascii").translate(None, _PUNCTUATION_BYTES).decode("ascii")
    return text.translate(_STRIP_PUNCTUATION)


def tail_repeats(words: Sequence[str], max_period: int = 12) -> int:
    """The most times any block of the last ``p`` words repeats back to back at the end.

    Pass words with punctuation removed (``_STRIP_PUNCTUATION``) so "tree, and a tree."
    matches "tree and a tree". A caption with no repeated tail scores 1.
    """
    if len(words) < 2:
        return len(words)
    stripped = words[-max_period * 4 :]
    best = 1
    n = len(stripped)
    last = stripped[-1]
    for period in range(1, min(max_period, n // 2) + 1):
        if stripped[n - 1 - period] != last:  # cheap test before comparing whole blocks
            continue
        block = stripped[n - period :]
        count = 1
        end = n - period
        while end - period >= 0 and stripped[end - period : end] == block:
            count += 1
            end -= period
        best = max(best, count)
    return best


_SENTENCE_END = re.compile(r"[.!?。！？](?=[\"')\]]?(?:\s|$))")


class TruncationFilter(CaptionRule):
    """Captions cut off at the token budget (``finish_reason == "length"``): drop or trim.

    ``mode="trim"`` cuts the caption back to its last complete sentence and keeps it, as
    done for the synthetic captions of PixArt-α and DALL-E 3-style recaptioning; a cut-off
    caption with no complete sentence is rejected. ``mode="drop"`` rejects every cut-off one.
    """

    name = "truncated"
    score_columns: ClassVar[dict[str, pa.DataType]] = {"trimmed_chars": pa.int32()}

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> TruncationFilter:
        return cls(mode=section.truncated)

    def __init__(self, mode: str = "trim") -> None:
        if mode not in ("trim", "drop"):
            raise ValueError(f"truncation mode must be 'trim' or 'drop', not {mode!r}")
        self.mode = mode

    def check(self, view: CaptionView) -> str | None:
        if view.sample.finish_reason != "length":
            view.scores["trimmed_chars"] = 0
            return None
        if self.mode == "drop":
            view.scores["trimmed_chars"] = 0
            return self.name
        caption = view.text
        ends = [m.end() for m in _SENTENCE_END.finditer(caption)]
        if not ends:
            view.scores["trimmed_chars"] = len(caption)
            return self.name
        cut = caption[: ends[-1]].rstrip()
        view.scores["trimmed_chars"] = len(caption) - len(cut)
        view.rewrite(cut)
        return None


DEFAULT_REFUSAL_PHRASES: tuple[str, ...] = (
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "i am unable",
    "i'm unable",
    "as an ai",
    "as a language model",
    "there is no image",
    "no image provided",
    "image is not available",
    "unable to see the image",
    "cannot see the image",
    "can't see the image",
)


class RefusalFilter(CaptionRule):
    """Reject refusals and meta-text ("I'm sorry", "as an AI", "there is no image").

    Instruction-tuned captioners sometimes answer about themselves instead of the image;
    the phrase list is the usual one from LLM-output cleaning (e.g. the ShareGPT/Vicuna
    "unfiltered" cleaning lists) plus image-specific ones, editable in the config.
    Matching is case-insensitive on the normalised caption; curly apostrophes match straight.
    """

    name = "refusal"

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> RefusalFilter:
        return cls(phrases=section.refusal_phrases)

    def __init__(self, phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES) -> None:
        self.phrases = [p.lower().replace("’", "'") for p in phrases if p.strip()]
        self.pattern = re.compile(phrase_trie_pattern(self.phrases)) if self.phrases else None

    def check(self, view: CaptionView) -> str | None:
        if self.pattern is None:
            return None
        text = view.lower
        if "’" in text:
            text = text.replace("’", "'")
        if self.pattern.search(text):
            return self.name
        return None


def phrase_trie_pattern(phrases: Sequence[str]) -> str:
    """A regular expression that finds any of ``phrases``, with shared prefixes factored out.

    ``"i am sorry|i am unable"`` becomes ``"i\\ am\\ (?:sorry|unable)"``: the regex engine then
    tries one branch per distinct next character instead of every phrase at every position.
    A phrase that another one starts with ends the match early (enough for a search).
    """
    trie: dict[str, dict] = {}
    for phrase in phrases:
        node = trie
        for ch in phrase:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, dict]) -> str:
        if "" in node:
            return ""
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items())]
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return emit(trie)


DEFAULT_BOILERPLATE_OPENINGS: tuple[str, ...] = (
    r"(?:in|within) (?:this|the) (?:image|picture|photo|photograph|scene),? (?:there (?:is|are) )?",
    r"(?:this|the) (?:image|picture|photo|photograph|scene) "
    r"(?:shows|features|depicts|displays|presents|captures|showcases|portrays|contains|"
    r"is of|is an image of|is a picture of|is|includes)(?: an image of| a picture of)? ",
    r"(?:this is|here is) (?:an image|a picture|a photo|a photograph) of ",
)


class BoilerplateOpeningRewriter(CaptionRule):
    """Rewrite boilerplate openings ("The image shows ...", "In this image, ...") away.

    LLaVA starts most captions this way; the words describe the medium, not the content,
    and a text-to-image model trained on them learns nothing from them (the DALL-E 3 and
    PixArt-α recaptioning reports both strip them). ``mode="rewrite"`` starts the caption
    at the content ("The image shows a red car" -> "A red car"); ``"keep"`` only records the
    score; ``"drop"`` rejects the caption. ``openings`` are regular expressions matched at
    the start, case-insensitively.
    """

    name = "boilerplate"
    score_columns: ClassVar[dict[str, pa.DataType]] = {"boilerplate_opening": pa.bool_()}

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> BoilerplateOpeningRewriter:
        openings = section.boilerplate_openings
        return cls(
            mode=section.boilerplate,
            openings=DEFAULT_BOILERPLATE_OPENINGS if openings is None else openings,
        )

    def __init__(
        self, mode: str = "rewrite", openings: Sequence[str] = DEFAULT_BOILERPLATE_OPENINGS
    ) -> None:
        if mode not in ("rewrite", "keep", "drop"):
            raise ValueError(f"boilerplate mode must be rewrite, keep or drop, not {mode!r}")
        self.mode = mode
        self.pattern = (
            re.compile("^(?:" + "|".join(f"(?:{o})" for o in openings) + ")", re.IGNORECASE)
            if openings
            else None
        )

    def check(self, view: CaptionView) -> str | None:
        caption = view.text
        match = self.pattern.match(caption) if self.pattern else None
        if match is None:
            view.scores["boilerplate_opening"] = False
            return None
        view.scores["boilerplate_opening"] = True
        if self.mode == "drop":
            return self.name
        if self.mode == "keep":
            return None
        rest = caption[match.end() :].lstrip(" ,:;-")
        if rest:
            view.rewrite(rest[0].upper() + rest[1:])
        return None


# Sentence ends: Latin punctuation before a space or the end; CJK full stops anywhere.
_SENTENCE_BREAK = re.compile(r"[.!?](?=[\"')\]]?(?:\s|$))|[。！？]")


class TextTokenFilter(CaptionRule):
    """Fit captions to what the text encoders read: SDXL's CLIP encoders see 77 tokens.

    A dense LLaVA caption is often 100-250 CLIP tokens; training would silently cut it
    mid-word (CLIP's context is 77 tokens, start and end tokens included: Radford et al.,
    2021; SDXL and KOALA keep both CLIP text encoders). The length is measured with the
    teacher's own tokenizer and recorded (``text_tokens``, before any trimming). Policies:
    ``trim`` cuts the caption back to the last whole sentence that fits (a caption whose first
    sentence alone is too long is rejected, as a mid-sentence cut is what this rule avoids);
    ``drop`` rejects every caption that does not fit; ``keep`` keeps it (training truncates
    it, and counts that).
    """

    name = "text_tokens"
    score_columns: ClassVar[dict[str, pa.DataType]] = {"text_tokens": pa.int32()}

    def __init__(
        self, count_tokens: Callable[[str], int], max_tokens: int = 77, policy: str = "trim"
    ) -> None:
        if policy not in ("trim", "drop", "keep"):
            raise ValueError(f"text token policy must be trim, drop or keep, not {policy!r}")
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.policy = policy

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> TextTokenFilter | None:
        if section.text_tokens == "off" or inputs.count_text_tokens is None:
            return None
        return cls(inputs.count_text_tokens, section.max_text_tokens, section.text_tokens)

    def check(self, view: CaptionView) -> str | None:
        caption = view.text
        n_tokens = self.count_tokens(caption)
        view.scores["text_tokens"] = n_tokens
        if n_tokens <= self.max_tokens or self.policy == "keep":
            return None
        if self.policy == "drop":
            return self.name
        for end in reversed([m.end() for m in _SENTENCE_BREAK.finditer(caption)]):
            cut = caption[:end].rstrip()
            if self.count_tokens(cut) <= self.max_tokens:
                view.rewrite(cut)
                return None
        return self.name


class LengthFilter(CaptionRule):
    """Reject captions with too few or too many words or characters.

    Word-count bounds as in Gopher's quality filter and C4 (Raffel et al., 2020), tuned for
    captions: a dense caption with fewer than 5 words describes nothing; thousands of
    characters are a run-on. Reasons are ``too_short`` and ``too_long``.
    """

    name = "length"
    score_columns: ClassVar[dict[str, pa.DataType]] = {
        "n_words": pa.int32(),
        "n_chars": pa.int32(),
    }

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> LengthFilter:
        return cls(
            min_words=section.min_words,
            max_words=section.max_words,
            min_chars=section.min_chars,
            max_chars=section.max_chars,
        )

    def __init__(
        self,
        min_words: int = 5,
        max_words: int = 300,
        min_chars: int = 20,
        max_chars: int = 3000,
    ) -> None:
        self.min_words, self.max_words = min_words, max_words
        self.min_chars, self.max_chars = min_chars, max_chars

    def check(self, view: CaptionView) -> str | None:
        # lower().split() has as many words as split(), and the language rule reuses it.
        n_words = len(view.lower_words)
        n_chars = len(view.text)
        scores = view.scores
        scores["n_words"] = n_words
        scores["n_chars"] = n_chars
        if n_words < self.min_words or n_chars < self.min_chars:
            return "too_short"
        if n_words > self.max_words or n_chars > self.max_chars:
            return "too_long"
        return None


# Function words that are English and rarely anything else in ASCII text.
_ENGLISH_MARKERS = frozenset(
    [
        "the",
        "of",
        "and",
        "with",
        "is",
        "are",
        "on",
        "this",
        "that",
        "its",
        "it",
        "there",
        "which",
        "by",
        "from",
        "has",
        "have",
        "at",
        "an",
        "be",
        "for",
        "as",
        "while",
        "their",
        "they",
        "his",
        "her",
        "he",
        "she",
    ]
)

DEFAULT_LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "it", "pt", "nl", "ru", "zh", "ja")


class LanguageFilter(CaptionRule):
    """Keep captions in the wanted languages, identified offline with lingua.

    lingua (lingua-language-detector, models inside the wheel) is restricted to a few
    candidate languages, which makes it both faster and more accurate on short text. Plain
    ASCII captions in which English function words make up at least ``fast_path_fraction``
    of the words, with at least three different ones, are taken as English without asking
    lingua (most LLaVA captions), as
    CCNet/fastText pipelines skip the model for obvious cases; the score
    ``language_confidence`` is then empty.
    """

    name = "language"
    score_columns: ClassVar[dict[str, pa.DataType]] = {
        "language": pa.string(),
        "language_confidence": pa.float32(),
    }

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> LanguageFilter | None:
        if not section.keep_languages:
            return None
        return cls(
            keep_languages=section.keep_languages,
            candidate_languages=section.candidate_languages,
            min_confidence=section.min_language_confidence,
        )

    def __init__(
        self,
        keep_languages: Sequence[str] = ("en",),
        candidate_languages: Sequence[str] = DEFAULT_LANGUAGES,
        min_confidence: float = 0.5,
        fast_path_fraction: float = 0.15,
        cache_size: int = 100_000,
    ) -> None:
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

        def to_language(code: str) -> Language:
            try:
                return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
            except (AttributeError, ValueError):
                raise ValueError(
                    f"unknown language code {code!r}; use ISO 639-1 codes such as en, fr, de"
                ) from None

        self.keep = {c.lower() for c in keep_languages}
        codes = list(dict.fromkeys([*candidate_languages, *keep_languages]))
        languages = [to_language(c) for c in codes]
        if len(languages) < 2:
            languages.append(to_language("fr" if codes[0] != "fr" else "en"))
        self.detector = LanguageDetectorBuilder.from_languages(*languages).build()
        self.min_confidence = min_confidence
        self.fast_path_fraction = fast_path_fraction
        self._english_fast_path = "en" in self.keep
        self.cache_size = cache_size
        self._cache: dict[str, tuple[str | None, float | None]] = {}

    def check(self, view: CaptionView) -> str | None:
        caption = view.text
        scores = view.scores
        if self._english_fast_path and caption.isascii():
            words = view.lower_words
            hits = sum(map(_ENGLISH_MARKERS.__contains__, words))
            # Three different markers: one shared word ("is" in Dutch) is not enough.
            if hits >= self.fast_path_fraction * len(words) and (
                len(_ENGLISH_MARKERS.intersection(words)) >= 3
            ):
                scores["language"] = "en"
                scores["language_confidence"] = None
                return None
        code, confidence = self.identify(caption)
        scores["language"] = code
        scores["language_confidence"] = None if confidence is None else round(confidence, 4)
        if code is None or code not in self.keep or confidence < self.min_confidence:
            return self.name
        return None

    def identify(self, text: str) -> tuple[str | None, float | None]:
        """lingua's most likely language (ISO 639-1) and its confidence, cached per text.

        Captioners repeat themselves, and lingua costs about 0.1 ms per caption, so the
        answers for the last ``cache_size`` distinct texts are kept.
        """
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        best = self.detector.compute_language_confidence_values(text)
        if best:
            top = best[0]
            result = (top.language.iso_code_639_1.name.lower(), top.value)
        else:
            result = (None, None)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[text] = result
        return result


def caption_hash(caption: str | None) -> int:
    """A 63-bit hash of a caption for exact-duplicate counting (case and spacing ignored).

    63 bits (a positive int64) keep the hash table small; at 12M captions the chance of any
    collision is about 1e-5.
    """
    text = (caption or "").casefold()
    if not text.isprintable() or "  " in text or text[:1] == " " or text[-1:] == " ":
        text = " ".join(text.split())  # else already single-spaced: skip the split
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DuplicateCaptionFilter(CaptionRule):
    """Reject captions repeated verbatim over more than ``max_copies`` images of the run.

    A caption the captioner wrote for many different images is a boilerplate failure (it
    describes none of them); dataset deduplication usually works on images (SemDeDup) or
    texts (exact-hash dedup in C4/Gopher), and the exact-hash form is cheap at any scale.
    ``counts`` maps :func:`caption_hash` of the *raw* caption to its number of copies over
    every caption shard; all copies are rejected once the count passes the limit.
    """

    name = "duplicate"
    score_columns: ClassVar[dict[str, pa.DataType]] = {"caption_copies": pa.int32()}
    needs_run = True

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> DuplicateCaptionFilter | None:
        if section.max_duplicate_copies is None or inputs.duplicate_counts is None:
            return None
        return cls(inputs.duplicate_counts, section.max_duplicate_copies)

    def __init__(self, counts: Mapping[int, int], max_copies: int = 3) -> None:
        self.counts = counts
        self.max_copies = max_copies

    def check(self, view: CaptionView) -> str | None:
        digest = view.sample.caption_hash
        if digest is None:
            digest = caption_hash(view.sample.caption)
        copies = int(self.counts.get(digest, 1))
        view.scores["caption_copies"] = copies
        if copies > self.max_copies:
            return self.name
        return None


class ClipScoreFilter(CaptionRule):
    """Record the CLIP scores of the synthetic caption and the alt-text; reject below a bound.

    CLIP score (Hessel et al., 2021: ``max(100 · cos(image, text), 0)``) measures how well a
    text matches its image; LAION itself was filtered on CLIP similarity. Scores are computed
    per shard in batches by the filter stage (the rule only looks them up) and recorded for
    every ok caption, rejected ones included, so the report can compare both captions over
    the whole run. With a threshold (``filter.min_clip_score`` or the run-wide
    ``filter.min_clip_percentile``), a kept caption scoring below it, or without a score
    (its image did not decode), is rejected as ``clip_score``.
    """

    name = "clip_score"
    score_columns: ClassVar[dict[str, pa.DataType]] = {
        "clip_score": pa.float32(),
        "clip_score_original": pa.float32(),
    }
    needs_run = True
    scores_rejected = True

    def __init__(
        self,
        scores_for_shard: Callable[[str], Mapping[str, tuple[float, float]]],
        threshold: float | None = None,
    ) -> None:
        self.scores_for_shard = scores_for_shard
        self.threshold = threshold
        self._scores: Mapping[str, tuple[float, float]] = {}

    @classmethod
    def from_config(cls, section: FilterConfig, inputs: RunInputs) -> ClipScoreFilter | None:
        if section.clip_model is None or inputs.clip_scores is None:
            return None
        return cls(inputs.clip_scores, inputs.clip_threshold)

    def begin_shard(self, shard: str) -> None:
        self._scores = self.scores_for_shard(shard)

    def annotate(self, view: CaptionView) -> tuple[float, float] | None:
        pair = self._scores.get(view.sample.key)
        if pair is not None:
            view.scores["clip_score"], view.scores["clip_score_original"] = pair
        return pair

    def check(self, view: CaptionView) -> str | None:
        pair = self.annotate(view)
        if self.threshold is not None and (pair is None or pair[0] < self.threshold):
            return self.name
        return None


# The rule chain, in the order rules run. A new rule is its class and one line here.
RULES: tuple[type[CaptionRule], ...] = (
    TextNormaliser,
    EmptyCaptionFilter,
    RepetitionFilter,
    TruncationFilter,
    RefusalFilter,
    BoilerplateOpeningRewriter,
    TextTokenFilter,
    LengthFilter,
    LanguageFilter,
    DuplicateCaptionFilter,
    ClipScoreFilter,
)


def score_columns() -> dict[str, pa.DataType]:
    """Every score column the rules declare, with its type, in rule order."""
    columns: dict[str, pa.DataType] = {}
    for rule in RULES:
        for name, dtype in rule.score_columns.items():
            if name in columns:
                raise ValueError(f"score column {name!r} is declared by two rules")
            columns[name] = dtype
    return columns


def build_rules(section: FilterConfig, inputs: RunInputs | None = None) -> CaptionRules:
    """The rule chain ``section`` asks for, in :data:`RULES` order.

    Without ``inputs`` the run-wide rules (duplicates, CLIP) are left out: that is enough to
    validate the config before any work.
    """
    inputs = inputs or RunInputs()
    rules = [rule.from_config(section, inputs) for rule in RULES]
    return CaptionRules([r for r in rules if r is not None])


@dataclass
class Decision:
    """The outcome of every rule for one caption."""

    keep: bool
    reason: str | None
    caption_clean: str
    scores: Scores


class CaptionRules:
    """An ordered list of rules; the first rejection decides the reason."""

    def __init__(self, rules: Sequence[CaptionRule]) -> None:
        self.rules = list(rules)
        self._checks = [rule.check for rule in self.rules]
        self._annotators = [
            (i, rule.annotate) for i, rule in enumerate(self.rules) if rule.scores_rejected
        ]

    def begin_shard(self, shard: str) -> None:
        """Let every rule load what it needs for ``shard`` (per-shard CLIP scores)."""
        for rule in self.rules:
            rule.begin_shard(shard)

    def decide(self, sample: CaptionSample) -> Decision:
        """Run the rules in order on ``sample.caption``; stop at the first rejection."""
        view = CaptionView(sample.caption or "", sample)
        for position, check in enumerate(self._checks):
            reason = check(view)
            if reason is not None:
                for index, annotate in self._annotators:
                    if index > position:
                        annotate(view)
                return Decision(False, reason, view.text, view.scores)
        return Decision(True, None, view.text, view.scores)
