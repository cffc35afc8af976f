"""The shard ledger: what is done and what failed in one stage's output folder.

Every stage reads shards and writes shards with the same id. For a stage's output folder the
ledger keeps:

- ``_ledger/config.json``: the stage's effective config and its fingerprint. A rerun with a
  different config is refused, naming the keys that differ, unless ``overwrite`` is set.
- ``{shard}_stats.json``: the done marker, written last (after every output of the shard has
  been moved into place). It carries the fingerprint it was made with. A shard without a
  marker, or with a marker of another fingerprint (under ``overwrite``), is redone from scratch.
- ``_ledger/{shard}_failed.json``: the error of a shard that failed; removed when the shard
  succeeds.

Only done markers are ``*.json`` files at the top of the folder: img2dataset's incremental
mode reads every top-level ``*.json`` as a shard marker, so the ledger's own records live in
the ``_ledger/`` subfolder.

Outputs are written under a temporary name in the same folder and ``os.replace``-d into
place, so a reader never sees half a file. Work is assigned as ``shards[rank::world_size]``
over *all* sorted input shards (:func:`assign`), done ones skipped afterwards: slicing only
the pending ones would let ranks that start at different times (a throttled job array)
disagree on who owns what, and shards would be skipped or done twice. The loop that uses the
ledger (signals, claims, failures) is :mod:`recaption.driver`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recaption.config import RunConfig, fingerprint

logger = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
CONFIG_FILE = "config.json"
STATS_SUFFIX = "_stats.json"
FAILED_SUFFIX = "_failed.json"
TMP_TAG = ".tmp-"


class ConfigMismatchError(RuntimeError):
    """Outputs in a folder were made with a different config."""


class ShardError(Exception):
    """A shard that cannot be processed (truncated tar, missing input): recorded, not fatal."""


@dataclass
class StageSummary:
    """What one worker of one stage did."""

    stage: str
    rank: int = 0
    world_size: int = 1
    shards_total: int = 0
    shards_done_before: int = 0
    shards_assigned: int = 0
    shards_ok: list[str] = field(default_factory=list)
    shards_failed: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    samples_ok: int = 0
    samples_failed: int = 0
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.shards_failed and not self.interrupted

    def describe(self) -> str:
        """One human line: counts, then failed shards."""
        text = (
            f"{self.stage} [rank {self.rank}/{self.world_size}]: {len(self.shards_ok)} shard(s) "
            f"done now, {self.shards_done_before} done before, {len(self.shards_failed)} failed "
            f"of {self.shards_total}; samples ok {self.samples_ok}, failed {self.samples_failed}; "
            f"{self.seconds:.1f}s"
        )
        if self.interrupted:
            text += " (stopped early by a signal: rerun to finish)"
        for shard, error in sorted(self.shards_failed.items()):
            text += f"\n  failed shard {shard}: {error.splitlines()[0] if error else ''}"
        return text


def assign(shards: Iterable[str], rank: int, world_size: int) -> list[str]:
    """The shards worker ``rank`` of ``world_size`` owns: ``sorted(shards)[rank::world_size]``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return sorted(shards)[rank::world_size]


def list_shards(folder: Path, suffix: str) -> list[str]:
    """Shard ids of the finished files ``{shard}{suffix}`` in ``folder`` (temporaries skipped)."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name[: -len(suffix)]
        for p in folder.iterdir()
        if p.name.endswith(suffix) and not p.name.startswith(".") and TMP_TAG not in p.name
    )


def marker_digest(folder: Path, shard: str) -> str:
    """A short digest of ``folder/{shard}_stats.json``: the input stamp of a downstream shard."""
    try:
        return hashlib.sha256((folder / f"{shard}{STATS_SUFFIX}").read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def file_signature(path: Path) -> list[int]:
    """(size, mtime_ns) of a file: changes whenever the file is rewritten."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def output_problem(path: Path) -> str | None:
    """Why a finished output file is unusable (missing, unreadable parquet), or None."""
    if not path.is_file():
        return f"{path} is missing"
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowInvalid) as exc:
            return f"{path} is unreadable ({exc})"
    return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it into place only if the block succeeds."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}{TMP_TAG}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in sorted(set(old) | set(new)):
            keys += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


class ShardLedger:
    """Resume bookkeeping for one stage's output folder.

    ``stage_config`` is the JSON-able config that decides the stage's outputs; its
    fingerprint is stored with every done marker. ``input_stamps`` maps each shard to a
    JSON-able stamp of its inputs (a digest of the upstream marker, file sizes and times, a
    duplicate table's hash); it is stored with the marker too, and a shard whose inputs
    changed since it was done counts as not done: stale outputs are never mistaken for
    finished ones.
    """

    def __init__(
        self,
        stage: str,
        output_dir: Path,
        stage_config: dict[str, Any],
        *,
        overwrite: bool = False,
        input_stamps: Mapping[str, Any] | None = None,
    ) -> None:
        self.stage = stage
        self.input_stamps: dict[str, Any] = {}
        self.set_input_stamps(input_stamps or {})
        self.output_dir = Path(output_dir)
        self.stage_config = stage_config
        self.fingerprint = fingerprint(stage_config)
        self.overwrite = overwrite

    # -- config ------------------------------------------------------------------------------
    def prepare(self) -> bool:
        """Create the output folder and check/record the stage config; True when the config
        changed since earlier outputs (only possible with ``overwrite``).

        Raises :class:`ConfigMismatchError` when earlier outputs used another config and
        ``overwrite`` is off, and :class:`PermissionError` with the path when the folder
        cannot be written.
        """
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(
                f"{out} is a file; the {self.stage} stage needs a folder there"
            )
        try:
            self.records_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionError(
                f"cannot create {out}: {exc.strerror}; choose a run_dir you can write to"
            ) from exc
        if not os.access(out, os.W_OK):
            raise PermissionError(
                f"cannot write in {out}: permission denied; fix its permissions "
                "or choose another run_dir"
            )
        recorded = self.check_config()
        if recorded is not None and recorded.get("fingerprint") != self.fingerprint:
            differing = _diff_keys(recorded.get("config", {}), self.stage_config)
            logger.warning(
                "%s: config changed (%s); --overwrite given, shards made with the old config "
                "will be redone",
                self.stage,
                ", ".join(differing),
            )
        changed = recorded is not None and recorded.get("fingerprint") != self.fingerprint
        if recorded is None or changed:
            write_json_atomic(
                self.records_dir / CONFIG_FILE,
                {"stage": self.stage, "fingerprint": self.fingerprint, "config": self.stage_config},
            )
        return changed

    def check_config(self) -> dict[str, Any] | None:
        """The recorded config; raise :class:`ConfigMismatchError` when it differs from this
        one (naming the keys) or cannot be read while outputs exist, unless ``overwrite``."""
        path = self.records_dir / CONFIG_FILE
        recorded = self.recorded_config()
        if recorded is None and path.exists() and list_shards(self.output_dir, STATS_SUFFIX):
            if not self.overwrite:
                raise ConfigMismatchError(
                    f"{path} is unreadable, so it is unknown which config made the "
                    f"{self.stage} outputs in {self.output_dir}; restore the file, or pass "
                    "--overwrite to redo every shard with the current config"
                )
            return {"fingerprint": None, "config": {}}
        if recorded is not None and recorded.get("fingerprint") != self.fingerprint:
            differing = _diff_keys(recorded.get("config", {}), self.stage_config)
            if not self.overwrite:
                raise ConfigMismatchError(
                    f"{self.output_dir} holds {self.stage} outputs made with a different "
                    "config; keys that differ: "
                    f"{', '.join(self._config_key(k) for k in differing) or '?'}. "
                    "Restore the old values to resume, or pass --overwrite to redo the stage "
                    "with the new ones."
                )
        return recorded

    def _config_key(self, key: str) -> str:
        """``key`` as a dotted config path: stage configs nested by section keep theirs."""
        sections = set(RunConfig.model_fields)
        return key if key.split(".")[0] in sections else f"{self.stage}.{key}"

    def recorded_config(self) -> dict[str, Any] | None:
        """The ``_ledger/config.json`` of earlier outputs, or None."""
        path = self.records_dir / CONFIG_FILE
        if not path.exists():
            return None
        try:
            recorded = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return recorded if isinstance(recorded, dict) else None

    # -- markers -----------------------------------------------------------------------------
    def marker_path(self, shard: str) -> Path:
        return self.output_dir / f"{shard}{STATS_SUFFIX}"

    @property
    def records_dir(self) -> Path:
        """The ledger's own records: the stage config and failure records."""
        return self.output_dir / LEDGER_DIR

    def failed_path(self, shard: str) -> Path:
        return self.records_dir / f"{shard}{FAILED_SUFFIX}"

    def output_path(self, shard: str, suffix: str) -> Path:
        """The final path of one of a shard's outputs, e.g. ``output_path("00042", ".parquet")``."""
        return self.output_dir / f"{shard}{suffix}"

    def read_stats(self, shard: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.marker_path(shard).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def set_input_stamps(self, stamps: Mapping[str, Any]) -> None:
        """Set each shard's input stamp (for stamps known only after :meth:`prepare`)."""
        # Through JSON once, so stamps compare equal to what a marker file reads back.
        self.input_stamps = json.loads(json.dumps(dict(stamps), default=str))

    def inputs_changed(self, shard: str, stats: dict[str, Any]) -> bool:
        """True when the shard has an input stamp that differs from the one in ``stats``."""
        return shard in self.input_stamps and stats.get("inputs") != self.input_stamps[shard]

    def is_done(self, shard: str) -> bool:
        """Done: the marker exists, with the current config, over the current inputs."""
        stats = self.read_stats(shard)
        if stats is None or stats.get("fingerprint", self.fingerprint) != self.fingerprint:
            return False
        return not self.inputs_changed(shard, stats)

    def done_shards(self) -> list[str]:
        return [s for s in list_shards(self.output_dir, STATS_SUFFIX) if self.is_done(s)]

    def failed_shards(self) -> dict[str, str]:
        failed = {}
        for shard in list_shards(self.records_dir, FAILED_SUFFIX):
            try:
                failed[shard] = json.loads(self.failed_path(shard).read_text()).get("error", "")
            except (OSError, json.JSONDecodeError):
                failed[shard] = "unreadable failure record"
        return failed

    def mark_done(self, shard: str, stats: dict[str, Any]) -> dict[str, Any]:
        """Write the done marker (last step of a shard) and clear any failure record."""
        stats = {**stats, "shard": shard, "stage": self.stage, "fingerprint": self.fingerprint}
        if shard in self.input_stamps:
            stats["inputs"] = self.input_stamps[shard]
        write_json_atomic(self.marker_path(shard), stats)
        with contextlib.suppress(FileNotFoundError):
            self.failed_path(shard).unlink()
        return stats

    def mark_failed(self, shard: str, error: str) -> None:
        write_json_atomic(
            self.failed_path(shard),
            {"shard": shard, "stage": self.stage, "error": error, "time": time.time()},
        )

    def clear_temporaries(self, shard: str) -> None:
        """Remove temporaries a killed worker left for ``shard``; only the worker holding the
        shard's claim calls this, so a live worker's temporaries are never touched."""
        for p in self.output_dir.glob(f".{shard}*{TMP_TAG}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
