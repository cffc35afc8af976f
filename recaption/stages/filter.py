"""Filter stage: apply the named caption rules to every caption, shard by shard.

Reads ``captions/{shard}.parquet`` (only shards whose caption done marker exists) and writes
``filtered/{shard}.parquet`` with one row per input sample: ``key``, ``keep``, ``reason`` (the
first rule that rejected it, ``caption_error`` for samples the caption stage failed, or null),
``caption_clean`` and every score a rule computed (null where the rule did not run). For every
shard, ``n_input == n_kept + sum(rejected.values()) + n_failed``; the done marker holds those
counts.

Two rules need the whole run:

- **Exact duplicates.** Before any shard is decided, each worker builds a table of caption
  hashes over *all* finished caption shards. Each shard's hashes are cached in
  ``filtered/_caption_hashes/{shard}-{signature}.npy`` (8 bytes a caption; the signature is
  the caption parquet's size and mtime, so a rerun caption shard is hashed again). Every rank
  computes the same table itself from the same files rather than waiting for rank 0: the cache
  files are written atomically and their content is deterministic, so two ranks racing on one
  write the same bytes, and no rank ever reads a half table. Only counts above 1 are kept in
  memory.
- **CLIP percentile.** With ``min_clip_percentile``, CLIP scores of every shard are computed
  first (each rank scores its own shards and caches them in ``filtered/_clip/``), then each
  rank waits (up to ``clip_wait_seconds``) until every shard's scores exist, and computes the
  same threshold from all of them.

Each done marker records what its decisions depended on (the caption file, the duplicate
counts of its captions, the CLIP threshold); a shard whose inputs changed since is filtered
again, with a warning, even though its marker exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recaption.caption_rules import (
    CaptionRules,
    CaptionSample,
    RunInputs,
    build_rules,
    caption_hash,
)
from recaption.config import RunConfig
from recaption.driver import ShardedStage
from recaption.ledger import ShardError, atomic_path, file_signature
from recaption.schemas import CAPTION_COLUMNS_FOR_FILTER, FILTERED_SCHEMA, SCORE_COLUMNS
from recaption.shards import iter_tar_samples
from recaption.signals import StopSignals

logger = logging.getLogger(__name__)

CAPTION_ERROR = "caption_error"
DUPLICATE_KEY = "duplicate_key"


def read_caption_table(path: Path, shard: str) -> pa.Table:
    """The caption stage's table for ``shard``, checked for the columns the filter needs."""
    if not path.exists():
        raise ShardError(
            f"caption shard {shard}: {path} is missing although its done marker exists; "
            f"rerun `recaption caption` for it"
        )
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"caption shard {shard}: cannot read {path}: {exc}") from exc
    missing = [c for c in CAPTION_COLUMNS_FOR_FILTER if c not in table.column_names]
    if missing:
        raise ShardError(
            f"caption shard {shard}: {path} lacks column(s) {', '.join(missing)}; it was not "
            "written by the caption stage of this version; rerun `recaption caption`"
        )
    return table


# -- the cross-shard duplicate table ---------------------------------------------------------
class DuplicateTable:
    """Counts of caption hashes over every finished caption shard, cached per shard."""

    def __init__(self, captions_dir: Path, cache_dir: Path) -> None:
        self.captions_dir = captions_dir
        self.cache_dir = cache_dir
        self.shard_hashes: dict[str, np.ndarray] = {}
        self.counts: dict[int, int] = {}
        self.unreadable: dict[str, str] = {}

    def _cache_path(self, shard: str, signature: list[int]) -> Path:
        tag = hashlib.blake2b(json.dumps(signature).encode(), digest_size=6).hexdigest()
        return self.cache_dir / f"{shard}-{tag}.npy"

    def hashes(self, shard: str) -> np.ndarray:
        """The int64 caption hashes of a shard's ok captions (read from cache or computed)."""
        path = self.captions_dir / f"{shard}.parquet"
        cache = self._cache_path(shard, file_signature(path))
        if cache.exists():
            with contextlib.suppress(OSError, ValueError):
                return np.load(cache)
        table = pq.read_table(path, columns=["caption", "status"])
        captions = table.column("caption").to_pylist()
        statuses = table.column("status").to_pylist()
        values = np.fromiter(
            (caption_hash(c) for c, s in zip(captions, statuses, strict=True) if s == "ok"),
            dtype=np.int64,
        )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.cache_dir.glob(f"{shard}-*.npy"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
            np.save(fh, values)
        return values

    def build(self, shards: list[str]) -> dict[int, int]:
        """Hash every shard (cached), count, keep the counts above 1."""
        for shard in tqdm(shards, desc="caption hashes", unit="shard", leave=False):
            try:
                self.shard_hashes[shard] = self.hashes(shard)
            except (OSError, pa.ArrowInvalid, KeyError) as exc:
                # The shard fails (when processed) with this message; the others go on with
                # a table that lacks it, and are redone once it is repaired, because their
                # stamps hold the copy counts of their captions.
                self.unreadable[shard] = (
                    f"caption shard {shard}: {self.captions_dir / f'{shard}.parquet'} cannot "
                    f"be read ({exc}); rerun `recaption caption CONFIG`, which redoes shards "
                    "whose output is missing or unreadable"
                )
                logger.error(
                    "duplicate table built without caption shard %s (%s); the other shards' "
                    "decisions are redone once it is repaired",
                    shard,
                    exc,
                )
                self.shard_hashes[shard] = np.empty(0, dtype=np.int64)
        everything = np.concatenate([np.empty(0, np.int64), *self.shard_hashes.values()])
        unique, counts = np.unique(everything, return_counts=True)
        repeated = counts > 1
        self.counts = dict(zip(unique[repeated].tolist(), counts[repeated].tolist(), strict=True))
        logger.info(
            "duplicate table: %d captions in %d shard(s), %d distinct captions repeated",
            everything.size,
            len(shards),
            len(self.counts),
        )
        return self.counts

    def shard_digest(self, shard: str) -> str:
        """A digest of the copy counts of one shard's captions: changes iff its decisions may."""
        values = self.shard_hashes.get(shard, np.empty(0, np.int64))
        copies = np.array([self.counts.get(int(h), 1) for h in values], dtype=np.int64)
        return hashlib.blake2b(copies.tobytes(), digest_size=8).hexdigest()


# -- CLIP -----------------------------------------------------------------------------------
def read_shard_images(tar_path: Path, keys: set[str]) -> dict[str, bytes]:
    """Image bytes of the wanted keys from an img2dataset tar."""
    images: dict[str, bytes] = {}
    for sample in iter_tar_samples(tar_path):
        if sample.key in keys:
            data = sample.image_bytes()
            if data is not None:
                images[sample.key] = data
    return images


class ClipScores:
    """CLIP scores of synthetic captions and original alt-texts, cached per shard."""

    def __init__(self, config: RunConfig, stop: StopSignals) -> None:
        self.config = config
        self.stop = stop
        self.section = config.filter
        self.cache_dir = config.filtered_dir / "_clip"
        self._scorer: Any = None

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            from recaption.demo.models import resolve_model
            from recaption.models.clip import ClipScorer

            self._scorer = ClipScorer(
                resolve_model(self.config, self.section.clip_model or ""),
                device=self.section.clip_device,
                batch_size=self.section.clip_batch_size,
                revision=self.section.clip_revision,
            )
        return self._scorer

    def cache_path(self, shard: str) -> Path:
        return self.cache_dir / f"{shard}.parquet"

    def signature(self, shard: str) -> str:
        parts = [
            file_signature(self.config.captions_dir / f"{shard}.parquet"),
            self.section.clip_model,
            self.section.clip_revision,
        ]
        tar = self.config.images_dir / f"{shard}.tar"
        if tar.exists():
            parts.append(file_signature(tar))
        return hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).hexdigest()

    def cached(self, shard: str) -> pa.Table | None:
        path = self.cache_path(shard)
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid):
            return None
        meta = table.schema.metadata or {}
        if meta.get(b"signature", b"").decode() != self.signature(shard):
            return None
        return table

    def scores(self, shard: str) -> dict[str, tuple[float, float]]:
        """key -> (clip_score, clip_score_original) for the shard's ok captions."""
        table = self.cached(shard)
        if table is None:
            table = self._compute(shard)
        keys = table.column("key").to_pylist()
        ours = table.column("clip_score").to_pylist()
        theirs = table.column("clip_score_original").to_pylist()
        return dict(zip(keys, zip(ours, theirs, strict=True), strict=True))

    def _compute(self, shard: str) -> pa.Table:
        from PIL import Image, UnidentifiedImageError

        captions = read_caption_table(self.config.captions_dir / f"{shard}.parquet", shard)
        rows = [r for r in captions.to_pylist() if r.get("status") == "ok"]
        tar_path = self.config.images_dir / f"{shard}.tar"
        if not tar_path.exists():
            raise ShardError(
                f"shard {shard}: image shard {tar_path} is gone, so CLIP scores cannot be "
                "computed; restore it (rerun `recaption download`) or turn filter.clip_model off"
            )
        images = read_shard_images(tar_path, {r["key"] for r in rows})
        keys, pil, ours, theirs = [], [], [], []
        for row in rows:
            data = images.get(row["key"])
            if data is None:
                continue
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except (UnidentifiedImageError, OSError) as exc:
                logger.warning("shard %s key %s: undecodable image: %s", shard, row["key"], exc)
                continue
            keys.append(row["key"])
            pil.append(image)
            ours.append(row.get("caption") or "")
            theirs.append(row.get("original_text") or "")
        score_ours = np.empty(0, np.float32)
        score_theirs = np.empty(0, np.float32)
        chunks_ours, chunks_theirs = [], []
        step = self.section.clip_batch_size * 4
        for start in range(0, len(keys), step):
            self.stop.check()
            chunks_ours.append(
                self.scorer.score(pil[start : start + step], ours[start : start + step])
            )
            chunks_theirs.append(
                self.scorer.score(pil[start : start + step], theirs[start : start + step])
            )
        if chunks_ours:
            score_ours = np.concatenate(chunks_ours)
            score_theirs = np.concatenate(chunks_theirs)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "clip_score": pa.array(score_ours, pa.float32()),
                "clip_score_original": pa.array(score_theirs, pa.float32()),
            }
        ).replace_schema_metadata({"signature": self.signature(shard)})
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.cache_path(shard)) as tmp:
            pq.write_table(table, tmp)
        return table

    def percentile_threshold(
        self, shards: list[str], mine: list[str], world_size: int
    ) -> float | None:
        """Score this rank's shards (``mine``), wait for the others', return the run-wide
        percentile."""
        for shard in tqdm([s for s in mine if self.cached(s) is None], desc="clip scores"):
            try:
                self._compute(shard)
            except ShardError as exc:
                logger.error("%s", exc)
        deadline = time.monotonic() + self.section.clip_wait_seconds
        while True:
            tables = {s: self.cached(s) for s in shards}
            missing = [s for s, t in tables.items() if t is None]
            if not missing or world_size == 1 or time.monotonic() > deadline:
                break
            self.stop.check()
            time.sleep(5)
        if missing:
            logger.warning(
                "CLIP percentile computed without shard(s) %s (no scores: image shard missing "
                "or another rank has not scored them yet)",
                ", ".join(missing[:10]),
            )
        values = [t.column("clip_score").to_numpy() for t in tables.values() if t is not None]
        values = [v for v in values if v.size]
        if not values:
            return None
        threshold = float(np.percentile(np.concatenate(values), self.section.min_clip_percentile))
        logger.info(
            "CLIP threshold: %.3f (percentile %s of the run)",
            threshold,
            self.section.min_clip_percentile,
        )
        return round(threshold, 4)


# -- one shard ------------------------------------------------------------------------------
def _caption_columns(table: pa.Table) -> tuple[list[Any], ...]:
    """``key, caption, status, finish_reason, original_text`` of a caption table as lists."""
    keys = table.column("key").to_pylist()
    originals = (
        table.column("original_text").to_pylist()
        if "original_text" in table.column_names
        else [None] * len(keys)
    )
    return (
        keys,
        table.column("caption").to_pylist(),
        table.column("status").to_pylist(),
        table.column("finish_reason").to_pylist(),
        originals,
    )


def _filtered_table(keys: list[Any], decisions: list[tuple[bool, Any, str, dict]]) -> pa.Table:
    """The filtered table: key, decision, cleaned caption and every score column."""
    columns: dict[str, list[Any]] = {
        "key": [k if isinstance(k, str) else str(k or "") for k in keys],
        "keep": [d[0] for d in decisions],
        "reason": [d[1] for d in decisions],
        "caption_clean": [d[2] for d in decisions],
    }
    for name in SCORE_COLUMNS:
        columns[name] = [d[3].get(name) for d in decisions]
    return pa.table(columns, schema=FILTERED_SCHEMA)


def filter_table(
    table: pa.Table,
    rules: CaptionRules,
    *,
    shard: str = "",
    stop: StopSignals | None = None,
    caption_hashes: np.ndarray | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Decide every row of a caption table; return the filtered table and the counts.

    ``caption_hashes``, when given, are the :func:`caption_hash` values of the rows whose
    status is ``ok``, in order (as :class:`DuplicateTable` computed them), so they are not
    computed twice.
    """
    keys, captions, statuses, finish, originals = _caption_columns(table)
    hashes = caption_hashes.tolist() if caption_hashes is not None else None
    decisions: list[tuple[bool, Any, str, dict]] = []
    n_ok_rows = n_trimmed = n_rewritten = 0
    rejected: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if stop is not None and i % 2048 == 0:
            stop.check()
        key = "" if key is None else str(key)
        digest = None
        if statuses[i] == "ok":
            if hashes is not None and n_ok_rows < len(hashes):
                digest = hashes[n_ok_rows]
            n_ok_rows += 1
        if key in seen or not key:
            reason = DUPLICATE_KEY if key else "missing_key"
            decisions.append((False, reason, "", {}))
            errors[reason] += 1
            logger.warning("shard %s: row %d has %s key %r", shard, i, reason, key)
        elif statuses[i] != "ok":
            decisions.append((False, CAPTION_ERROR, "", {}))
            errors[CAPTION_ERROR] += 1
        else:
            caption = captions[i] if isinstance(captions[i], str) else ""
            d = rules.decide(CaptionSample(key, caption, finish[i], originals[i], digest))
            decisions.append((d.keep, d.reason, d.caption_clean, d.scores))
            if d.keep:
                n_trimmed += bool(d.scores.get("trimmed_chars"))
                n_rewritten += bool(d.scores.get("boilerplate_opening")) and (
                    d.caption_clean != caption
                )
            else:
                rejected[d.reason or "unknown"] += 1
        seen.add(key)
    n_kept = sum(d[0] for d in decisions)
    stats = {
        "n_input": len(keys),
        "n_kept": n_kept,
        "n_ok": n_kept,
        "n_rejected": sum(rejected.values()),
        "n_failed": sum(errors.values()),
        "rejected": dict(sorted(rejected.items())),
        "errors": dict(sorted(errors.items())),
        "n_trimmed": n_trimmed,
        "n_boilerplate_rewritten": n_rewritten,
    }
    if stats["n_input"] != n_kept + stats["n_rejected"] + stats["n_failed"]:  # pragma: no cover
        raise AssertionError(f"shard {shard}: counts do not add up: {stats}")
    return _filtered_table(keys, decisions), stats


class FilterStage(ShardedStage):
    """Filter every finished caption shard (see the module docstring)."""

    name = "filter"
    input_stage = "caption"
    output_suffixes = (".parquet",)

    def check(self) -> None:
        section = self.config.filter
        if (section.min_clip_score is not None or section.min_clip_percentile is not None) and (
            section.clip_model is None
        ):
            raise ValueError(
                "filter.min_clip_score / filter.min_clip_percentile need filter.clip_model "
                "(a CLIP hub id, folder, or demo:tiny-clip)"
            )
        if section.min_clip_score is not None and section.min_clip_percentile is not None:
            raise ValueError("set filter.min_clip_score or filter.min_clip_percentile, not both")
        build_rules(section)  # validates languages etc. before any work
        self.count_text_tokens = self._text_token_counter()
        self.clip = ClipScores(self.config, self.stop) if section.clip_model else None
        if self.clip is not None:
            _ = self.clip.scorer  # load now: a bad model path is a start-up error

    def text_tokenizer_spec(self) -> str | None:
        """The tokenizer that measures captions: filter.text_tokenizer, else the teacher's."""
        section = self.config.filter
        if section.text_tokens == "off":
            return None
        return section.text_tokenizer or self.config.train.teacher

    def _text_token_counter(self) -> Callable[[str], int] | None:
        spec = self.text_tokenizer_spec()
        if spec is None:
            return None
        from recaption.demo.models import resolve_model
        from recaption.models.sdxl import load_text_tokenizer

        tokenizer = load_text_tokenizer(resolve_model(self.config, spec))
        logger.info("filter: measuring captions in %s tokens (%s)", type(tokenizer).__name__, spec)

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: its Rust encoder, without the wrapper
            backend.no_truncation()
            return lambda text: len(backend.encode(text).ids)
        return lambda text: len(tokenizer(text, truncation=False)["input_ids"])

    def stage_config(self) -> dict[str, Any]:
        # The tokenizer taken from train.teacher decides outputs too.
        return {
            **self.config.filter.fingerprint_dict(),
            "text_tokenizer": self.text_tokenizer_spec(),
        }

    def extra_outputs(self, shard: str) -> list[Path]:
        folder = self.config.filtered_dir
        return [
            *folder.glob(f"_caption_hashes/{shard}-*.npy"),
            folder / "_clip" / f"{shard}.parquet",
        ]

    def plan(self) -> None:
        """The run-wide inputs: the duplicate table and the CLIP threshold."""
        section = self.config.filter
        captions_dir = self.config.captions_dir
        self.duplicates = DuplicateTable(captions_dir, self.config.filtered_dir / "_caption_hashes")
        counts = (
            self.duplicates.build(self.shards) if section.max_duplicate_copies is not None else {}
        )
        self.clip_threshold = section.min_clip_score
        if self.clip is not None and section.min_clip_percentile is not None:
            self.clip_threshold = self.clip.percentile_threshold(
                self.shards, self.my_shards(), self.ctx.world_size
            )
        self.rules: CaptionRules = build_rules(
            section,
            RunInputs(
                duplicate_counts=counts,
                count_text_tokens=self.count_text_tokens,
                clip_scores=self.clip.scores if self.clip is not None else None,
                clip_threshold=self.clip_threshold,
            ),
        )

    def input_stamp(self, shard: str) -> Any:
        path = self.config.captions_dir / f"{shard}.parquet"
        return {
            "captions": file_signature(path) if path.exists() else None,
            "duplicates": self.duplicates.shard_digest(shard),
            "clip_threshold": self.clip_threshold,
        }

    def process(self, shard: str) -> dict[str, Any]:
        if shard in self.duplicates.unreadable:
            raise ShardError(self.duplicates.unreadable[shard])
        captions = read_caption_table(self.config.captions_dir / f"{shard}.parquet", shard)
        self.rules.begin_shard(shard)
        result, stats = filter_table(
            captions,
            self.rules,
            shard=shard,
            stop=self.stop,
            caption_hashes=self.duplicates.shard_hashes.get(shard),
        )
        self.check_stop()
        with atomic_path(self.output_dir / f"{shard}.parquet") as tmp:
            pq.write_table(result, tmp)
        logger.info(
            "filter shard %s: %d in, %d kept, rejected %s, errors %s",
            shard,
            stats["n_input"],
            stats["n_kept"],
            stats["rejected"],
            stats["errors"],
        )
        return stats
