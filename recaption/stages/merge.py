"""Merge stage: join images, captions and filter decisions into the dataset.

Per shard (a filtered shard with its done marker), joined by ``key``:

- ``dataset/webdataset/{shard}.tar``: the kept samples, ``{key}.jpg`` (or the source's
  ``.png``/``.webp``) with the **original bytes**, ``{key}.txt`` the cleaned synthetic caption,
  ``{key}.json`` with url, original_text, synthetic_caption, caption_model, prompt, width,
  height, aesthetic_score, image sha256 and every filter score. The merge ledger's markers
  live beside the tars; readers glob ``*.tar``.
- ``dataset/parquet/{shard}.parquet``: the same rows as a table, without pixels unless
  ``merge.embed_images_in_parquet`` (then an ``image`` column in the datasets ``Image``
  layout).

For every shard ``n_input == n_ok + n_rejected + n_failed``: ``n_input`` rows of the filtered
table, ``n_ok`` written, ``n_rejected`` not kept by the filter (its errors included),
``n_failed`` kept but not writable (image missing from the tar or empty), by reason in
``failed``. Images in the tar that no caption row names are counted in
``n_images_without_caption``.

The card, ``stats.json``, the report and ``MANIFEST.sha256`` describe the whole dataset, so they
are written once every input shard is done. With one worker that is at the end of the run.
With several ranks, each rank checks after its own shards; the last one to finish sees every
shard done and writes them (two ranks finishing together write identical files, each through
an atomic rename). Rerunning ``recaption merge`` when every shard is done rewrites them, which
is also how a run that ended with failed shards gets its card once they are fixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.config import RunConfig
from recaption.driver import ShardedStage
from recaption.ledger import ShardError, StageSummary, atomic_path, file_signature
from recaption.schemas import (
    DATASET_SCHEMA,
    IMAGE_EXTENSIONS,
    IMAGE_TYPE,
    SCORE_COLUMNS,
    hf_features,
)
from recaption.shards import expected_keys, iter_samples_by_key
from recaption.signals import StopSignals

logger = logging.getLogger(__name__)


def parquet_dir(config: RunConfig) -> Path:
    """Where the publishable parquet shards go."""
    return config.dataset_dir / "parquet"


def _first(meta: dict[str, Any], *names: str) -> Any:
    for name in names:
        value = meta.get(name)
        if value is not None:
            return value
    return None


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    """Append one regular file (read-only, no owner) holding ``data`` untouched."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def iter_image_samples(path: Path, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for each sample of an image shard, in key order.

    Key order, not tar order (:func:`recaption.shards.iter_samples_by_key`): the published
    dataset must not depend on the order img2dataset's download threads finished in.

    A tar cut inside a member, or corrupt, raises :class:`ShardError`. A tar cut exactly between
    members reads as a shorter valid tar, so its keys are checked against the downloads
    img2dataset recorded as successful in ``{shard}.parquet``; one missing is a truncated tar,
    and raises :class:`ShardError` too.
    """
    rerun = "rerun `recaption download` for this shard"
    seen: set[str] = set()
    try:
        for sample in iter_samples_by_key(path):
            seen.add(sample.key)
            yield sample.key, sample.members
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(f"image shard {shard}: {path} is unreadable ({exc}); {rerun}") from exc
    expected = expected_keys(path.parent, shard)
    if expected is not None and not expected <= seen:
        missing = sorted(expected - seen)
        raise ShardError(
            f"image shard {shard}: {path} holds {len(seen)} samples but {shard}.parquet lists "
            f"{len(expected)} successful downloads ({len(missing)} missing, e.g. {missing[0]!r}):"
            f" the tar is probably truncated; {rerun}"
        )


def read_decisions(
    config: RunConfig, shard: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], set[str]]:
    """A shard's filter decisions and caption rows by key, and the kept keys (inputs checked)."""
    images = config.images_dir / f"{shard}.tar"
    captions_path = config.captions_dir / f"{shard}.parquet"
    filtered_path = config.filtered_dir / f"{shard}.parquet"
    if not images.exists():
        raise ShardError(
            f"shard {shard}: image shard {images} is gone (captions and filter decisions "
            "exist); restore it with `recaption download`, or delete the shard's captions"
        )
    for path, stage in ((captions_path, "caption"), (filtered_path, "filter")):
        if not path.exists():
            raise ShardError(f"shard {shard}: {path} is missing; rerun `recaption {stage}`")
    decisions = {r["key"]: r for r in pq.read_table(filtered_path).to_pylist()}
    caption_rows = {r["key"]: r for r in pq.read_table(captions_path).to_pylist()}
    kept = {k for k, r in decisions.items() if r["keep"]}
    missing_caption = [k for k in kept if k not in caption_rows]
    if missing_caption:
        raise ShardError(
            f"shard {shard}: {len(missing_caption)} kept key(s) of {filtered_path} are not in "
            f"{captions_path} (first: {missing_caption[0]!r}); the captions changed after "
            "filtering: rerun `recaption filter`"
        )
    return decisions, caption_rows, kept


def dataset_row(
    key: str,
    ext: str,
    files: dict[str, bytes],
    decision: dict[str, Any],
    caption: dict[str, Any],
) -> dict[str, Any]:
    """One published row: the sample's metadata, both captions and every filter score."""
    try:
        meta = json.loads(files.get("json", b"{}") or b"{}")
    except json.JSONDecodeError:
        meta = {}
    return {
        "key": key,
        "url": _first(meta, "url"),
        "image_sha256": hashlib.sha256(files[ext]).hexdigest(),
        "image_format": "jpg" if ext == "jpeg" else ext,
        "original_text": _first(caption, "original_text")
        or _first(meta, "caption")
        or files.get("txt", b"").decode("utf-8", "replace"),
        "synthetic_caption": decision["caption_clean"],
        "synthetic_caption_raw": caption.get("caption"),
        "caption_model": caption.get("model"),
        "prompt": caption.get("prompt"),
        "finish_reason": caption.get("finish_reason"),
        "width": _first(meta, "width", "WIDTH"),
        "height": _first(meta, "height", "HEIGHT"),
        "original_width": _first(meta, "original_width", "WIDTH"),
        "original_height": _first(meta, "original_height", "HEIGHT"),
        "aesthetic_score": _first(meta, "AESTHETIC_SCORE", "aesthetic_score"),
        "similarity": _first(meta, "similarity"),
        "punsafe": _first(meta, "punsafe"),
        "pwatermark": _first(meta, "pwatermark"),
        **{name: decision.get(name) for name in SCORE_COLUMNS},
    }


def write_sample(
    tar: tarfile.TarFile, row: dict[str, Any], ext: str, image: bytes, revision: Any, mtime: int
) -> None:
    """Append one training sample: the original image bytes, the caption and its record."""
    key = row["key"]
    sample_json = {k: v for k, v in row.items() if v is not None}
    sample_json["caption_revision"] = revision
    sample_json["sha256"] = row["image_sha256"]
    _add_file(tar, f"{key}.{ext}", image, mtime)
    _add_file(tar, f"{key}.txt", row["synthetic_caption"].encode("utf-8"), mtime)
    _add_file(
        tar,
        f"{key}.json",
        json.dumps(sample_json, ensure_ascii=False, sort_keys=True).encode(),
        mtime,
    )


def write_table(path: Path, rows: list[dict[str, Any]], images: list[bytes] | None) -> None:
    """The shard's publishable parquet; with ``images``, an ``image`` column (datasets' layout)."""
    table = pa.Table.from_pylist(rows, schema=DATASET_SCHEMA)
    if images is not None:
        column = pa.array(
            [
                {"bytes": b, "path": f"{r['key']}.{r['image_format']}"}
                for b, r in zip(images, rows, strict=True)
            ],
            IMAGE_TYPE,
        )
        table = table.append_column("image", column)
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": hf_features(table.schema)}})}
        )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def merge_shard(config: RunConfig, shard: str, stop: StopSignals | None = None) -> dict[str, Any]:
    """Write one shard's webdataset tar and parquet table; return its counts."""
    embed = config.merge.embed_images_in_parquet
    images = config.images_dir / f"{shard}.tar"
    decisions, caption_rows, kept = read_decisions(config, shard)
    failed: Counter[str] = Counter()
    written: set[str] = set()
    rows: list[dict[str, Any]] = []
    images_bytes: list[bytes] = []
    n_without_caption = 0
    # The source shard's time, not now: merging the same inputs twice gives the same bytes.
    mtime = int(images.stat().st_mtime)
    out_parquet = parquet_dir(config) / f"{shard}.parquet"
    out_parquet.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(config.stage_dir("merge") / f"{shard}.tar") as tmp_tar:
        with (
            open(tmp_tar, "wb", buffering=1 << 20) as fh,
            tarfile.open(
                fileobj=fh, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20
            ) as tar,
        ):
            for n, (key, files) in enumerate(iter_image_samples(images, shard)):
                if stop is not None and n % 512 == 0:
                    stop.check()
                if key not in decisions:
                    n_without_caption += 1
                    continue
                if key not in kept or key in written:
                    continue
                ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
                if ext is None or not files[ext]:
                    failed["empty_image" if ext else "no_image_in_sample"] += 1
                    logger.warning("shard %s key %s: no image bytes in %s", shard, key, images)
                    continue
                caption = caption_rows[key]
                row = dataset_row(key, ext, files, decisions[key], caption)
                write_sample(tar, row, ext, files[ext], caption.get("revision"), mtime)
                written.add(key)
                rows.append(row)
                if embed:
                    images_bytes.append(files[ext])
        # Kept keys not written and not counted above have no sample in the image tar.
        n_missing = len(kept - written) - sum(failed.values())
        if n_missing:
            failed["missing_image"] += n_missing
            logger.warning(
                "shard %s: %d kept key(s) have no image in %s (first: %r)",
                shard,
                n_missing,
                images,
                min(kept - written),
            )
        write_table(out_parquet, rows, images_bytes if embed else None)
    n_input = len(decisions)
    stats = {
        "n_input": n_input,
        "n_ok": len(written),
        "n_rejected": n_input - len(kept),
        "n_failed": sum(failed.values()),
        "failed": dict(sorted(failed.items())),
        "n_images_without_caption": n_without_caption,
        "bytes_images": int(sum(len(b) for b in images_bytes)) if images_bytes else None,
    }
    if stats["n_input"] != stats["n_ok"] + stats["n_rejected"] + stats["n_failed"]:
        raise ShardError(f"shard {shard}: counts do not add up: {stats}")
    if n_without_caption:
        logger.warning(
            "shard %s: %d image(s) in %s have no caption row (not in the dataset)",
            shard,
            n_without_caption,
            images,
        )
    return stats


def shard_inputs(config: RunConfig, shard: str) -> dict[str, Any]:
    """What a merged shard depends on: its three input files, by size and mtime."""
    out: dict[str, Any] = {}
    for name, path in (
        ("images", config.images_dir / f"{shard}.tar"),
        ("captions", config.captions_dir / f"{shard}.parquet"),
        ("filtered", config.filtered_dir / f"{shard}.parquet"),
    ):
        out[name] = file_signature(path) if path.exists() else None
    return out


class MergeStage(ShardedStage):
    """Merge every filtered shard, then write the card, stats, report and manifest."""

    name = "merge"
    input_stage = "filter"
    output_suffixes = (".tar",)

    def check(self) -> None:
        if not self.config.images_dir.is_dir():
            raise FileNotFoundError(
                f"{self.config.images_dir} does not exist: the image shards are gone"
            )

    def extra_outputs(self, shard: str) -> list[Path]:
        return [parquet_dir(self.config) / f"{shard}.parquet"]

    def verify_output(self, shard: str) -> str | None:
        problem = super().verify_output(shard)
        table = parquet_dir(self.config) / f"{shard}.parquet"
        if problem is None and not table.is_file():
            problem = f"{table} is missing"
        return problem

    def plan(self) -> None:
        # Published tables of shards that are not in the run (their marker already gone).
        for table in parquet_dir(self.config).glob("*.parquet"):
            if table.stem not in set(self.shards):
                logger.warning("merge: removing %s: shard not in the run any more", table)
                table.unlink(missing_ok=True)

    def input_stamp(self, shard: str) -> Any:
        return shard_inputs(self.config, shard)

    def process(self, shard: str) -> dict[str, Any]:
        for stale in parquet_dir(self.config).glob(f".{shard}.parquet*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        parquet_dir(self.config).mkdir(parents=True, exist_ok=True)
        return merge_shard(self.config, shard, self.stop)

    def finish(self, summary: StageSummary) -> None:
        finish_dataset(self.config, self.shards)
        summary.messages.append(
            f"dataset written: {self.config.dataset_dir} (README.md, stats.json, "
            "report/index.html, MANIFEST.sha256)"
        )


def finish_dataset(config: RunConfig, shards: list[str]) -> dict[str, Any]:
    """stats.json, README.md, report/ and (last) MANIFEST.sha256 of the finished dataset."""
    from recaption.dataset_card import write_dataset_card
    from recaption.dataset_stats import collect_dataset_stats
    from recaption.ledger import write_json_atomic
    from recaption.publish import write_manifest
    from recaption.report import write_report

    stats = collect_dataset_stats(config, shards)
    write_json_atomic(config.dataset_dir / "stats.json", stats)
    write_dataset_card(config, stats)
    write_report(config, stats)
    write_manifest(config.dataset_dir)
    return stats
