"""Captions against the text encoders' 77 tokens: measured, trimmed at a sentence, reported."""

from __future__ import annotations

import itertools
import json

import pyarrow.parquet as pq
import pytest

from recaption.caption_rules import CaptionSample, TextTokenFilter
from recaption.cli import main
from recaption.config import load_config
from recaption.demo.tiny_models import build_tiny_clip_tokenizer


@pytest.fixture(scope="module")
def count():
    """Token counts with a real CLIPTokenizer (the demo teacher's, trained on the spot)."""
    tokenizer = build_tiny_clip_tokenizer()
    return lambda text: len(tokenizer(text, truncation=False)["input_ids"])


def _sentence_of(count, tokens: int, prefix: str = "") -> str:
    """A sentence that, after ``prefix``, brings the caption to exactly ``tokens`` tokens."""
    words = ["a", "red", "dot", "blue", "star", "on", "grey"]
    for n in range(1, 40):
        for combo in itertools.product(words, repeat=min(n, 2)):
            text = f"{prefix}A circle {' '.join(['big'] * (n - len(combo)) + list(combo))}."
            if count(text) == tokens:
                return text
    raise AssertionError(f"no sentence of exactly {tokens} tokens found")


def test_a_sentence_ending_exactly_at_77_tokens_is_kept_one_more_is_trimmed_to_it(count):
    rule = TextTokenFilter(count, max_tokens=77, policy="trim")
    first = _sentence_of(count, 40)
    exact = _sentence_of(count, 77, prefix=first + " ")
    assert count(exact) == 77
    verdict = rule.apply(exact, CaptionSample("k", exact))
    assert verdict.keep and verdict.caption is None and verdict.scores["text_tokens"] == 77
    longer = exact + " It is drawn on a gradient."
    verdict = rule.apply(longer, CaptionSample("k", longer))
    assert verdict.keep and verdict.caption == exact  # the last whole sentence that fits
    assert verdict.scores["text_tokens"] == count(longer) > 77


def test_one_long_sentence_is_rejected_by_trim_and_drop_and_counted_by_keep(count):
    long_sentence = "A circle " + " ".join(["with a tiny red dot"] * 12) + "."
    assert count(long_sentence) > 77
    sample = CaptionSample("k", long_sentence)
    trimmed = TextTokenFilter(count, 77, "trim").apply(long_sentence, sample)
    assert not trimmed.keep and trimmed.reason == "text_tokens"  # never cut mid-sentence
    assert not TextTokenFilter(count, 77, "drop").apply(long_sentence, sample).keep
    kept = TextTokenFilter(count, 77, "keep").apply(long_sentence, sample)
    assert kept.keep and kept.caption is None and kept.scores["text_tokens"] > 77


def test_non_english_sentences_are_cut_at_their_own_full_stops(count):
    japanese = "青い背景に赤い円があります。右に緑の星があります。左に黄色い四角があります。"
    rule = TextTokenFilter(count, max_tokens=count("青い背景に赤い円があります。") + 3)
    verdict = rule.apply(japanese, CaptionSample("k", japanese))
    assert verdict.keep and verdict.caption == "青い背景に赤い円があります。"
    french = "Un cercle rouge sur fond bleu. Une étoile verte à droite, très petite."
    rule = TextTokenFilter(count, max_tokens=count("Un cercle rouge sur fond bleu."))
    verdict = rule.apply(french, CaptionSample("k", french))
    assert verdict.caption == "Un cercle rouge sur fond bleu."


def test_filter_stage_measures_trims_and_reports_with_the_teachers_tokenizer(
    run_inputs, tmp_path, count
):
    config, _ = run_inputs
    tokenizer_dir = tmp_path / "tokenizer"
    build_tiny_clip_tokenizer().save_pretrained(tokenizer_dir)
    source = config.source
    overrides = [
        "filter.text_tokens=trim",
        "filter.max_text_tokens=40",
        f"filter.text_tokenizer={tokenizer_dir}",
    ]
    assert main(["filter", str(source), *overrides]) == 0
    assert main(["merge", str(source), *overrides]) == 0
    config = load_config(source, overrides)
    tables = [pq.read_table(p) for p in sorted(config.filtered_dir.glob("*.parquet"))]
    rows = [r for t in tables for r in t.to_pylist()]
    measured = [r for r in rows if r["text_tokens"] is not None]
    assert measured and any(r["text_tokens"] > 40 for r in measured)
    for row in measured:
        if row["keep"]:
            assert count(row["caption_clean"]) <= 40
    assert any(r["reason"] == "text_tokens" for r in rows) or any(
        r["keep"] and r["text_tokens"] > 40 for r in rows
    )
    # The caption as generated stays in the dataset beside the trimmed one.
    dataset = pq.read_table(config.dataset_dir / "parquet").to_pylist()
    trimmed = [d for d in dataset if d["text_tokens"] > 40]
    assert trimmed and all(
        d["synthetic_caption_raw"].startswith(d["synthetic_caption"][:10]) for d in trimmed
    )
    assert all(len(d["synthetic_caption"]) < len(d["synthetic_caption_raw"]) for d in trimmed)
    html = (config.dataset_dir / "report" / "index.html").read_text()
    assert "caption length in text-encoder tokens" in html
    stats = json.loads((config.dataset_dir / "stats.json").read_text())
    assert stats["filter"]["settings"]["text_tokens"] == "trim"


def test_a_tokenizer_that_cannot_be_loaded_is_refused_at_start_up(run_inputs, tmp_path, caplog):
    config, _ = run_inputs
    code = main(
        [
            "filter",
            str(config.source),
            "filter.text_tokens=trim",
            f"filter.text_tokenizer={tmp_path / 'none'}",
        ]
    )
    assert code == 2 and "filter.text_tokens: off" in caplog.text
    assert not list(config.filtered_dir.glob("*.parquet"))
