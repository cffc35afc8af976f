"""Reading LAION-style metadata parquet files and pre-filtering them with pyarrow.

The rules run in order and each counts the rows it removed, so a run can say how many rows
every rule cost. Thresholds come from the ``download`` config section.
"""

from __future__ import annotations

import glob
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recaption.config import DownloadConfig

logger = logging.getLogger(__name__)


class MetadataError(ValueError):
    """Metadata that cannot be used, with the file and what to do."""


@dataclass
class PrefilterReport:
    """Rows in, rows removed by each rule (in order), rows kept."""

    input_rows: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    kept: int = 0


def expand_metadata_paths(specs: list[str]) -> list[Path]:
    """Files named directly, ``*.parquet`` files of named folders, and glob matches; sorted."""
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise MetadataError(f"{p}: folder has no *.parquet metadata files")
            paths += found
        elif any(ch in spec for ch in "*?["):
            found = [Path(m) for m in sorted(glob.glob(spec))]
            if not found:
                raise MetadataError(f"{spec}: pattern matches no files")
            paths += found
        elif p.exists():
            paths.append(p)
        else:
            raise MetadataError(
                f"{p}: metadata file not found; set download.metadata to existing parquet files"
            )
    if not paths:
        raise MetadataError(
            "download.metadata is empty: list the LAION metadata parquet files (or a folder)"
        )
    return paths


def read_metadata(paths: list[Path], columns: list[str], required: dict[str, str]) -> pa.Table:
    """Read ``columns`` from every file into one table.

    ``required`` maps a column name to the config key that names it, for the error message.
    """
    tables = []
    for path in paths:
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise MetadataError(
                f"{path}: not a readable parquet file ({exc}); download.metadata must list "
                "parquet files such as LAION's metadata"
            ) from None
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise MetadataError(
                f"{path}: missing column(s) "
                + ", ".join(f"{c!r} (config key download.{required[c]})" for c in missing)
                + f"; the file has: {', '.join(schema.names)}. Set the config key to the right "
                "column name."
            )
        present = [c for c in columns if c in schema.names]
        table = pq.read_table(path, columns=present)
        if table.num_rows == 0:
            logger.warning("%s: no rows", path)
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="permissive")
    if table.num_rows == 0:
        raise MetadataError(
            f"{', '.join(map(str, paths))}: metadata has no rows; nothing to download"
        )
    return table


def _is_private_host(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name, not a literal address
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved


def private_host_mask(urls: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where the URL's host is a literal private, loopback or link-local IP address."""
    hosts = pc.struct_field(
        pc.extract_regex(
            urls, r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/]*@)?(?P<host>\[[^\]]*\]|[^:/?#]*)"
        ),
        [0],
    )
    unique = [h for h in pc.unique(hosts).to_pylist() if h]
    private = pa.array([h for h in unique if _is_private_host(h)], pa.string())
    return pc.fill_null(pc.is_in(hosts, value_set=private), False)


def prefilter(table: pa.Table, cfg: DownloadConfig) -> tuple[pa.Table, PrefilterReport]:
    """Apply the download pre-filter rules in order; count what each removed."""
    report = PrefilterReport(input_rows=table.num_rows)
    url = cfg.url_col
    rules: list[tuple[str, Callable[[pa.Table], pa.ChunkedArray] | None]] = [
        ("url_missing", lambda t: pc.invert(pc.is_null(t[url]))),
        (
            "url_scheme",
            lambda t: pc.fill_null(
                pc.match_substring_regex(t[url], r"^[hH][tT][tT][pP][sS]?://"), False
            ),
        ),
        (
            "private_host",
            None if cfg.allow_private_hosts else lambda t: pc.invert(private_host_mask(t[url])),
        ),
        (
            "aesthetic_score",
            None
            if cfg.min_aesthetic_score is None
            else lambda t: pc.fill_null(
                pc.greater_equal(t[cfg.aesthetic_col], cfg.min_aesthetic_score), False
            ),
        ),
        (
            "min_width",
            None
            if not cfg.min_width
            else lambda t: pc.fill_null(pc.greater_equal(t[cfg.width_col], cfg.min_width), False),
        ),
        (
            "min_height",
            None
            if not cfg.min_height
            else lambda t: pc.fill_null(pc.greater_equal(t[cfg.height_col], cfg.min_height), False),
        ),
        (
            "punsafe",
            None
            if cfg.max_punsafe is None
            else lambda t: pc.fill_null(pc.less_equal(t[cfg.punsafe_col], cfg.max_punsafe), True),
        ),
        (
            "pwatermark",
            None
            if cfg.max_pwatermark is None
            else lambda t: pc.fill_null(
                pc.less_equal(t[cfg.pwatermark_col], cfg.max_pwatermark), True
            ),
        ),
    ]
    for name, keep in rules:
        if keep is None:
            continue
        before = table.num_rows
        table = table.filter(keep(table))
        report.removed[name] = before - table.num_rows
    report.kept = table.num_rows
    return table, report


def required_columns(cfg: DownloadConfig) -> dict[str, str]:
    """Columns the enabled rules need, mapped to the config key that names each."""
    required = {cfg.url_col: "url_col", cfg.caption_col: "caption_col"}
    if cfg.min_aesthetic_score is not None:
        required[cfg.aesthetic_col] = "aesthetic_col"
    if cfg.min_width:
        required[cfg.width_col] = "width_col"
    if cfg.min_height:
        required[cfg.height_col] = "height_col"
    if cfg.max_punsafe is not None:
        required[cfg.punsafe_col] = "punsafe_col"
    if cfg.max_pwatermark is not None:
        required[cfg.pwatermark_col] = "pwatermark_col"
    return required
