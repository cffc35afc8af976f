"""The visual report in ``dataset/report/``: plots and one self-contained ``index.html``.

Plots (matplotlib, Agg backend, PNG): caption length histograms (original alt-text against
synthetic caption), rejections by reason and CLIP-score histograms when they were computed.
``index.html`` embeds them as data URIs, with the per-shard count table, a demo run's caption
accuracy against the world's ground truth (``stats["caption_accuracy"]``) and example images
(JPEG thumbnails) beside their original alt-text and synthetic caption, so it can be opened or
mailed as one file.

Text from the data never reaches the plotting library as markup: captions are HTML text in
the page (escaped, so any script renders as text), and the figures are drawn with
mathtext and TeX off (a ``$`` in a label is a dollar sign). The page allows no script and no
image that is not embedded in it (a Content-Security-Policy), and a sample's URL is a link only
when it is http(s).

The report never blocks the dataset: a figure or an example that fails is logged (naming the
figure or the sample key), left out and listed under "Problems" on the page;
:func:`write_report` raises only when ``index.html`` itself cannot be written.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import tarfile
import textwrap
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

from recaption.caption_accuracy import accuracy_rows
from recaption.config import RunConfig
from recaption.dataset_stats import word_counts
from recaption.images import IMAGE_EXTENSIONS, decode_image
from recaption.ledger import atomic_path

logger = logging.getLogger(__name__)

# Text in figures is plain text: no mathtext ($...$), no LaTeX.
SAFE_TEXT_RC = {"text.usetex": False, "text.parse_math": False}
THUMBNAIL_SIZE = 256
# The page runs no script and loads nothing it does not embed (images are data: URIs).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'"
MAX_CAPTION_CHARS = 1000


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


def plot_text_tokens(config: RunConfig, shards: list[str], path: Path) -> Path | None:
    """Histogram of the captions' length in the text encoders' tokens, with their limit."""
    counts = [
        pq.read_table(config.filtered_dir / f"{s}.parquet", columns=["text_tokens"])
        .column("text_tokens")
        .to_numpy(zero_copy_only=False)
        for s in shards
    ]
    values = np.concatenate([c.astype(float) for c in counts]) if counts else np.zeros(0)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    limit = config.filter.max_text_tokens
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(values, bins=min(60, max(10, int(values.max()) // 4 + 1)), color="tab:blue")
    ax.axvline(limit, color="tab:red", linestyle="--", label=f"text encoder limit ({limit})")
    over = int((values > limit).sum())
    ax.set_xlabel(f"caption length in text-encoder tokens ({over} of {values.size} over)")
    ax.set_ylabel("captions")
    ax.legend()
    ax.set_title(
        f"Captions against the text encoders' context (policy: {config.filter.text_tokens})"
    )
    return _save(fig, path)


def example_samples(
    config: RunConfig, shards: list[str], n: int, problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """The first ``n`` samples of the dataset's tars: key, url, image bytes, both captions.

    A shard that cannot be read is skipped (and named in ``problems``).
    """
    out: list[dict[str, Any]] = []
    for shard in shards:
        tar_path = config.stage_dir("merge") / f"{shard}.tar"
        if len(out) >= n or not tar_path.exists():
            continue
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    fh = tar.extractfile(member)
                    if fh is None:
                        continue
                    samples.setdefault(key, {})[ext] = fh.read()
                    if len(samples) > n - len(out) + 1:
                        break
        except (tarfile.TarError, OSError) as exc:
            _problem(problems, f"examples: shard {shard}: cannot read {tar_path.name}: {exc}")
        for key, files in samples.items():
            if "json" not in files or len(out) >= n:
                continue
            try:
                meta = json.loads(files["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                _problem(problems, f"examples: sample {key!r} (shard {shard}): bad json: {exc}")
                continue
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if image is None or not isinstance(meta, dict):
                continue
            out.append(
                {
                    "key": key,
                    "shard": shard,
                    "url": meta.get("url") or "",
                    "image": image,
                    "original_text": meta.get("original_text") or "",
                    "synthetic_caption": meta.get("synthetic_caption") or "",
                }
            )
    return out


def _problem(problems: list[str] | None, message: str) -> None:
    logger.warning("report: %s", message)
    if problems is not None:
        problems.append(message)


def thumbnail_data_uri(image: bytes, size: int = THUMBNAIL_SIZE) -> str:
    """A JPEG thumbnail of image bytes as a ``data:`` URI (raises when they do not decode)."""
    picture = decode_image(image, min_side=1, draft_size=size)
    picture.thumbnail((size, size))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def safe_href(url: Any) -> str | None:
    """``url`` when it is an absolute http(s) URL fit for an ``href``, else ``None``."""
    if not isinstance(url, str) or not url or any(ord(c) < 33 or ord(c) == 127 for c in url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return url


def _img_tag(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(alt, quote=True)}" '
        f'src="data:image/png;base64,{data}"></figure>'
    )


def _shorten(text: str, limit: int = MAX_CAPTION_CHARS) -> str:
    return textwrap.shorten(text, limit, placeholder=" …") if len(text) > limit else text


def render_examples(examples: list[dict[str, Any]], problems: list[str] | None = None) -> str:
    """Each example as a figure: its thumbnail, then key, source link and both captions as text.

    Everything from the data is HTML-escaped; an image that does not decode is named in
    ``problems`` and its captions are still shown.
    """
    esc = html.escape
    items = []
    for ex in examples:
        key = str(ex.get("key", ""))
        try:
            image = (
                f'<img alt="{esc("example image " + key, quote=True)}" '
                f'src="{thumbnail_data_uri(ex["image"])}">'
            )
        except Exception as exc:  # any decoder failure: the captions are still worth showing
            reason = f"{type(exc).__name__}: {exc}"
            _problem(
                problems,
                f"examples: sample {key!r} (shard {ex.get('shard', '?')}): image not shown: "
                f"{reason}",
            )
            image = f'<div class="noimage">image not shown: {esc(reason)}</div>'
        href = safe_href(ex.get("url"))
        source = (
            f'<a href="{esc(href, quote=True)}" rel="nofollow noopener noreferrer">source</a>'
            if href
            else f'<span class="url">{esc(str(ex.get("url") or "(no url)"))}</span>'
        )
        original = _shorten(str(ex.get("original_text") or ""))
        synthetic = _shorten(str(ex.get("synthetic_caption") or ""))
        items.append(
            '<figure class="example">'
            + image
            + "<figcaption>"
            + f"<p><code>{esc(key)}</code> {source}</p>"
            + f'<p dir="auto"><b>alt-text:</b> <span class="alt">{esc(original)}</span></p>'
            + f'<p dir="auto"><b>synthetic caption:</b> <span class="caption">{esc(synthetic)}'
            + "</span></p></figcaption></figure>"
        )
    return '<div class="examples">\n' + "\n".join(items) + "\n</div>" if items else ""


# The page's stylesheet (inside <style>).
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
tr.bad td { background: #fdd; }
th.label { text-align: left; font-weight: normal; }
img { max-width: 100%; }
figure { margin: 1em 0; }
.examples { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
  gap: 1em; }
.example { margin: 0; font-size: 0.85em; overflow-wrap: anywhere; }
.example img { display: block; max-height: 256px; }
.alt { color: #1f5f9f; }
.noimage { background: #eee; padding: 2em 0.5em; color: #a00; }
.problems li { color: #a00; }
"""


def _per_shard_table(per_shard: list[dict[str, Any]]) -> str:
    """The per-shard count table; a row whose counts do not add up is marked ``bad``."""
    esc = html.escape
    reasons = sorted({r for s in per_shard for r in s["rejected"]})
    errors = sorted({r for s in per_shard for r in s["errors"]})
    head = ["shard", "captions", "kept", *reasons, *(f"error: {e}" for e in errors), "merged"]
    rows = []
    for s in per_shard:
        cells = [s["shard"], s["captions"], s["kept"]]
        cells += [s["rejected"].get(r, 0) for r in reasons]
        cells += [s["errors"].get(e, 0) for e in errors]
        cells += [s["merged"]]
        total = s["kept"] + sum(s["rejected"].values()) + sum(s["errors"].values())
        flag = "" if total == s["captions"] else ' class="bad"'
        rows.append(f"<tr{flag}>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    return (
        "<table><tr>"
        + "".join(f"<th>{esc(str(h))}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )


def _clip_section(plots: dict[str, Path | None]) -> str:
    """The CLIP-score heading and figure, or nothing when there is no such figure."""
    if not plots.get("clip_scores"):
        return ""
    return "<h2>CLIP scores</h2>" + _img_tag(plots["clip_scores"], "CLIP score histograms")


def _accuracy_section(stats: dict[str, Any]) -> str:
    """The caption-accuracy table of a demo run (synthetic vs alt-text), or nothing."""
    accuracy = stats.get("caption_accuracy")
    if not accuracy:
        return ""
    esc = html.escape
    head = ["", "synthetic: right", "synthetic: false", "alt-text: right", "alt-text: false"]
    rows = "".join(
        '<tr><th class="label">'
        + esc(str(row[0]))
        + "</th>"
        + "".join(f"<td>{esc(str(cell))}</td>" for cell in row[1:])
        + "</tr>"
        for row in accuracy_rows(accuracy)
    )
    skipped = int(accuracy.get("n_without_truth") or 0)
    return (
        "<h2>Caption accuracy against ground truth</h2>"
        f"<p>{_number(accuracy.get('n'))} kept samples of the demo world, each caption read "
        "back for the attributes it states and compared with what the image shows "
        f"(<code>{esc(str(accuracy.get('truth', '')))}</code>"
        + (f"; left out: {skipped} without a ground-truth row" if skipped else "")
        + "). Right and false are fractions of all samples; a caption that does not state an "
        "attribute is neither.</p><table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr>"
        + rows
        + "</table>"
    )


def _problem_section(problems: list[str] | None) -> str:
    """The list of problems met making the report, or nothing when there were none."""
    if not problems:
        return ""
    return (
        '<h2>Problems making this report</h2><ul class="problems">'
        + "".join(f"<li>{html.escape(p)}</li>" for p in problems)
        + "</ul>"
    )


def _counts_paragraph(stats: dict[str, Any], f: dict[str, Any], m: dict[str, Any]) -> str:
    """The paragraph of headline counts: samples, the filter's and the merge's numbers."""
    num = _number
    samples, captions = num(stats.get("n_samples")), num(f.get("n_input"))
    return f"""<p><b>{samples}</b> samples in the dataset. Filter: {captions}
captions, {num(f.get("n_kept"))} kept, {num(f.get("n_rejected"))} rejected,
{num(f.get("n_failed"))} errors. Merge: {num(m.get("n_ok"))} written,
{num(m.get("n_failed"))} kept but not writable, {num(m.get("n_images_without_caption"))} images
without a caption row.</p>"""


def render_html(
    config: RunConfig,
    stats: dict[str, Any],
    plots: dict[str, Path | None],
    examples: str = "",
    problems: list[str] | None = None,
) -> str:
    """One self-contained HTML page: counts, plots (data URIs), per-shard table, examples.

    ``examples`` is the HTML of :func:`render_examples`; ``problems`` are listed on the page.
    """
    f, m = stats["filter"], stats["merge"]
    esc = html.escape
    table = _per_shard_table(stats["per_shard"])
    clip_section = _clip_section(plots)
    problem_section = _problem_section(problems)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(CSP, quote=True)}">
<meta name="referrer" content="no-referrer">
<title>{esc(config.merge.pretty_name)}: report</title>
<style>{_STYLE}</style></head><body>
<h1>{esc(config.merge.pretty_name)}</h1>
{problem_section}
{_counts_paragraph(stats, f, m)}
<h2>Filter decisions</h2>
{_img_tag(plots.get("rejections"), "filter decisions by reason")}
<h2>Caption length</h2>
{_img_tag(plots.get("caption_lengths"), "caption length histograms")}
{
        _img_tag(plots.get("text_tokens"), "caption length in text-encoder tokens")
        if plots.get("text_tokens")
        else ""
    }
{clip_section}
{_accuracy_section(stats)}
<h2>Examples (original alt-text and synthetic caption)</h2>
{examples}
<h2>Per shard (captions = kept + rejected + errors)</h2>
{table}
</body></html>
"""


def _number(value: Any) -> str:
    return html.escape(str(value if value is not None else 0))


def _draw_figure(
    name: str, draw: Callable[[Path], Path | None], path: Path, problems: list[str]
) -> Path | None:
    """Draw one figure with plain-text labels; on any failure log it, note it, return None."""
    try:
        with plt.rc_context(SAFE_TEXT_RC):
            return draw(path)
    except Exception as exc:  # a figure is never worth losing the report (or the dataset)
        plt.close("all")
        _problem(problems, f"figure {name}: {type(exc).__name__}: {str(exc)[:500]}")
        return None


def write_report(config: RunConfig, stats: dict[str, Any]) -> Path:
    """Write every plot and ``index.html`` into ``dataset/report/``; return the html path.

    A figure or an example that fails is logged and listed on the page, never raised.
    """
    out = config.dataset_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    shards = list(stats.get("shards") or [])
    problems: list[str] = []
    figures: dict[str, Callable[[Path], Path | None] | None] = {
        "caption_lengths": lambda path: plot_caption_lengths(config, shards, path),
        "rejections": lambda path: plot_rejections(stats, path),
        "clip_scores": (lambda path: plot_clip_scores(config, shards, path))
        if "clip_score" in stats
        else None,
        "text_tokens": (lambda path: plot_text_tokens(config, shards, path))
        if config.filter.text_tokens != "off"
        else None,
    }
    plots: dict[str, Path | None] = {
        name: _draw_figure(name, draw, out / f"{name}.png", problems) if draw else None
        for name, draw in figures.items()
    }
    # examples.png: the example grid of earlier versions, now HTML.
    for name in (*plots, "examples"):
        stale = out / f"{name}.png"
        if plots.get(name) is None and stale.exists():
            stale.unlink()
    try:
        examples = example_samples(config, shards, config.merge.report_examples, problems)
        examples_html = render_examples(examples, problems)
    except Exception as exc:
        _problem(problems, f"examples: {type(exc).__name__}: {str(exc)[:500]}")
        examples_html = ""
    try:
        page = render_html(config, stats, plots, examples_html, problems)
    except Exception as exc:
        _problem(problems, f"page: {type(exc).__name__}: {str(exc)[:500]}")
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{html.escape(CSP)}">'
            "<title>report</title></head><body><h1>Report incomplete</h1><ul>"
            + "".join(f"<li>{html.escape(p)}</li>" for p in problems)
            + "</ul><p>Every number is in <code>../stats.json</code>.</p></body></html>\n"
        )
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index
