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
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.config import RunConfig
from recaption.ledger import (
    STATS_SUFFIX,
    ShardError,
    ShardLedger,
    StageSummary,
    atomic_path,
    list_shards,
)
from recaption.stages import StageContext
from recaption.stages.filter import SCORE_COLUMNS, file_signature

logger = logging.getLogger(__name__)

STAGE = "merge"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

DATASET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("image_sha256", pa.string()),
        ("image_format", pa.string()),
        ("original_text", pa.string()),
        ("synthetic_caption", pa.string()),
        ("synthetic_caption_raw", pa.string()),
        ("caption_model", pa.string()),
        ("prompt", pa.string()),
        ("finish_reason", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("aesthetic_score", pa.float32()),
        ("similarity", pa.float32()),
        ("punsafe", pa.float32()),
        ("pwatermark", pa.float32()),
        *SCORE_COLUMNS.items(),
    ]
)
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def parquet_dir(config: RunConfig) -> Path:
    """Where the publishable parquet shards go."""
    return config.dataset_dir / "parquet"


def _first(meta: dict[str, Any], *names: str) -> Any:
    for name in names:
        value = meta.get(name)
        if value is not None:
            return value
    return None


BLOCK = 512


class TarFormatError(ValueError):
    """A tar header that does not parse, or data that ends early."""


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    if field[:1] == b"\x80":  # GNU base-256 for sizes over 8 GB
        return int.from_bytes(field[1:], "big")
    return int(text, 8) if text else 0


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise TarFormatError(f"unexpected end of file ({len(data)} of {n} bytes)")
    return data


def iter_tar_files(fh: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for each regular file of an uncompressed tar, in order.

    A small reader for the ustar/PAX/GNU tars img2dataset and webdataset write: a header
    block, the data, padding to 512 bytes. ``tarfile`` does the same with far more per-member
    work (it dominates on shards of small images); the checksum of every header is still
    verified, and a file cut anywhere before its end-of-archive blocks raises
    :class:`TarFormatError`.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = fh.read(BLOCK)
        if len(header) < BLOCK:
            # Writers end a tar with zero blocks; a file that stops before them was cut.
            raise TarFormatError("the file ends before the end-of-archive marker (truncated)")
        if header == b"\0" * BLOCK:
            return
        stored = _octal(header[148:156])
        actual = sum(header) - sum(header[148:156]) + 8 * 32
        if stored != actual:
            raise TarFormatError(f"bad header checksum at offset {fh.tell() - BLOCK}")
        size = _octal(header[124:136])
        kind = header[156:157]
        data = _read_exact(fh, size)
        if size % BLOCK:
            _read_exact(fh, BLOCK - size % BLOCK)
        if kind == b"x":  # PAX extended header for the next member
            pax = _parse_pax(data)
            continue
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name, pax = None, {}
            continue  # folders, links, global headers
        name = header[0:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
        prefix = header[345:500].rstrip(b"\0")
        if header[257:262] == b"ustar" and prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        name = pax.get("path") or long_name or name
        long_name, pax = None, {}
        yield name, data


def _parse_pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar_samples(path: Path, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for each sample of a webdataset tar, in order.

    A sample's files are consecutive members sharing the name before the first dot (the
    webdataset convention). A truncated or corrupt tar raises :class:`ShardError`.
    """
    current: str | None = None
    files: dict[str, bytes] = {}
    try:
        with open(path, "rb", buffering=1 << 20) as fh:
            for name, data in iter_tar_files(fh):
                key, dot, ext = name.rpartition("/")[2].partition(".")
                if not dot:
                    continue
                if key != current:
                    if current is not None:
                        yield current, files
                    current, files = key, {}
                files[ext.lower()] = data
    except (TarFormatError, ValueError, OSError) as exc:
        raise ShardError(
            f"image shard {shard}: {path} is unreadable after sample {current!r} ({exc}); "
            "rerun `recaption download` for this shard"
        ) from exc
    if current is not None:
        yield current, files


class TarSink:
    """Writes regular files to a tar (ustar headers, PAX for long names), for webdataset."""

    def __init__(self, fh: BinaryIO, mtime: float) -> None:
        self.fh = fh
        self.mtime = int(mtime)

    def _header(self, name: bytes, size: int, kind: bytes) -> bytes:
        header = bytearray(BLOCK)
        header[0 : len(name)] = name
        header[100:108] = b"0000444\0"
        header[108:116] = b"0000000\0"
        header[116:124] = b"0000000\0"
        header[124:136] = b"%011o\0" % size
        header[136:148] = b"%011o\0" % self.mtime
        header[148:156] = b" " * 8
        header[156:157] = kind
        header[257:265] = b"ustar\x0000"
        header[148:156] = b"%06o\0 " % sum(header)
        return bytes(header)

    def _write(self, header: bytes, data: bytes) -> None:
        self.fh.write(header)
        self.fh.write(data)
        if len(data) % BLOCK:
            self.fh.write(b"\0" * (BLOCK - len(data) % BLOCK))

    def add(self, name: str, data: bytes) -> None:
        encoded = name.encode("utf-8")
        if len(encoded) > 100 or not name.isascii():
            record = b" path=" + encoded + b"\n"
            digits = len(str(len(record)))
            length = len(record) + digits
            if len(str(length)) != digits:
                length += 1
            pax = str(length).encode() + record
            self._write(self._header(b"././@PaxHeader", len(pax), b"x"), pax)
            encoded = encoded[:100]
        self._write(self._header(encoded, len(data), b"0"), data)

    def close(self) -> None:
        self.fh.write(b"\0" * (2 * BLOCK))


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def merge_shard(config: RunConfig, shard: str, ledger: ShardLedger | None = None) -> dict[str, Any]:
    """Write one shard's webdataset tar and parquet table; return its counts."""
    section = config.merge
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
    filtered = pq.read_table(filtered_path).to_pylist()
    caption_rows = {r["key"]: r for r in pq.read_table(captions_path).to_pylist()}
    decisions = {r["key"]: r for r in filtered}
    kept = {k for k, r in decisions.items() if r["keep"]}
    missing_caption = [k for k in kept if k not in caption_rows]
    if missing_caption:
        raise ShardError(
            f"shard {shard}: {len(missing_caption)} kept key(s) of {filtered_path} are not in "
            f"{captions_path} (first: {missing_caption[0]!r}); the captions changed after "
            "filtering: rerun `recaption filter`"
        )

    failed: Counter[str] = Counter()
    written: set[str] = set()
    rows: list[dict[str, Any]] = []
    images_bytes: list[bytes] = []
    n_without_caption = 0
    mtime = time.time()
    out_tar = (
        ledger.output_path(shard, ".tar") if ledger else config.stage_dir(STAGE) / f"{shard}.tar"
    )
    out_parquet = parquet_dir(config) / f"{shard}.parquet"
    out_parquet.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_tar) as tmp_tar:
        with open(tmp_tar, "wb", buffering=1 << 20) as fh:
            tar = TarSink(fh, mtime)
            # Each image is hashed in a thread (hashlib releases the GIL) while the next sample
            # is read and parsed; a sample is written once its hash is ready, one sample later.
            pending: tuple[dict[str, Any], str, bytes, str | None, Future[str]] | None = None

            def write_sample(
                item: tuple[dict[str, Any], str, bytes, str | None, Future[str]],
            ) -> None:
                row, ext, image, revision, digest = item
                row["image_sha256"] = digest.result()
                sample_json = {k: v for k, v in row.items() if v is not None}
                sample_json["caption_revision"] = revision
                sample_json["sha256"] = row["image_sha256"]
                key = row["key"]
                tar.add(f"{key}.{ext}", image)
                tar.add(f"{key}.txt", row["synthetic_caption"].encode("utf-8"))
                tar.add(
                    f"{key}.json",
                    json.dumps(sample_json, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                )
                rows.append(row)
                if section.embed_images_in_parquet:
                    images_bytes.append(image)

            with ThreadPoolExecutor(max_workers=1) as hasher:
                samples = iter_tar_samples(images, shard)
                for n, (key, files) in enumerate(samples):
                    if ledger is not None and n % 512 == 0:
                        ledger.check_stop()
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
                    try:
                        meta = json.loads(files.get("json", b"{}") or b"{}")
                    except json.JSONDecodeError:
                        meta = {}
                    decision, caption = decisions[key], caption_rows[key]
                    image = files[ext]
                    row = {
                        "key": key,
                        "url": _first(meta, "url"),
                        "image_sha256": None,  # set when the hash is ready
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
                    written.add(key)
                    digest = hasher.submit(_sha256_hex, image)
                    if pending is not None:
                        write_sample(pending)
                    pending = (row, ext, image, caption.get("revision"), digest)
                if pending is not None:
                    write_sample(pending)
            tar.close()
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
        table = pa.Table.from_pylist(rows, schema=DATASET_SCHEMA)
        if section.embed_images_in_parquet:
            column = pa.array(
                [
                    {"bytes": b, "path": f"{r['key']}.{r['image_format']}"}
                    for b, r in zip(images_bytes, rows, strict=True)
                ],
                IMAGE_TYPE,
            )
            table = table.append_column("image", column)
            features = {"image": {"_type": "Image"}}
            table = table.replace_schema_metadata(
                {"huggingface": json.dumps({"info": {"features": _features(table, features)}})}
            )
        with atomic_path(out_parquet) as tmp_parquet:
            pq.write_table(table, tmp_parquet)
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


def _features(table: pa.Table, overrides: dict[str, Any]) -> dict[str, Any]:
    """datasets' feature description of a table: plain values, plus the given overrides."""
    names = {
        pa.string(): "string",
        pa.int32(): "int32",
        pa.float32(): "float32",
        pa.bool_(): "bool",
    }
    out: dict[str, Any] = {}
    for field in table.schema:
        if field.name in overrides:
            out[field.name] = overrides[field.name]
        else:
            out[field.name] = {"dtype": names.get(field.type, "string"), "_type": "Value"}
    return out


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


def run(ctx: StageContext) -> StageSummary:
    """Merge every filtered shard, then write the card, stats, report and manifest."""
    config = ctx.config
    filtered_dir = config.filtered_dir
    shards = list_shards(filtered_dir, STATS_SUFFIX)
    if not shards:
        raise FileNotFoundError(
            f"no finished filter shards in {filtered_dir} (no *_stats.json markers): "
            "run `recaption filter` first"
        )
    if not config.images_dir.is_dir():
        raise FileNotFoundError(f"{config.images_dir} does not exist: the image shards are gone")
    ledger = ShardLedger(
        STAGE,
        config.stage_dir(STAGE),
        config.merge.fingerprint_dict(),
        overwrite=ctx.overwrite,
    )
    ledger.prepare()
    parquet_dir(config).mkdir(parents=True, exist_ok=True)
    ledger.set_input_stamps({shard: shard_inputs(config, shard) for shard in shards})

    def process_one_shard(shard: str) -> dict[str, Any]:
        for stale in parquet_dir(config).glob(f".{shard}.parquet*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        return merge_shard(config, shard, ledger)

    summary = ledger.run(shards, process_one_shard, rank=ctx.rank, world_size=ctx.world_size)
    if summary.interrupted:
        return summary
    not_done = [s for s in shards if not ledger.is_done(s)]
    if not_done:
        summary.messages.append(
            f"dataset card, stats.json, report and MANIFEST.sha256 not written yet: "
            f"{len(not_done)} shard(s) not merged ({', '.join(not_done[:10])}); they are "
            "written when the last shard is done (rerun `recaption merge`)"
        )
        return summary
    finish_dataset(config, shards)
    summary.messages.append(
        f"dataset written: {config.dataset_dir} (README.md, stats.json, report/index.html, "
        "MANIFEST.sha256)"
    )
    return summary


def finish_dataset(config: RunConfig, shards: list[str]) -> dict[str, Any]:
    """stats.json, README.md, report/ and (last) MANIFEST.sha256 of the finished dataset."""
    from recaption.dataset_card import collect_dataset_stats, write_dataset_card
    from recaption.ledger import write_json_atomic
    from recaption.publish import write_manifest
    from recaption.report import write_report

    stats = collect_dataset_stats(config, shards)
    write_json_atomic(config.dataset_dir / "stats.json", stats)
    write_dataset_card(config, stats)
    write_report(config, stats)
    write_manifest(config.dataset_dir)
    return stats
