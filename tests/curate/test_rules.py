"""Every caption rule on hand-made captions, the adversarial ones included."""

from __future__ import annotations

import pytest

from recaption.caption_rules import (
    BoilerplateOpeningRewriter,
    CaptionRule,
    CaptionRules,
    CaptionSample,
    CaptionView,
    DuplicateCaptionFilter,
    LanguageFilter,
    LengthFilter,
    RefusalFilter,
    RunInputs,
    TruncationFilter,
    Verdict,
    build_rules,
    caption_hash,
    tail_repeats,
)
from recaption.config import FilterConfig


@pytest.fixture(scope="module")
def rules():
    return build_rules(FilterConfig(), RunInputs(duplicate_counts={}))


def test_adversarial_captions(rules, curate):
    """Newlines, tabs, HTML, emoji, right-to-left text, 10k characters, punctuation only..."""
    wrong = []
    for caption, finish, keep, reason, clean in curate.ADVERSARIAL:
        decision = rules.decide(CaptionSample("k", caption, finish))
        got = (decision.keep, decision.reason)
        if got != (keep, reason) or (clean is not None and decision.caption_clean != clean):
            wrong.append(f"{caption!r:.60}: got {got} {decision.caption_clean!r:.70}")
        assert "\n" not in decision.caption_clean and "\t" not in decision.caption_clean
    assert not wrong, "\n".join(wrong)
    assert len(curate.ADVERSARIAL) >= 20


def test_scores_are_recorded_for_kept_captions(rules):
    decision = rules.decide(
        CaptionSample("k", "The image shows a red car parked next to a tall green tree.", "stop")
    )
    assert decision.keep
    assert decision.scores["n_words"] == 10  # counted after the rewrite (13 before)
    assert decision.scores["boilerplate_opening"] is True
    assert decision.scores["tail_repeats"] == 1
    assert decision.scores["language"] == "en"
    assert decision.scores["caption_copies"] == 1


def test_tail_repeats_counts_the_loop():
    words = ["a", "tree", "and", "a", "tree", "and", "a", "tree", "and", "a", "tree"]
    assert tail_repeats(words) == 3  # period 3: "and a tree", three times
    assert tail_repeats(["a", "red", "car", "on", "a", "road"]) == 1
    assert tail_repeats([]) == 0


def test_truncation_drop_mode_rejects_every_cut_off_caption():
    rule = TruncationFilter(mode="drop")
    text = "A dog on a sofa. The wall is"
    assert not rule.apply(text, CaptionSample("k", text, "length")).keep
    assert rule.apply(text, CaptionSample("k", text, "stop")).keep
    with pytest.raises(ValueError, match="trim"):
        TruncationFilter(mode="cut")


def test_boilerplate_modes():
    text = "The image features a lighthouse on a cliff above the sea."
    sample = CaptionSample("k", text)
    assert BoilerplateOpeningRewriter("rewrite").apply(text, sample).caption == (
        "A lighthouse on a cliff above the sea."
    )
    kept = BoilerplateOpeningRewriter("keep").apply(text, sample)
    assert kept.keep and kept.caption is None and kept.scores["boilerplate_opening"]
    assert BoilerplateOpeningRewriter("drop").apply(text, sample).reason == "boilerplate"
    plain = "A lighthouse on a cliff."
    assert BoilerplateOpeningRewriter().apply(plain, CaptionSample("k", plain)).caption is None


def test_refusal_phrase_list_is_editable():
    rule = RefusalFilter(phrases=["cannot help"])
    assert not rule.apply("I CANNOT HELP with that.", CaptionSample("k", "")).keep
    assert rule.apply("I'm sorry to see a wet dog.", CaptionSample("k", "")).keep
    config_rules = build_rules(
        FilterConfig(refusal_phrases=["lorem ipsum"]), RunInputs(duplicate_counts={})
    )
    assert config_rules.decide(
        CaptionSample("k", "Lorem ipsum dolor sit amet on a red car.")
    ).reason == ("refusal")


def test_language_rule_keeps_configured_languages_and_can_be_turned_off():
    french = "Un chat noir est assis sur une chaise en bois près de la fenêtre ouverte."
    rule = LanguageFilter(keep_languages=["fr", "en"])
    verdict = rule.apply(french, CaptionSample("k", french))
    assert verdict.keep and verdict.scores["language"] == "fr"
    off = build_rules(FilterConfig(keep_languages=[]), RunInputs(duplicate_counts={}))
    assert off.decide(CaptionSample("k", french)).keep
    with pytest.raises(ValueError, match="unknown language code"):
        LanguageFilter(keep_languages=["english"])


def test_duplicate_rule_uses_run_wide_counts_case_and_spacing_insensitive():
    text = "A photo of something on a white background."
    counts = {caption_hash("a photo of  something on a WHITE background."): 4}
    rule = DuplicateCaptionFilter(counts, max_copies=3)
    verdict = rule.apply(text, CaptionSample("k", text))
    assert (verdict.keep, verdict.reason, verdict.scores["caption_copies"]) == (
        False,
        "duplicate",
        4,
    )
    assert DuplicateCaptionFilter(counts, max_copies=4).apply(text, CaptionSample("k", text)).keep
    assert 0 <= caption_hash(text) < 2**63


def test_view_forgets_derived_forms_when_a_rule_rewrites_the_caption():
    view = CaptionView("The image shows A Red Car", CaptionSample("k", ""))
    assert view.lower_words == ["the", "image", "shows", "a", "red", "car"]
    view.rewrite("A Red Car")
    assert (view.lower, view.lower_words) == ("a red car", ["a", "red", "car"])
    assert view.rewritten


def test_chain_sees_each_rewrite_like_rules_applied_one_by_one(rules):
    """The shared view must give every rule the caption as the rules before it left it."""
    captions = [
        ("The image shows  a red car\nparked next to the old tree by the road.", "stop"),
        ("In this image, there is a dog on the sofa and a cat. The wall is", "length"),
        ("The picture depicts le chat et la souris dans la maison ce soir.", "stop"),
        ("This is an image of the sea, with boats and the sun and gulls over it.", "stop"),
    ]
    for caption, finish in captions:
        sample = CaptionSample("k", caption, finish)
        text, scores, expected = caption, {}, (True, None)
        for rule in rules.rules:
            verdict = rule.apply(text, sample)
            scores.update(verdict.scores)
            text = verdict.caption if verdict.caption is not None else text
            if not verdict.keep:
                expected = (False, verdict.reason)
                break
        decision = rules.decide(sample)
        assert (decision.keep, decision.reason) == expected, caption
        assert (decision.caption_clean, decision.scores) == (text, scores), caption
    # The rewritten caption is what the length rule counted.
    decision = rules.decide(CaptionSample("k", captions[0][0], "stop"))
    assert decision.scores["n_words"] == len(decision.caption_clean.split()) == 12


def test_rule_written_against_apply_alone_runs_in_the_chain():
    class NoCats(CaptionRule):
        name = "cats"

        def apply(self, caption: str, sample: CaptionSample) -> Verdict:
            if "cat" in caption:
                return Verdict(False, scores={"cats": 1})
            return Verdict(True, caption=caption.upper())

    chain = CaptionRules([NoCats(), LengthFilter(min_words=1, min_chars=1)])
    rejected = chain.decide(CaptionSample("k", "a cat"))
    assert (rejected.keep, rejected.reason, rejected.scores) == (False, "cats", {"cats": 1})
    kept = chain.decide(CaptionSample("k", "a dog"))
    assert (kept.keep, kept.caption_clean, kept.scores["n_words"]) == (True, "A DOG", 2)
    with pytest.raises(NotImplementedError, match="neither check nor apply"):
        type("Empty", (CaptionRule,), {})().apply("x", CaptionSample("k", "x"))


def test_language_rule_asks_lingua_once_per_distinct_text():
    rule = LanguageFilter(keep_languages=["en"])
    calls = []
    detector = rule.detector

    class Counting:
        def compute_language_confidence_values(self, text):
            calls.append(text)
            return detector.compute_language_confidence_values(text)

    rule.detector = Counting()
    french = "Une voiture rouge garée dans une rue calme près de la gare."
    first = rule.apply(french, CaptionSample("k", french))
    second = rule.apply(french, CaptionSample("k", french))
    assert (first.keep, first.scores) == (second.keep, second.scores)
    assert first.scores["language"] == "fr" and not first.keep
    assert calls == [french]
