"""The visual report in ``dataset/report/``: plots and one self-contained ``index.html``.

Plots (matplotlib, Agg backend, PNG): caption length histograms (original alt-text against
synthetic caption), rejections by reason, CLIP-score histograms when they were computed, and a
grid of example images with both captions. ``index.html`` embeds them as data URIs, with the
per-shard count table, so it can be opened or mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import tarfile
import textwrap
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

from recaption.config import RunConfig
from recaption.dataset_card import word_counts
from recaption.ledger import atomic_path

logger = logging.getLogger(__name__)


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # Emoji and some scripts have no glyph in the default font; they show as boxes.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_caption_lengths(config: RunConfig, shards: list[str], path: Path) -> Path | None:
    """Histogram of caption length in words: original alt-text vs synthetic caption."""
    files = [config.dataset_dir / "parquet" / f"{s}.parquet" for s in shards]
    tables = [
        pq.read_table(p, columns=["original_text", "synthetic_caption"])
        for p in files
        if p.exists()
    ]
    if not tables or sum(t.num_rows for t in tables) == 0:
        return None
    original = np.concatenate([word_counts(t.column("original_text")) for t in tables])
    synthetic = np.concatenate([word_counts(t.column("synthetic_caption")) for t in tables])
    top = max(int(np.percentile(np.concatenate([original, synthetic]), 99)), 1)
    bins = np.linspace(0, top + 1, min(60, top + 2))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(
        original,
        bins=bins,
        alpha=0.6,
        label=f"original alt-text (median {np.median(original):.0f})",
    )
    ax.hist(
        synthetic,
        bins=bins,
        alpha=0.6,
        label=f"synthetic caption (median {np.median(synthetic):.0f})",
    )
    ax.set_xlabel("words per caption (kept samples)")
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title("Caption length")
    return _save(fig, path)


def plot_rejections(stats: dict[str, Any], path: Path) -> Path:
    """Bar chart: kept, each rejection reason and each error kind, from the filter counts."""
    f = stats["filter"]
    items = [("kept", f.get("n_kept", 0))]
    items += sorted(f.get("rejected", {}).items(), key=lambda x: -x[1])
    items += [(f"error: {k}", v) for k, v in sorted(f.get("errors", {}).items())]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(items) + 1.2))
    names = [k for k, _ in items]
    values = [v for _, v in items]
    colors = (
        ["tab:green"]
        + ["tab:red"] * len(f.get("rejected", {}))
        + ["tab:gray"] * len(f.get("errors", {}))
    )
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v}", va="center")
    ax.set_xlabel("captions")
    ax.set_title(f"Filter decisions ({f.get('n_input', 0)} captions)")
    return _save(fig, path)


def plot_clip_scores(config: RunConfig, shards: list[str], path: Path) -> Path | None:
    """CLIP-score histograms of original alt-texts and synthetic captions, when computed."""
    tables = [
        pq.read_table(
            config.filtered_dir / f"{s}.parquet", columns=["clip_score", "clip_score_original"]
        )
        for s in shards
    ]
    ours = np.concatenate([t.column("clip_score").to_numpy(zero_copy_only=False) for t in tables])
    theirs = np.concatenate(
        [t.column("clip_score_original").to_numpy(zero_copy_only=False) for t in tables]
    )
    ours, theirs = ours.astype(float), theirs.astype(float)
    ours, theirs = ours[~np.isnan(ours)], theirs[~np.isnan(theirs)]
    if ours.size == 0:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(
        min(ours.min(), theirs.min(initial=ours.min())),
        max(ours.max(), theirs.max(initial=ours.max())) + 1e-6,
        40,
    )
    ax.hist(theirs, bins=bins, alpha=0.6, label=f"original alt-text (mean {theirs.mean():.1f})")
    ax.hist(ours, bins=bins, alpha=0.6, label=f"synthetic caption (mean {ours.mean():.1f})")
    ax.set_xlabel(f"CLIP score (100 x cosine, {config.filter.clip_model})")
    ax.set_ylabel("captions")
    ax.legend()
    ax.set_title("Image–text alignment")
    return _save(fig, path)


def example_samples(config: RunConfig, shards: list[str], n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of the dataset's tars: image bytes and both captions."""
    out: list[dict[str, Any]] = []
    for shard in shards:
        tar_path = config.stage_dir("merge") / f"{shard}.tar"
        if len(out) >= n or not tar_path.exists():
            continue
        samples: dict[str, dict[str, Any]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                samples.setdefault(key, {})[ext] = fh.read()
                if len(samples) > n - len(out) + 1:
                    break
        for key, files in samples.items():
            if "json" not in files or len(out) >= n:
                continue
            meta = json.loads(files["json"])
            image = next((files[e] for e in ("jpg", "png", "webp") if e in files), None)
            if image is None:
                continue
            out.append(
                {
                    "key": key,
                    "image": image,
                    "original_text": meta.get("original_text") or "",
                    "synthetic_caption": meta.get("synthetic_caption") or "",
                }
            )
    return out


def plot_examples(examples: list[dict[str, Any]], path: Path) -> Path | None:
    """A grid of example images, each with its original and synthetic caption."""
    from PIL import Image

    if not examples:
        return None
    cols = min(4, len(examples))
    rows = (len(examples) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 5.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples, strict=False):
        try:
            image = Image.open(io.BytesIO(ex["image"])).convert("RGB")
            ax.imshow(image)
        except OSError:
            ax.text(0.5, 0.5, "undecodable image", ha="center")
        original = textwrap.shorten(ex["original_text"], 90, placeholder=" ...")
        synthetic = textwrap.shorten(ex["synthetic_caption"], 220, placeholder=" ...")
        ax.set_title(
            "\n".join(textwrap.wrap(f"alt: {original}", 44)[:2]),
            fontsize=8,
            color="tab:blue",
        )
        ax.text(
            0,
            -0.04,
            "\n".join(textwrap.wrap(f"new: {synthetic}", 48)[:6]),
            transform=ax.transAxes,
            fontsize=8,
            va="top",
        )
    # Room under each image for six lines of caption, above the next row's title.
    fig.subplots_adjust(hspace=0.75, wspace=0.15)
    return _save(fig, path)


def _img_tag(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def render_html(config: RunConfig, stats: dict[str, Any], plots: dict[str, Path | None]) -> str:
    """One self-contained HTML page: counts, plots (data URIs), per-shard table, examples."""
    f, m = stats["filter"], stats["merge"]
    esc = html.escape
    reasons = sorted({r for s in stats["per_shard"] for r in s["rejected"]})
    errors = sorted({r for s in stats["per_shard"] for r in s["errors"]})
    head = ["shard", "captions", "kept", *reasons, *(f"error: {e}" for e in errors), "merged"]
    rows = []
    for s in stats["per_shard"]:
        cells = [s["shard"], s["captions"], s["kept"]]
        cells += [s["rejected"].get(r, 0) for r in reasons]
        cells += [s["errors"].get(e, 0) for e in errors]
        cells += [s["merged"]]
        total = s["kept"] + sum(s["rejected"].values()) + sum(s["errors"].values())
        flag = "" if total == s["captions"] else ' class="bad"'
        rows.append(f"<tr{flag}>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    table = (
        "<table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    clip_section = (
        "<h2>CLIP scores</h2>" + _img_tag(plots["clip_scores"], "CLIP score histograms")
        if plots.get("clip_scores")
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{esc(config.merge.pretty_name)}: report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
tr.bad td {{ background: #fdd; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
</style></head><body>
<h1>{esc(config.merge.pretty_name)}</h1>
<p><b>{stats["n_samples"]}</b> samples in the dataset. Filter: {f.get("n_input", 0)} captions,
{f.get("n_kept", 0)} kept, {f.get("n_rejected", 0)} rejected, {f.get("n_failed", 0)} errors.
Merge: {m.get("n_ok", 0)} written, {m.get("n_failed", 0)} kept but not writable,
{m.get("n_images_without_caption", 0)} images without a caption row.</p>
<h2>Filter decisions</h2>
{_img_tag(plots.get("rejections"), "filter decisions by reason")}
<h2>Caption length</h2>
{_img_tag(plots.get("caption_lengths"), "caption length histograms")}
{clip_section}
<h2>Examples</h2>
{_img_tag(plots.get("examples"), "example images with both captions")}
<h2>Per shard (captions = kept + rejected + errors)</h2>
{table}
</body></html>
"""


def write_report(config: RunConfig, stats: dict[str, Any]) -> Path:
    """Write every plot and ``index.html`` into ``dataset/report/``; return the html path."""
    out = config.dataset_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    shards = stats["shards"]
    plots: dict[str, Path | None] = {
        "caption_lengths": plot_caption_lengths(config, shards, out / "caption_lengths.png"),
        "rejections": plot_rejections(stats, out / "rejections.png"),
        "clip_scores": plot_clip_scores(config, shards, out / "clip_scores.png")
        if "clip_score" in stats
        else None,
        "examples": plot_examples(
            example_samples(config, shards, config.merge.report_examples), out / "examples.png"
        ),
    }
    for name, path in plots.items():
        stale = out / f"{name}.png"
        if path is None and stale.exists():
            stale.unlink()
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(render_html(config, stats, plots), encoding="utf-8")
    return index
