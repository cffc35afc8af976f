"""Reading LAION-style metadata parquet files and pre-filtering them with pyarrow.

The rules run in order and each counts the rows it removed, so a run can say how many rows
every rule cost. Thresholds come from the ``download`` config section.

``download.blocklist`` names text files of URLs and metadata hashes (one a line); rows whose
URL or ``download.hash_col`` value is listed are removed before anything else is looked at, and
counted as ``blocklist``. It matches the metadata only (URL and the metadata's own hash
column), not the bytes of images.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recaption.config import DownloadConfig
from recaption.netguard import LOOPBACK, PRIVATE, literal_host_kind

logger = logging.getLogger(__name__)


class MetadataError(ValueError):
    """Metadata that cannot be used, with the file and what to do."""


@dataclass
class PrefilterReport:
    """Rows in, rows removed by each rule (in order), rows kept."""

    input_rows: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    kept: int = 0


# A blocklist is a short list of known-bad links; this bounds what reading one may cost.
MAX_BLOCKLIST_BYTES = 1 << 30


@dataclass(frozen=True)
class Blocklist:
    """URLs and metadata hashes to drop, read from the ``download.blocklist`` files."""

    urls: frozenset[str] = frozenset()
    hashes: frozenset[str] = frozenset()
    files: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.urls or self.hashes)

    def digest(self) -> str:
        """A digest of the entries (not of the file names): what decides the download."""
        h = hashlib.sha256()
        for kind, entries in (("url", self.urls), ("hash", self.hashes)):
            for entry in sorted(entries):
                h.update(f"{kind}\t{entry}\n".encode())
        return h.hexdigest()[:16]


def load_blocklist(specs: list[str]) -> Blocklist:
    """Read every blocklist file: one entry a line, ``#`` starts a comment.

    An entry with ``://`` is a URL (matched exactly against ``download.url_col``); any other
    entry is a hash, matched against ``download.hash_col`` written as text (LAION's ``hash``
    column holds integers: list them in decimal). Raises :class:`MetadataError` naming the
    file and the config key for a file that is missing, unreadable or not text. A line whose
    first character (after blanks) is ``#`` is a comment; there are no comments after an entry
    (URLs may hold ``#``).
    """
    urls: set[str] = set()
    hashes: set[str] = set()
    for spec in specs:
        path = Path(spec)
        try:
            size = path.stat().st_size
            if size > MAX_BLOCKLIST_BYTES:
                raise MetadataError(
                    f"{path}: blocklist file of {size / 1e9:.1f} GB (download.blocklist); a "
                    f"blocklist holds at most {MAX_BLOCKLIST_BYTES >> 20} MiB of URLs or hashes"
                )
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MetadataError(
                f"{path}: blocklist file not found (download.blocklist); list existing text "
                "files of URLs or hashes, one a line"
            ) from None
        except IsADirectoryError:
            raise MetadataError(
                f"{path}: is a folder (download.blocklist); list the blocklist files themselves"
            ) from None
        except UnicodeDecodeError as exc:
            raise MetadataError(
                f"{path}: not UTF-8 text (byte {exc.start}) (download.blocklist); a blocklist "
                "is a text file of URLs or hashes, one a line"
            ) from None
        except OSError as exc:
            raise MetadataError(
                f"{path}: cannot read the blocklist (download.blocklist): {exc.strerror or exc}"
            ) from None
        n_before = len(urls) + len(hashes)
        for line in text.splitlines():
            entry = line.strip()  # a URL may hold '#': only whole lines are comments
            if not entry or entry.startswith("#"):
                continue
            (urls if "://" in entry else hashes).add(entry)
        logger.info("blocklist %s: %d new entr(ies)", path, len(urls) + len(hashes) - n_before)
    return Blocklist(frozenset(urls), frozenset(hashes), tuple(specs))


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
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise _type_conflict(paths, tables, required, exc) from None
    if table.num_rows == 0:
        raise MetadataError(
            f"{', '.join(map(str, paths))}: metadata has no rows; nothing to download"
        )
    return table


def _type_conflict(
    paths: list[Path], tables: list[pa.Table], required: dict[str, str], exc: Exception
) -> MetadataError:
    """The first column whose type in one file cannot be merged with its type in the others."""
    seen: dict[str, tuple[pa.DataType, Path]] = {}
    for path, table in zip(paths, tables, strict=True):
        for column in table.schema:
            if column.name not in seen:
                seen[column.name] = (column.type, path)
                continue
            merged, first = seen[column.name]
            try:
                unified = pa.unify_schemas(
                    [pa.schema([(column.name, merged)]), pa.schema([column])],
                    promote_options="permissive",
                )
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                key = (
                    f"config key download.{required[column.name]}"
                    if column.name in required
                    else "listed in download.save_additional_columns"
                )
                return MetadataError(
                    f"{path}: column {column.name!r} ({key}) is {column.type} here but "
                    f"{merged} in {first}; every metadata file must give a column the same "
                    f"type. Rewrite {path.name} with {column.name!r} cast to {merged} (or the "
                    "other files to match), or leave it out of download.metadata."
                )
            seen[column.name] = (unified.field(0).type, first)
    return MetadataError(
        f"{', '.join(map(str, paths))}: the metadata files cannot be read as one table ({exc}); "
        "give every column the same type in every file"
    )


def host_kind_masks(urls: pa.ChunkedArray) -> dict[str, pa.ChunkedArray]:
    """Per kind (``loopback``, ``private``): True where the URL's host is one, literally.

    The host is taken as urllib takes it (the netloc ends at the first ``/``, ``?`` or ``#``;
    see :func:`recaption.netguard.url_host`) and classified on unique netlocs only. This is a
    count of what is obviously refused; the guard itself is :mod:`recaption.netguard`, at
    connect time.
    """
    netlocs = pc.struct_field(
        pc.extract_regex(urls, r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<netloc>[^/?#]*)"), [0]
    )
    by_kind: dict[str, list[str]] = {LOOPBACK: [], PRIVATE: []}
    for netloc in pc.unique(netlocs).to_pylist():
        kind = literal_host_kind(netloc) if netloc else None
        if kind is not None:
            by_kind[kind].append(netloc)
    return {
        kind: pc.fill_null(pc.is_in(netlocs, value_set=pa.array(values, pa.string())), False)
        for kind, values in by_kind.items()
    }


# What each rule's count means and the config key that controls it (for messages).
RULE_KEYS: dict[str, str] = {
    "url_missing": "rows without a URL: check download.url_col",
    "blocklist": "rows whose URL or hash is listed in download.blocklist "
    "(column download.url_col / download.hash_col)",
    "url_scheme": "URLs that are not http(s): check download.url_col",
    "loopback_host": "URLs whose host is this machine (127.0.0.0/8, ::1, localhost): "
    "download.allow_loopback",
    "private_host": "URLs whose host is a private or link-local address: "
    "download.allow_private_networks",
    "aesthetic_score": "download.min_aesthetic_score (column download.aesthetic_col)",
    "min_width": "download.min_width (column download.width_col)",
    "min_height": "download.min_height (column download.height_col)",
    "punsafe": "download.max_punsafe (column download.punsafe_col)",
    "pwatermark": "download.max_pwatermark (column download.pwatermark_col)",
}


def no_rows_left_message(report: PrefilterReport) -> str:
    """Which rules removed the rows, and the config key that controls each."""
    removed = sorted(
        ((n, rule) for rule, n in report.removed.items() if n), key=lambda item: -item[0]
    )
    parts = [f"{rule} removed {n} ({RULE_KEYS.get(rule, rule)})" for n, rule in removed]
    return (
        f"no rows left after the pre-filter: of {report.input_rows} metadata rows, "
        + "; ".join(parts)
        + ". Change the config key of the rule that removed them, or check the metadata."
    )


def blocklist_keep_mask(table: pa.Table, cfg: DownloadConfig, blocklist: Blocklist) -> pa.Array:
    """True for rows whose URL and hash are both absent from ``blocklist``."""
    listed = pc.is_in(table[cfg.url_col], value_set=pa.array(sorted(blocklist.urls), pa.string()))
    listed = pc.fill_null(listed, False)
    if blocklist.hashes:
        hashes = pc.cast(table[cfg.hash_col], pa.string())
        hit = pc.is_in(hashes, value_set=pa.array(sorted(blocklist.hashes), pa.string()))
        listed = pc.or_(listed, pc.fill_null(hit, False))
    return pc.invert(listed)


KeepMask = Callable[[pa.Table], pa.ChunkedArray]


def prefilter_rules(
    cfg: DownloadConfig, blocklist: Blocklist | None = None
) -> list[tuple[str, str, KeepMask | None]]:
    """The pre-filter rules in order: ``(name, config key of the column it reads, keep-mask)``;
    the mask is None when the config turns the rule off."""
    url = cfg.url_col
    listed = blocklist if blocklist else None

    def host_rule(kind: str) -> KeepMask:
        return lambda t: pc.invert(host_kind_masks(t[url])[kind])

    def at_least(column: str, bound: float | None) -> KeepMask | None:
        if not bound:
            return None
        return lambda t: pc.fill_null(pc.greater_equal(t[column], bound), False)

    def at_most(column: str, bound: float | None) -> KeepMask | None:
        if bound is None:
            return None
        return lambda t: pc.fill_null(pc.less_equal(t[column], bound), True)

    return [
        ("url_missing", "url_col", lambda t: pc.invert(pc.is_null(t[url]))),
        (
            "blocklist",
            "hash_col" if listed is not None and listed.hashes else "url_col",
            None if listed is None else lambda t: blocklist_keep_mask(t, cfg, listed),
        ),
        (
            "url_scheme",
            "url_col",
            lambda t: pc.fill_null(
                pc.match_substring_regex(t[url], r"^[hH][tT][tT][pP][sS]?://"), False
            ),
        ),
        ("loopback_host", "url_col", None if cfg.allow_loopback else host_rule(LOOPBACK)),
        ("private_host", "url_col", None if cfg.allow_private_networks else host_rule(PRIVATE)),
        # A minimum aesthetic score of 0 is a real threshold (scores can be negative).
        (
            "aesthetic_score",
            "aesthetic_col",
            None
            if cfg.min_aesthetic_score is None
            else lambda t: pc.fill_null(
                pc.greater_equal(t[cfg.aesthetic_col], cfg.min_aesthetic_score), False
            ),
        ),
        ("min_width", "width_col", at_least(cfg.width_col, cfg.min_width)),
        ("min_height", "height_col", at_least(cfg.height_col, cfg.min_height)),
        ("punsafe", "punsafe_col", at_most(cfg.punsafe_col, cfg.max_punsafe)),
        ("pwatermark", "pwatermark_col", at_most(cfg.pwatermark_col, cfg.max_pwatermark)),
    ]


def prefilter(
    table: pa.Table, cfg: DownloadConfig, blocklist: Blocklist | None = None
) -> tuple[pa.Table, PrefilterReport]:
    """Apply the download pre-filter rules in order; count what each removed.

    ``blocklist`` (from :func:`load_blocklist`) is applied first, after rows without a URL.
    Raises :class:`MetadataError` naming the rules (and their config keys) that removed the
    rows when none is left.
    """
    report = PrefilterReport(input_rows=table.num_rows)
    for name, key, keep in prefilter_rules(cfg, blocklist):
        if keep is None:
            continue
        before = table.num_rows
        try:
            mask = keep(table)
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            column = getattr(cfg, key)
            raise MetadataError(
                f"pre-filter rule {name}: column {column!r} (config key download.{key}) has "
                f"type {table.schema.field(column).type}, which the rule cannot compare ({exc}); "
                f"point download.{key} at the right column or fix its type in the metadata"
            ) from None
        table = table.filter(mask)
        report.removed[name] = before - table.num_rows
    report.kept = table.num_rows
    if report.input_rows and not report.kept:
        raise MetadataError(no_rows_left_message(report))
    return table, report


def required_columns(cfg: DownloadConfig, blocklist: Blocklist | None = None) -> dict[str, str]:
    """Columns the enabled rules need, mapped to the config key that names each."""
    required = {cfg.url_col: "url_col", cfg.caption_col: "caption_col"}
    if blocklist is not None and blocklist.hashes:
        required[cfg.hash_col] = "hash_col"
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
