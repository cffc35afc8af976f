"""The dataset card and the HTML report: derived from the schema, and safe for any data.

Alt-texts, captions, model names and config strings reach ``README.md`` and
``report/index.html``; none of them may add markup there (scripts, tracking images, links),
break a code span, a table row or the front matter, or stop the report from being written.
"""

from __future__ import annotations

import ast
import html
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import markdown_it
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from recaption import stages
from recaption.config import load_config
from recaption.dataset_card import card_features, md_code, render_card
from recaption.publish import verify_dataset
from recaption.stages import StageContext

SCRIPT = "<script>alert(1)</script>"
PIXEL = "![pixel](http://tracker.example/p.gif)"
JS_LINK = "[click me](javascript:alert(1))"
BAD_MODEL = "evil`model``x <b>"
MATH = r"$\undefined{x}$"

# The card's feature list before it was derived from the schema (18 base columns, the rule
# scores, then the image column when the parquet embeds images).
EXPECTED_FEATURES = [
    ("key", "string"),
    ("url", "string"),
    ("image_sha256", "string"),
    ("image_format", "string"),
    ("original_text", "string"),
    ("synthetic_caption", "string"),
    ("synthetic_caption_raw", "string"),
    ("caption_model", "string"),
    ("prompt", "string"),
    ("finish_reason", "string"),
    ("width", "int32"),
    ("height", "int32"),
    ("original_width", "int32"),
    ("original_height", "int32"),
    ("aesthetic_score", "float32"),
    ("similarity", "float32"),
    ("punsafe", "float32"),
    ("pwatermark", "float32"),
    ("duplicate_ngram_fraction", "float32"),
    ("tail_repeats", "int32"),
    ("trimmed_chars", "int32"),
    ("boilerplate_opening", "bool"),
    ("text_tokens", "int32"),
    ("n_words", "int32"),
    ("n_chars", "int32"),
    ("language", "string"),
    ("language_confidence", "float32"),
    ("caption_copies", "int32"),
    ("clip_score", "float32"),
    ("clip_score_original", "float32"),
]


def _finish(config):
    for name in ("filter", "merge"):
        summary = stages.run(name, StageContext(config))
        assert summary.ok, summary.describe()


def _set_caption_columns(config, shard, **columns):
    """Rewrite columns of a caption shard (its done marker stays valid: same rows)."""
    path = config.captions_dir / f"{shard}.parquet"
    table = pq.read_table(path)
    for name, value in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pa.array([value] * table.num_rows, pa.string()))
    pq.write_table(table, path)


def _split_card(card: str) -> tuple[dict, str]:
    lines = card.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end])), "\n".join(lines[end + 1 :])


def _outside_code_spans(markdown: str) -> str:
    """The markdown with every code span (CommonMark backtick runs) cut out."""
    return re.sub(r"(?<![\\`])(`+)(?!`).*?(?<!`)\1(?!`)", " ", markdown)


def test_card_features_are_derived_from_the_dataset_schema(run_inputs, curate):
    config, _ = run_inputs
    assert [(f["name"], f["dtype"]) for f in card_features(config)] == EXPECTED_FEATURES
    embedded = load_config(
        curate.write_config(config.run_dir, merge={"embed_images_in_parquet": True})
    )
    assert [(f["name"], f["dtype"]) for f in card_features(embedded)] == [
        *EXPECTED_FEATURES,
        ("image", "image"),
    ]
    _finish(config)
    meta, _ = _split_card((config.dataset_dir / "README.md").read_text())
    names = [f["name"] for f in meta["dataset_info"]["features"]]
    assert names == [n for n, _ in EXPECTED_FEATURES]
    assert names == pq.read_schema(config.dataset_dir / "parquet" / "00000.parquet").names


def test_card_stats_and_report_import_no_stage():
    """The card, the numbers and the report read the schemas, never a stage module."""
    import recaption.dataset_card
    import recaption.dataset_stats
    import recaption.report

    for module in (recaption.dataset_card, recaption.dataset_stats, recaption.report):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = [
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        ]
        assert not [m for m in imported if m and m.startswith("recaption.stages")], module
    code = (
        "import sys, recaption.dataset_card, recaption.dataset_stats, recaption.report; "
        "print([m for m in sys.modules if m.startswith('recaption.stages')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_data_and_config_strings_add_no_markup_to_the_card(run_inputs, curate):
    config, _ = run_inputs
    config = load_config(
        curate.write_config(
            config.run_dir,
            merge={
                "pretty_name": f"Title {SCRIPT}\n---\nlicense: mit\n# {PIXEL}",
                "source_description": f"{JS_LINK} | cell | {PIXEL}\n- {SCRIPT}",
            },
        )
    )
    # The prompt carries the alt-text ({alt_text} prompts), as the caption stage writes it.
    prompt = f"USER: <image>\nThe alt-text is: {SCRIPT} {PIXEL} {JS_LINK} | x\n1. ASSISTANT:"
    _set_caption_columns(config, "00000", model=BAD_MODEL, prompt=prompt)
    _finish(config)
    card = (config.dataset_dir / "README.md").read_text()

    meta, body = _split_card(card)
    assert meta["license"] == "other"  # the title's "license: mit" line stayed in its string
    assert meta["pretty_name"] == f"Title {SCRIPT} --- license: mit # {PIXEL}"
    text = _outside_code_spans(body)
    assert "<script" not in text.lower() and "<b>" not in text
    assert "![" not in text
    assert not re.search(r"\]\(\s*javascript:", text)
    assert md_code(BAD_MODEL) in body  # a fence longer than any backtick run inside
    assert md_code(BAD_MODEL) == "```evil`model``x <b>```"

    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(body)
    assert "<script" not in rendered and "<img" not in rendered and "<b>" not in rendered
    assert 'href="javascript' not in rendered
    assert f"<code>{html.escape(BAD_MODEL, quote=False)}</code>" in rendered
    # Title and source are text, not a heading or list made from the data.
    assert rendered.count("<h1>") == 1


def test_table_cells_and_settings_cannot_break_their_row(run_inputs):
    config, _ = run_inputs
    _finish(config)
    stats = json.loads((config.dataset_dir / "stats.json").read_text())
    stats["filter"]["rejected"]["bad|reason\nnext | row"] = 7
    stats["filter"]["settings"]["odd`setting|"] = ["a|b", "`tick`"]
    stats["failed_shards"] = {"merge": ["0|1`"]}
    card = render_card(config, stats)
    _, body = _split_card(card)
    for line in body.splitlines():
        if line.startswith("| bad"):
            assert len(re.findall(r"(?<!\\)\|", line)) == 3, line  # two cells
        if line.startswith("| odd"):
            assert len(re.findall(r"(?<!\\)\|", _outside_code_spans(line))) == 3, line
    assert "next" in card and "\nnext" not in card


def _math_shard(curate, n: int = 4):
    good = [
        curate.sample(f"0000000{i:02d}", curate.GOOD[i] + f" Shot number {i}.") for i in range(n)
    ]
    good.append(
        curate.sample(
            "000000099",
            f"A red bicycle leans against a brick wall under a sign that reads {MATH} today.",
            original_text=f"猫が窓辺で寝ている {SCRIPT} صورة لقطة",
        )
    )
    return good


def test_report_survives_mathtext_captions_and_shows_them_as_text(tmp_path, curate):
    run_dir = tmp_path / "run"
    curate.write_shard(run_dir, "00000", _math_shard(curate))
    config = load_config(curate.write_config(run_dir))
    _finish(config)  # before: matplotlib's mathtext raised, no report, no MANIFEST.sha256
    index = config.dataset_dir / "report" / "index.html"
    page = index.read_text()
    assert html.escape(MATH) in page
    assert html.escape("猫が窓辺で寝ている") in page and "صورة لقطة" in page
    assert "<script" not in page
    assert page.count("data:image/jpeg;base64,") == 5  # every example, captions beside it
    assert not (config.dataset_dir / "report" / "examples.png").exists()
    assert (config.dataset_dir / "MANIFEST.sha256").exists()
    assert verify_dataset(config) == []


def test_a_failing_figure_or_image_is_reported_not_raised(tmp_path, curate, monkeypatch, caplog):
    from recaption import report

    run_dir = tmp_path / "run"
    samples = _math_shard(curate)
    samples.append(curate.sample("000000050", curate.GOOD[5], image=b"not an image at all"))
    curate.write_shard(run_dir, "00000", samples)
    config = load_config(curate.write_config(run_dir))
    _finish(config)
    stats = json.loads((config.dataset_dir / "stats.json").read_text())

    def boom(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(report, "plot_caption_lengths", boom)
    caplog.set_level(logging.WARNING, logger="recaption.report")
    index = report.write_report(config, stats)
    page = index.read_text()
    assert "Problems making this report" in page
    assert "figure caption_lengths: RuntimeError: drawing failed" in page
    assert "000000050" in page and "image not shown" in page
    assert any("caption_lengths" in r.getMessage() for r in caplog.records)
    assert any("000000050" in r.getMessage() for r in caplog.records)
    # The rest of the report is still there.
    assert page.count("data:image/png;base64,") == 1  # the rejections figure
    assert html.escape(MATH) in page and "<td>00000</td>" in page
    assert not (config.dataset_dir / "report" / "caption_lengths.png").exists()


def test_report_examples_escape_data_and_link_only_http(curate):
    from recaption.report import render_examples, safe_href

    image = curate.jpeg_bytes(1)
    examples = [
        {
            "key": "<b>k1</b>",
            "url": "javascript:alert(1)",
            "image": image,
            "original_text": SCRIPT + ' "><img src=x onerror=alert(1)>',
            "synthetic_caption": PIXEL + " " + MATH,
        },
        {"key": "k2", "url": 'https://example.com/a.jpg?x=1&y="2"', "image": image},
        {"key": "k3", "url": "data:text/html;base64,PHNjcmlwdD4=", "image": image},
        {"key": "k4", "url": " JavaScript:alert(1)", "image": image},
    ]
    page = render_examples(examples)
    assert "<script" not in page and "<img src=x" not in page and "<b>k1" not in page
    assert page.count("<a ") == 1
    assert 'href="https://example.com/a.jpg?x=1&amp;y=&quot;2&quot;"' in page
    assert 'href="javascript' not in page.lower() and 'href="data:' not in page
    assert html.escape(MATH) in page
    for url in ("javascript:alert(1)", "data:x", "https:evil", "http:/x", "ftp://x/y", ""):
        assert safe_href(url) is None
    assert safe_href("http://example.com/x") == "http://example.com/x"
