"""The dataset's Hugging Face card, ``dataset/README.md``, rendered from ``stats.json``.

The numbers come from :func:`recaption.dataset_stats.collect_dataset_stats`; this module only
renders and writes them. The ``features`` of the front matter are derived from
:data:`recaption.schemas.DATASET_SCHEMA`, so the card cannot disagree with the parquet files.

Text from the data (alt-texts inside prompts, model names, reason names) and from the config
(``pretty_name``, ``source_description``) is escaped for where it lands: :func:`md_text` for
markdown text, :func:`md_code` for code spans, :func:`_cell` for table cells; the YAML front
matter goes through ``yaml.safe_dump``. No data string can add markup (HTML, images, links)
to the card or break out of its code span, table row or line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from recaption.config import RunConfig
from recaption.ledger import atomic_path
from recaption.schemas import DATASET_SCHEMA, IMAGE_TYPE, hf_features

__all__ = [
    "Markdown",
    "card_features",
    "front_matter",
    "md_code",
    "md_text",
    "one_line",
    "render_card",
    "write_dataset_card",
]

# Control characters and every character str.splitlines() breaks a line at.
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# Inline markdown syntax (CommonMark + GFM: strikethrough, tables; $ for the Hub's math). An
# underscore between two letters or digits can neither open nor close emphasis: left as it is.
_MD_INLINE = re.compile(r"[\\`*{}\[\]()#!|~$]|(?<![^\W_])_|_(?![^\W_])")
# What makes a line a block (list item, ordered item, setext underline) when it starts it.
_MD_BLOCK_START = re.compile(r"^([-+=])|^(\d+)([.)])")


class Markdown(str):
    """Text that is markdown already (escaped or written by us): not escaped again."""


def one_line(value: Any) -> str:
    """``value`` as one line: control characters and line breaks become single spaces."""
    return _BREAKS.sub(" ", str(value)).strip()


def md_text(value: Any) -> Markdown:
    """``value`` as literal markdown text on one line: no markup, no HTML, no link, no block."""
    text = one_line(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_INLINE.sub(lambda m: "\\" + m[0], text)
    text = _MD_BLOCK_START.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", text)
    return Markdown(text)


def md_code(value: Any) -> Markdown:
    """``value`` as an inline code span that no backtick inside can close early."""
    text = one_line(value)
    if not text:
        return Markdown("(empty)")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    # CommonMark strips one space from each side when both are there, so this padding is
    # invisible, and keeps a leading or trailing backtick from joining the fence.
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return Markdown(f"{fence}{pad}{text}{pad}{fence}")


def _cell(value: Any) -> str:
    """A table cell: one line, every pipe escaped (GFM splits cells before anything else)."""
    if isinstance(value, Markdown):
        return re.sub(r"(?<!\\)\|", r"\\|", one_line(value))
    if isinstance(value, bool | int | float):
        return str(value)
    return md_text(value)


_NA = Markdown("-")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = [
        "| " + " | ".join(_cell(Markdown(h)) for h in header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
    ):
        if n < limit:
            return name
    return "100M<n<1B"


def card_features(config: RunConfig) -> list[dict[str, str]]:
    """``dataset_info.features`` in the card's list form, from the dataset's pyarrow schema.

    The ``image`` column (datasets' ``Image`` feature) is there only when the parquet files
    embed the images (``merge.embed_images_in_parquet``).
    """
    schema = DATASET_SCHEMA
    if config.merge.embed_images_in_parquet:
        schema = schema.append(pa.field("image", IMAGE_TYPE))
    features = []
    for name, feature in hf_features(schema).items():
        kind = feature.get("_type")
        if kind == "Image":
            dtype = "image"
        elif kind == "Value":
            dtype = feature["dtype"]
        else:
            raise TypeError(f"column {name!r}: no card dtype for the datasets feature {feature}")
        features.append({"name": name, "dtype": dtype})
    return features


def front_matter(config: RunConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata: configs, features, sizes; the license is the source's."""
    return {
        "pretty_name": one_line(config.merge.pretty_name),
        "license": "other",
        "license_name": "source-terms",
        "license_details": "Images and alt-texts keep the terms of their original sources.",
        "language": sorted(config.filter.keep_languages) or ["en"],
        "task_categories": ["text-to-image", "image-to-text"],
        "tags": ["synthetic-captions", "llava", "recaption", "webdataset"],
        "size_categories": [_size_category(int(stats.get("n_samples", 0)))],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "parquet/*.parquet"}],
            }
        ],
        "dataset_info": {
            "features": card_features(config),
            "splits": [{"name": "train", "num_examples": int(stats.get("n_samples", 0))}],
        },
    }


@dataclass(frozen=True)
class _CardFacts:
    """The numbers and data strings of ``stats.json`` the card body shows, escaped once."""

    filter: dict[str, Any]
    merge: dict[str, Any]
    caption: dict[str, Any]
    download: dict[str, Any]
    prompts: list[str]
    models: str
    failed_shards: str
    source: Markdown
    length_rows: list[list[Any]]
    rejected: list[list[Any]]
    errors: list[list[Any]]
    settings: list[list[Any]]


def _by_count(counts: dict[str, int]) -> list[list[Any]]:
    """``[reason, n]`` rows of a reason -> count mapping, the largest count first."""
    return [[r, n] for r, n in sorted(counts.items(), key=lambda x: -x[1])]


def _card_facts(stats: dict[str, Any]) -> _CardFacts:
    """Read and escape what the card body needs from ``stats`` (a missing key raises here)."""
    f, m, c, d = stats["filter"], stats["merge"], stats["caption"], stats["download"]
    prompts = [md_text(p) for p in stats.get("prompts") or []] or ["(not recorded)"]
    models = ", ".join(md_code(x) for x in stats["caption_model"]) or "(not recorded)"
    failed_shards = (
        md_code(json.dumps(stats["failed_shards"])) if stats["failed_shards"] else "none"
    )
    source = md_text(stats["source"])
    lengths = stats["caption_length_words"]
    length_rows = []
    for name in ("count", "mean", "p5", "median", "p95", "max"):
        length_rows.append(
            [name, lengths["original"].get(name, _NA), lengths["synthetic"].get(name, _NA)]
        )
    rejected = _by_count(f.get("rejected", {}))
    errors = _by_count(f.get("errors", {}))
    settings: list[list[Any]] = [
        [k, md_code(json.dumps(v, ensure_ascii=False))]
        for k, v in f["settings"].items()
        if k != "refusal_phrases"
    ]
    settings.append(["refusal_phrases", f"{len(f['settings'].get('refusal_phrases', []))} phrases"])
    return _CardFacts(
        filter=f,
        merge=m,
        caption=c,
        download=d,
        prompts=prompts,
        models=models,
        failed_shards=failed_shards,
        source=source,
        length_rows=length_rows,
        rejected=rejected,
        errors=errors,
        settings=settings,
    )


def _intro_lines(config: RunConfig, stats: dict[str, Any], facts: _CardFacts) -> list[str]:
    """The title, the one-paragraph summary and "Where the data comes from"."""
    source = facts.source
    return [
        f"# {md_text(config.merge.pretty_name)}",
        "",
        f"{stats['n_samples']} image–text pairs whose images come from {source}, each "
        "with its original alt-text and a new dense caption written by a vision–language "
        "model, filtered by named rules. Made with the `recaption` pipeline: "
        "download (img2dataset) → caption → filter → merge.",
        "",
        "## Where the data comes from",
        "",
        f"- Metadata: {source}. Images were downloaded from their URLs with "
        "img2dataset; URLs, alt-texts and LAION columns (aesthetic score, similarity, "
        "punsafe, pwatermark) are kept per sample.",
        "- License: the images and alt-texts are not ours; they keep the terms of their "
        "original sources (`license: other`). Check those terms before use; the synthetic "
        "captions are model outputs and follow the caption model's license.",
        "",
    ]


def _caption_lines(config: RunConfig, facts: _CardFacts) -> list[str]:
    """The "Captions" section: the caption model, its generation settings, the prompt(s)."""
    caption_cfg = config.caption
    return [
        "## Captions",
        "",
        f"- Caption model: {facts.models}"
        f" (config: {md_code(caption_cfg.model)}, revision {md_code(caption_cfg.revision)}).",
        f"- Generation: max_new_tokens={caption_cfg.max_new_tokens}, do_sample="
        f"{caption_cfg.do_sample}, temperature={caption_cfg.temperature}, top_p="
        f"{caption_cfg.top_p}, repetition_penalty={caption_cfg.repetition_penalty}.",
        "- Prompt:",
        "",
        *[f"  > {p}" for p in facts.prompts],
        "",
        "Synthetic captions can describe things that are not in the image (hallucination); "
        "keep `original_text` for mixing, as DALL-E 3 (95% synthetic / 5% original) and SD3 "
        "(50/50) did.",
        "",
    ]


def _stage_count_rows(facts: _CardFacts) -> list[list[Any]]:
    """One row per stage: shards, samples in, out, not kept and errors."""
    f, m, c, d = facts.filter, facts.merge, facts.caption, facts.download
    return [
        [
            "download",
            d["shards"],
            d["count"],
            d["successes"],
            _NA,
            d["count"] - d["successes"],
        ],
        ["caption", c["shards"], c.get("n_input", _NA), c["n_ok"], _NA, c["n_failed"]],
        ["filter", f["shards"], f["n_input"], f["n_kept"], f["n_rejected"], f["n_failed"]],
        ["merge", m["shards"], m["n_input"], m["n_ok"], m["n_rejected"], m["n_failed"]],
    ]


def _count_lines(facts: _CardFacts) -> list[str]:
    """The counts at every stage, the rejections by reason, the errors, the filter settings."""
    f = facts.filter
    return [
        "## Counts at every stage",
        "",
        _table(["stage", "shards", "in", "out", "not kept", "errors"], _stage_count_rows(facts)),
        "",
        "For every shard: captions in = kept + rejected (by reason) + errors; see the per-shard "
        "table in `stats.json` and `report/index.html`.",
        "",
        f"Failed shards (left out): {facts.failed_shards}.",
        "",
        "### Rejections by reason (filter)",
        "",
        _table(["reason", "captions"], facts.rejected or [[Markdown("(none)"), 0]]),
        "",
        "Errors (not decided): "
        + (", ".join(f"{md_text(r)}: {int(n)}" for r, n in facts.errors) or "none")
        + f". Kept captions cut back to their last full sentence: {f.get('n_trimmed', 0)};"
        f" boilerplate openings rewritten: {f.get('n_boilerplate_rewritten', 0)}.",
        "",
        "### Filter settings",
        "",
        _table(["setting", "value"], facts.settings),
        "",
    ]


def _length_and_clip_lines(stats: dict[str, Any], facts: _CardFacts) -> list[str]:
    """Caption length statistics, then CLIP scores when they were computed."""
    lines = [
        "## Caption length (words, kept samples)",
        "",
        _table(["statistic", "original alt-text", "synthetic caption"], facts.length_rows),
        "",
    ]
    if "clip_score" in stats:
        clip = stats["clip_score"]
        lines += [
            f"## CLIP score (100 x cosine, {md_code(clip['model'])}, all ok captions)",
            "",
            _table(
                ["statistic", "original alt-text", "synthetic caption"],
                [
                    [k, clip["original"].get(k, _NA), clip["synthetic"].get(k, _NA)]
                    for k in ("count", "mean", "median", "p5", "p95")
                ],
            ),
            "",
        ]
    return lines


def _files_lines(config: RunConfig) -> list[str]:
    """The "Files" section (what each folder holds) and "Loading" (code snippets)."""
    return [
        "## Files",
        "",
        "- `parquet/{shard}.parquet`: one row per sample: url, key, image sha256, original "
        "alt-text, synthetic caption, sizes, LAION scores and filter scores"
        + (" and the image bytes." if config.merge.embed_images_in_parquet else "; no pixels."),
        "- `webdataset/{shard}.tar`: training pairs: `{key}.jpg` (original bytes), `{key}.txt` "
        "(synthetic caption), `{key}.json` (everything else).",
        "- `stats.json`: every number on this card; `report/index.html`: plots and examples; "
        "`MANIFEST.sha256`: a checksum per file (`recaption verify CONFIG`).",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("parquet", data_dir="parquet", split="train")',
        "",
        "import webdataset as wds",
        'urls = "webdataset/{00000..NNNNN}.tar"',
        'pairs = wds.WebDataset(urls).decode("pil").to_tuple("jpg", "txt")',
        "```",
        "",
    ]


def render_card(config: RunConfig, stats: dict[str, Any]) -> str:
    """The README.md text: YAML front matter, then a body a reader can check."""
    meta = yaml.safe_dump(front_matter(config, stats), sort_keys=False, allow_unicode=True)
    facts = _card_facts(stats)
    body = [
        *_intro_lines(config, stats, facts),
        *_caption_lines(config, facts),
        *_count_lines(facts),
        *_length_and_clip_lines(stats, facts),
        *_files_lines(config),
    ]
    return f"---\n{meta}---\n\n" + "\n".join(body)


def write_dataset_card(config: RunConfig, stats: dict[str, Any]) -> Path:
    """Write ``dataset/README.md`` atomically; return its path."""
    path = config.dataset_dir / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(render_card(config, stats), encoding="utf-8")
    return path
