"""The dataset's numbers (``dataset/stats.json``) and its Hugging Face card (``README.md``).

Everything here is read back from the stages' ledgers and outputs on disk, so the card says
what was actually written: counts at every stage and per rejection reason, per shard, and
caption length statistics of the original alt-text against the synthetic caption.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from recaption.config import RunConfig
from recaption.ledger import FAILED_SUFFIX, LEDGER_DIR, STATS_SUFFIX, atomic_path, list_shards

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _summary(values: np.ndarray) -> dict[str, float | int]:
    """count / mean / percentiles of a numeric array (empty-safe)."""
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return {"count": 0}
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {
        "count": int(values.size),
        "mean": round(float(values.mean()), 2),
        "min": round(float(values.min()), 2),
        "p5": round(float(p5), 2),
        "median": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "max": round(float(values.max()), 2),
    }


def word_counts(column: Any) -> np.ndarray:
    """Whitespace-separated word count of each string of a pyarrow column (nulls count 0)."""
    filled = pc.fill_null(column, "")
    return pc.list_value_length(pc.utf8_split_whitespace(filled)).to_numpy(zero_copy_only=False)


def _sum_markers(folder: Path, shards: list[str], keys: list[str]) -> dict[str, Any]:
    totals: dict[str, Any] = {k: 0 for k in keys}
    nested: dict[str, dict[str, int]] = {}
    for shard in shards:
        stats = _read_json(folder / f"{shard}{STATS_SUFFIX}")
        for k in keys:
            totals[k] += int(stats.get(k) or 0)
        for name in ("rejected", "errors", "failed"):
            for reason, n in (stats.get(name) or {}).items():
                bucket = nested.setdefault(name, {})
                bucket[reason] = bucket.get(reason, 0) + int(n)
    totals.update({k: dict(sorted(v.items())) for k, v in nested.items()})
    return totals


def collect_dataset_stats(config: RunConfig, shards: list[str]) -> dict[str, Any]:
    """Counts at every stage, per shard and per reason, and caption statistics (JSON-able)."""
    stats: dict[str, Any] = {"source": config.merge.source_description, "shards": shards}
    images_done = list_shards(config.images_dir, STATS_SUFFIX)
    download = {"shards": len(images_done), "count": 0, "successes": 0}
    for shard in images_done:
        s = _read_json(config.images_dir / f"{shard}{STATS_SUFFIX}")
        download["count"] += int(s.get("count", 0) or 0)
        download["successes"] += int(s.get("successes", s.get("n_ok", 0)) or 0)
    stats["download"] = download
    caption_done = list_shards(config.captions_dir, STATS_SUFFIX)
    stats["caption"] = {
        "shards": len(caption_done),
        **_sum_markers(config.captions_dir, caption_done, ["n_input", "n_ok", "n_failed"]),
    }
    stats["filter"] = {
        "shards": len(shards),
        **_sum_markers(
            config.filtered_dir,
            shards,
            ["n_input", "n_kept", "n_rejected", "n_failed", "n_trimmed", "n_boilerplate_rewritten"],
        ),
        "settings": config.filter.fingerprint_dict(),
    }
    merge_dir = config.stage_dir("merge")
    stats["merge"] = {
        "shards": len(shards),
        **_sum_markers(
            merge_dir,
            shards,
            ["n_input", "n_ok", "n_rejected", "n_failed", "n_images_without_caption"],
        ),
    }
    failed = {
        stage: list_shards(config.stage_dir(stage) / LEDGER_DIR, FAILED_SUFFIX)
        for stage in ("download", "caption", "filter", "merge")
    }
    stats["failed_shards"] = {stage: shards for stage, shards in failed.items() if shards}
    per_shard = []
    for shard in shards:
        f = _read_json(config.filtered_dir / f"{shard}{STATS_SUFFIX}")
        m = _read_json(merge_dir / f"{shard}{STATS_SUFFIX}")
        per_shard.append(
            {
                "shard": shard,
                "captions": f.get("n_input", 0),
                "kept": f.get("n_kept", 0),
                "rejected": f.get("rejected", {}),
                "errors": f.get("errors", {}),
                "merged": m.get("n_ok", 0),
                "merge_failed": m.get("failed", {}),
            }
        )
    stats["per_shard"] = per_shard

    parquet_files = sorted((config.dataset_dir / "parquet").glob("*.parquet"))
    parquet_files = [p for p in parquet_files if p.stem in set(shards)]
    columns = ["original_text", "synthetic_caption", "caption_model", "prompt"]
    tables = [pq.read_table(p, columns=columns) for p in parquet_files]
    if tables:
        original = np.concatenate([word_counts(t.column("original_text")) for t in tables])
        synthetic = np.concatenate([word_counts(t.column("synthetic_caption")) for t in tables])
        models = sorted({m for t in tables for m in t.column("caption_model").to_pylist() if m})
        prompts = sorted({p for t in tables for p in t.column("prompt").to_pylist() if p})
    else:
        original = synthetic = np.zeros(0, dtype=np.int64)
        models, prompts = [], []
    stats["caption_model"] = models
    stats["prompts"] = prompts[:5]
    stats["caption_length_words"] = {
        "original": _summary(original),
        "synthetic": _summary(synthetic),
    }
    stats["n_samples"] = int(stats["merge"]["n_ok"])
    clip = [
        pq.read_table(
            config.filtered_dir / f"{s}.parquet", columns=["clip_score", "clip_score_original"]
        )
        for s in shards
    ]
    ours = np.concatenate([t.column("clip_score").to_numpy(zero_copy_only=False) for t in clip])
    if ours.size and not np.isnan(ours.astype(np.float64)).all():
        theirs = np.concatenate(
            [t.column("clip_score_original").to_numpy(zero_copy_only=False) for t in clip]
        )
        stats["clip_score"] = {
            "synthetic": _summary(ours.astype(np.float64)),
            "original": _summary(theirs.astype(np.float64)),
            "model": config.filter.clip_model,
        }
    return stats


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


_FEATURES = [
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
]


def front_matter(config: RunConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata: configs, features, sizes; the license is the source's."""
    from recaption.stages.filter import SCORE_COLUMNS

    features = [{"name": n, "dtype": d} for n, d in _FEATURES]
    type_names = {"float": "float32", "int32": "int32", "bool": "bool", "string": "string"}
    for name, dtype in SCORE_COLUMNS.items():
        features.append({"name": name, "dtype": type_names.get(str(dtype), str(dtype))})
    if config.merge.embed_images_in_parquet:
        features.append({"name": "image", "dtype": "image"})
    return {
        "pretty_name": config.merge.pretty_name,
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
            "features": features,
            "splits": [{"name": "train", "num_examples": int(stats.get("n_samples", 0))}],
        },
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(config: RunConfig, stats: dict[str, Any]) -> str:
    """The README.md text: YAML front matter, then a body a reader can check."""
    meta = yaml.safe_dump(front_matter(config, stats), sort_keys=False, allow_unicode=True)
    f, m, c, d = stats["filter"], stats["merge"], stats["caption"], stats["download"]
    caption_cfg = config.caption
    prompts = stats.get("prompts") or ["(not recorded)"]
    models = ", ".join(f"`{x}`" for x in stats["caption_model"]) or "(not recorded)"
    failed_shards = json.dumps(stats["failed_shards"]) if stats["failed_shards"] else "none"
    lengths = stats["caption_length_words"]
    length_rows = []
    for name in ("count", "mean", "p5", "median", "p95", "max"):
        length_rows.append(
            [name, lengths["original"].get(name, "-"), lengths["synthetic"].get(name, "-")]
        )
    rejected = [[r, n] for r, n in sorted(f.get("rejected", {}).items(), key=lambda x: -x[1])]
    errors = [[r, n] for r, n in sorted(f.get("errors", {}).items(), key=lambda x: -x[1])]
    settings = [
        [k, f"`{json.dumps(v)}`"] for k, v in f["settings"].items() if k != "refusal_phrases"
    ]
    settings.append(["refusal_phrases", f"{len(f['settings'].get('refusal_phrases', []))} phrases"])
    body = [
        f"# {config.merge.pretty_name}",
        "",
        f"{stats['n_samples']} image–text pairs whose images come from {stats['source']}, each "
        "with its original alt-text and a new dense caption written by a vision–language "
        "model, filtered by named rules. Made with the `recaption` pipeline: "
        "download (img2dataset) → caption → filter → merge.",
        "",
        "## Where the data comes from",
        "",
        f"- Metadata: {stats['source']}. Images were downloaded from their URLs with "
        "img2dataset; URLs, alt-texts and LAION columns (aesthetic score, similarity, "
        "punsafe, pwatermark) are kept per sample.",
        "- License: the images and alt-texts are not ours; they keep the terms of their "
        "original sources (`license: other`). Check those terms before use; the synthetic "
        "captions are model outputs and follow the caption model's license.",
        "",
        "## Captions",
        "",
        f"- Caption model: {models}"
        f" (config: `{caption_cfg.model}`, revision `{caption_cfg.revision}`).",
        f"- Generation: max_new_tokens={caption_cfg.max_new_tokens}, do_sample="
        f"{caption_cfg.do_sample}, temperature={caption_cfg.temperature}, top_p="
        f"{caption_cfg.top_p}, repetition_penalty={caption_cfg.repetition_penalty}.",
        "- Prompt:",
        "",
        *[f"  > {p.replace(chr(10), ' ')}" for p in prompts],
        "",
        "Synthetic captions can describe things that are not in the image (hallucination); "
        "keep `original_text` for mixing, as DALL-E 3 (95% synthetic / 5% original) and SD3 "
        "(50/50) did.",
        "",
        "## Counts at every stage",
        "",
        _table(
            ["stage", "shards", "in", "out", "not kept", "errors"],
            [
                [
                    "download",
                    d["shards"],
                    d["count"],
                    d["successes"],
                    "-",
                    d["count"] - d["successes"],
                ],
                ["caption", c["shards"], c.get("n_input", "-"), c["n_ok"], "-", c["n_failed"]],
                ["filter", f["shards"], f["n_input"], f["n_kept"], f["n_rejected"], f["n_failed"]],
                ["merge", m["shards"], m["n_input"], m["n_ok"], m["n_rejected"], m["n_failed"]],
            ],
        ),
        "",
        "For every shard: captions in = kept + rejected (by reason) + errors; see the per-shard "
        "table in `stats.json` and `report/index.html`.",
        "",
        f"Failed shards (left out): {failed_shards}.",
        "",
        "### Rejections by reason (filter)",
        "",
        _table(["reason", "captions"], rejected or [["(none)", 0]]),
        "",
        "Errors (not decided): "
        + (", ".join(f"{r}: {n}" for r, n in errors) or "none")
        + f". Kept captions cut back to their last full sentence: {f.get('n_trimmed', 0)};"
        f" boilerplate openings rewritten: {f.get('n_boilerplate_rewritten', 0)}.",
        "",
        "### Filter settings",
        "",
        _table(["setting", "value"], settings),
        "",
        "## Caption length (words, kept samples)",
        "",
        _table(["statistic", "original alt-text", "synthetic caption"], length_rows),
        "",
    ]
    if "clip_score" in stats:
        clip = stats["clip_score"]
        body += [
            f"## CLIP score (100 x cosine, `{clip['model']}`, all ok captions)",
            "",
            _table(
                ["statistic", "original alt-text", "synthetic caption"],
                [
                    [k, clip["original"].get(k, "-"), clip["synthetic"].get(k, "-")]
                    for k in ("count", "mean", "median", "p5", "p95")
                ],
            ),
            "",
        ]
    body += [
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
    return f"---\n{meta}---\n\n" + "\n".join(body)


def write_dataset_card(config: RunConfig, stats: dict[str, Any]) -> Path:
    """Write ``dataset/README.md`` atomically; return its path."""
    path = config.dataset_dir / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(render_card(config, stats), encoding="utf-8")
    return path
