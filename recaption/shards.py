"""Reading img2dataset's webdataset shards: samples streamed in tar order, and the keys
img2dataset recorded as downloaded (to tell a complete tar from one cut between members).

Torch-free, so the CPU stages (merge) read shards without importing it.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)


@dataclass
class RawSample:
    """One sample of a webdataset tar: its key and its members by extension."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    def image_bytes(self) -> bytes | None:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return self.members[ext]
        return None

    def alt_text(self) -> str:
        """The original alt-text: the ``.txt`` member, else the ``caption`` in the ``.json``."""
        if "txt" in self.members:
            return self.members["txt"].decode("utf-8", errors="replace")
        try:
            caption = json.loads(self.members.get("json", b"{}")).get("caption")
        except (ValueError, AttributeError):
            caption = None
        return caption if isinstance(caption, str) else ""


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000123.jpg"`` -> ``("dir/000123", "jpg")``, as webdataset groups members."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar_samples(path: Path) -> Iterator[RawSample]:
    """Stream the samples of a webdataset tar, grouping consecutive members by key.

    Reads the tar front to back without an index, so memory stays flat however big the shard.
    Raises :class:`tarfile.TarError` (or :class:`OSError`) on a truncated or corrupt tar.
    """
    # "r:" (seekable, uncompressed) rather than stream mode "r|": same front-to-back reading,
    # but without _Stream's buffer copies it is several times faster; a member cut short still
    # raises ReadError("unexpected end of data").
    with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        current: RawSample | None = None
        for n, member in enumerate(tar):
            if n % 1000 == 999:
                tar.members = []  # stream mode keeps every header otherwise
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if key.startswith(".") or "/." in key or not ext:
                continue
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            if current is not None and current.key != key:
                yield current
                current = None
            if current is None:
                current = RawSample(key)
            current.members[ext] = data
        if current is not None:
            yield current


def iter_samples_by_key(path: Path) -> Iterator[RawSample]:
    """The samples of a webdataset tar in key order, not tar order.

    img2dataset writes a shard's samples in the order its download threads finish, which
    changes from run to run; reading by key makes everything downstream (the merged dataset,
    the training stream) a function of the samples alone. See :func:`iter_samples_in_order`.
    """
    return iter_samples_in_order(path)


def iter_samples_in_order(
    path: Path, order: Callable[[list[str]], list[str]] | None = None, start: int = 0
) -> Iterator[RawSample]:
    """The samples of a webdataset tar in the order ``order(sorted keys)`` gives, from the
    ``start``-th on.

    Only the member headers are indexed first (data is skipped); then one sample's bytes are
    read at a time, so samples before ``start`` (or left out by ``order``) cost no reads.

    A truncated or corrupt tar yields every sample it holds in full, then raises
    :class:`tarfile.TarError` (or :class:`OSError`).
    """
    # Unbuffered: indexing reads 512 bytes a header and seeks over the data; a buffered file
    # would read 8 KiB at each header, about the whole shard again when samples are small.
    with path.open("rb", buffering=0) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        members: dict[str, list[tarfile.TarInfo]] = {}
        error: Exception | None = None
        last_key = None
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key.startswith(".") or "/." in key or not ext:
                    continue
                members.setdefault(key, []).append(member)
                last_key = key
        except (tarfile.TarError, OSError) as exc:
            error = exc
            members.pop(last_key, None)  # its later members may be missing
        keys = sorted(members)
        for key in (order(keys) if order is not None else keys)[start:]:
            sample = RawSample(key)
            try:
                for member in members[key]:
                    handle = tar.extractfile(member)
                    sample.members[split_member_name(member.name)[1]] = (
                        handle.read() if handle is not None else b""
                    )
            except (tarfile.TarError, OSError) as exc:  # this sample's bytes are cut short
                error = error or exc
                continue
            yield sample
    if error is not None:
        raise error


def expected_keys(images_dir: Path, shard: str) -> set[str] | None:
    """Keys img2dataset's ``{shard}.parquet`` says it wrote to the tar, or None if unknown."""
    path = images_dir / f"{shard}.parquet"
    if not path.exists():
        return None
    try:
        table = pq.read_table(path, columns=["key", "status"])
    except (OSError, pa.ArrowInvalid, KeyError):
        logger.debug("%s: cannot read key/status; skipping the completeness check", path)
        return None
    return {
        str(k)
        for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist(), strict=True)
        if s == "success" and k is not None
    }
