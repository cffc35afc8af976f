"""The stage driver: one loop that runs any stage, shard by shard, resumably.

A stage says *what* to do (:class:`ShardedStage` or :class:`SingleOutputStage`); the driver
owns *how it runs*: start-up validation, the output folder's config fingerprint, input stamps,
stale outputs, rank assignment, shard claims, stop signals, failure records and the summary
(datatrove's executor/step split). No stage touches a done marker.

A sharded stage's life, for one worker:

1. ``check()``: validate everything that can be validated (config, inputs, model paths);
   nothing is written. An error here is a :class:`StartupError` (exit status 2).
2. The output folder is prepared: the stage config's fingerprint is compared with the one
   recorded by earlier runs (a change is refused without ``--overwrite``; with it, ``reset()``
   runs and shards of the old config are redone).
3. ``input_shards()``: the shards of the run (the upstream stage's finished shards). Outputs
   of shards that no longer exist upstream are removed, so the folder holds exactly the
   current shards.
4. ``plan()``: run-wide precomputation every worker needs (the filter's duplicate table).
   Then each shard's ``input_stamp()``: a shard done over other inputs counts as not done.
5. This worker's shards are ``sorted(shards)[rank::world_size]``, done ones skipped. Only if
   one is pending does ``setup()`` load models.
6. Each pending shard is claimed (:mod:`recaption.claims`; a shard a live worker holds is left
   to it), processed by ``process()`` into temporaries moved into place, then marked done.
   An exception fails that shard only; a stop signal abandons it.
7. When every shard of the run is done, ``finish()`` writes the run-wide outputs (the last
   worker to finish does it).

A single-output stage (train, sample) has one output instead of shards; the driver gives it
the same start-up validation, fingerprint, input stamp, claim, signals and summary.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from recaption.claims import ClaimSet, describe_holder
from recaption.config import ConfigError, RunConfig
from recaption.ledger import (
    STATS_SUFFIX,
    ConfigMismatchError,
    ShardError,
    ShardLedger,
    StageSummary,
    assign,
    list_shards,
    marker_digest,
    output_problem,
)
from recaption.signals import StopRequested, StopSignals

logger = logging.getLogger(__name__)

# Errors that mean "the config or the inputs are wrong": at start-up they exit with status 2.
STARTUP_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ConfigMismatchError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
)


class StartupError(ConfigError):
    """A stage refused to start (its output is held by another process); nothing was done."""


@dataclass
class StageContext:
    """Which run and which worker: the config, rank, world size and ``--overwrite``."""

    config: RunConfig
    rank: int = 0
    world_size: int = 1
    overwrite: bool = False


@contextlib.contextmanager
def startup(stage: str, *, validation: bool = False) -> Iterator[None]:
    """Mark a config or input error raised inside the block as a start-up refusal.

    The exception keeps its type (callers may catch ``FileNotFoundError``); it gets
    ``at_startup = True``, which the command line turns into exit status 2. In a
    ``validation`` block (a stage's ``check`` and the ledger's config check) every error is
    a refusal; elsewhere (loading models) only the types in :data:`STARTUP_ERRORS`.
    """
    try:
        yield
    except Exception as exc:
        if validation or isinstance(exc, STARTUP_ERRORS):
            exc.at_startup = True  # type: ignore[attr-defined]
        raise


def disk_full(exc: BaseException) -> OSError | None:
    """The "no space left" (or quota) error in ``exc``'s chain, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full_message(error: OSError, where: Path) -> str:
    """What to say when the disk filled up: the path, and what to do."""
    path = error.filename or where
    return (
        f"disk full: no space left on the device while writing {path}; free space there (or "
        "move run_dir to a larger disk) and rerun: finished shards are kept and nothing "
        "half-written was marked done"
    )


def is_startup_error(exc: BaseException) -> bool:
    """True for a refusal at start-up (nothing was processed): exit status 2."""
    return isinstance(exc, ConfigError) or bool(getattr(exc, "at_startup", False))


class Stage:
    """What every stage declares. See :class:`ShardedStage` and :class:`SingleOutputStage`."""

    name: ClassVar[str]
    help: ClassVar[str] = ""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.stop = StopSignals(self.name)

    # -- declarations ---------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        """The folder of the stage's outputs and done markers."""
        return self.config.stage_dir(self.name)

    def stage_config(self) -> dict[str, Any]:
        """The JSON-able config that decides the outputs (its fingerprint guards resume)."""
        section = getattr(self.config, self.name, None)
        return section.fingerprint_dict() if section is not None else {}

    # -- life cycle -----------------------------------------------------------------------
    def check(self) -> None:
        """Validate config and inputs before anything is written (raise to refuse)."""

    def reset(self) -> None:
        """Remove outputs of an old config (``--overwrite`` after a config change)."""

    def check_stop(self) -> None:
        """Raise :class:`StopRequested` if SIGTERM/SIGUSR1 arrived (call between batches)."""
        self.stop.check()


class ShardedStage(Stage):
    """A stage that turns each input shard into outputs with the same shard id.

    Declare ``input_stage`` (whose finished shards are this stage's shards) and
    ``output_suffixes`` (the files a shard writes in :attr:`output_dir`), and implement
    :meth:`process`. Optional: :meth:`check`, :meth:`plan`, :meth:`input_stamp`,
    :meth:`setup`, :meth:`finish`, :meth:`verify_output`, :meth:`extra_outputs`.
    """

    input_stage: ClassVar[str | None] = None
    output_suffixes: ClassVar[tuple[str, ...]] = ()
    # Stages whose work is scaled out by their own engine run on rank 0 only.
    main_rank_only: ClassVar[bool] = False
    # Stages that process every pending shard in one call to an external engine
    # (img2dataset) set this and implement process_all instead of process.
    batch_engine: ClassVar[bool] = False

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.ledger: ShardLedger | None = None
        self.shards: list[str] = []

    @property
    def input_dir(self) -> Path:
        """The upstream stage's folder."""
        if self.input_stage is None:
            raise NotImplementedError(f"{self.name} declares no input_stage")
        return self.config.stage_dir(self.input_stage)

    def input_shards(self) -> list[str]:
        """The run's shards: the upstream stage's finished ones (its done markers)."""
        folder = self.input_dir
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist: nothing to {self.name}; run `recaption "
                f"{self.input_stage} CONFIG` first (or point run_dir at a run that has it)"
            )
        shards = list_shards(folder, STATS_SUFFIX)
        if not shards:
            raise FileNotFoundError(
                f"no finished {self.input_stage} shards in {folder} (no *{STATS_SUFFIX} "
                f"markers): run `recaption {self.input_stage} CONFIG` first"
            )
        return shards

    def my_shards(self) -> list[str]:
        """The shards this worker owns (the same split for every rank, whatever is done)."""
        return assign(self.shards, self.ctx.rank, self.ctx.world_size)

    def skip_reason(self) -> str | None:
        """Why the stage has nothing to do in this run (an optional stage switched off)."""
        return None

    def plan(self) -> None:
        """Run-wide precomputation every worker needs before deciding what is done."""

    def input_stamp(self, shard: str) -> Any:
        """A JSON-able stamp of a shard's inputs; by default the upstream marker's digest."""
        return marker_digest(self.input_dir, shard)

    def setup(self) -> None:
        """Load models once; called only when this worker has pending shards."""

    def process(self, shard: str) -> dict[str, Any]:
        """Write one shard's outputs (through :func:`recaption.ledger.atomic_path`); return
        its stats (``n_ok`` / ``n_failed`` count samples)."""
        raise NotImplementedError

    def process_all(self, shards: list[str]) -> None:
        """``batch_engine`` stages: process every pending shard in one call."""
        raise NotImplementedError

    def verify_output(self, shard: str) -> str | None:
        """Why a done shard's output is unusable (missing, unreadable), or None when fine."""
        for suffix in self.output_suffixes:
            problem = output_problem(self.output_dir / f"{shard}{suffix}")
            if problem is not None:
                return problem
        return None

    def extra_outputs(self, shard: str) -> list[Path]:
        """Outputs of a shard outside :attr:`output_dir` (removed with the shard when stale)."""
        return []

    def finish(self, summary: StageSummary) -> None:
        """Write run-wide outputs; called once every shard of the run is done."""

    def close(self, summary: StageSummary) -> None:
        """Report on this worker's run (every run that was not interrupted)."""

    def teardown(self) -> None:
        """Release what :meth:`setup` acquired (a server it started, ...); called on every
        exit after start-up: done, failed, stopped by a signal, or broken by an exception."""


class SingleOutputStage(Stage):
    """A stage with one output (a trained pipeline, a set of samples) instead of shards.

    ``output_name`` names it; its done marker is ``{output_dir}/{output_name}_stats.json``.
    Implement :meth:`run_once`; declare :meth:`input_stamp` so a changed input is seen.
    ``main_rank_only`` stages run on rank 0 (the others return at once); the others run on
    every rank (train: accelerate's processes) and only rank 0 writes the ledger.
    """

    output_name: ClassVar[str]
    main_rank_only: ClassVar[bool] = True

    def input_stamp(self) -> Any:
        """A JSON-able stamp of the inputs (None: no stamp)."""
        return None

    def run_once(self, summary: StageSummary) -> dict[str, Any]:
        """Produce the output; return its stats (recorded in the done marker). Set
        ``summary.interrupted`` (and return) when a stop signal cut it short."""
        raise NotImplementedError


# -- the driver ---------------------------------------------------------------------------------
def _prepare_ledger(stage: Stage, ledger: ShardLedger) -> None:
    """Check the recorded config; with ``--overwrite`` after a change, reset the outputs."""
    recorded = ledger.check_config()  # refuses a changed config without --overwrite
    if recorded is not None and recorded.get("fingerprint") != ledger.fingerprint:
        stage.reset()
    ledger.prepare()


def run_stage(stage: Stage) -> StageSummary:
    """Run ``stage`` for this worker and return what it did."""
    if isinstance(stage, ShardedStage):
        return _run_sharded(stage)
    if isinstance(stage, SingleOutputStage):
        return _run_single(stage)
    raise TypeError(f"{type(stage).__name__} is neither a ShardedStage nor a SingleOutputStage")


def _remove_stale(stage: ShardedStage, ledger: ShardLedger) -> list[str]:
    """Remove outputs of shards that no longer exist upstream; return their ids."""
    current = set(stage.shards)
    stale = [s for s in list_shards(stage.output_dir, STATS_SUFFIX) if s not in current]
    for shard in stale:
        for path in [
            *(stage.output_dir / f"{shard}{suffix}" for suffix in stage.output_suffixes),
            *stage.extra_outputs(shard),
            ledger.failed_path(shard),
            ledger.marker_path(shard),  # last: a kill midway leaves it stale, found again
        ]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    if stale:
        logger.warning(
            "%s: removed the outputs of %d shard(s) that no longer exist upstream in %s: %s",
            stage.name,
            len(stale),
            stage.input_dir,
            ", ".join(stale[:20]),
        )
    return stale


def _run_sharded(stage: ShardedStage) -> StageSummary:
    ctx = stage.ctx
    start = time.perf_counter()
    if stage.main_rank_only and ctx.rank != 0:
        summary = StageSummary(stage.name, ctx.rank, ctx.world_size)
        summary.messages.append(f"{stage.name} runs on rank 0 only (this is rank {ctx.rank})")
        return summary
    reason = stage.skip_reason()
    if reason is not None:
        summary = StageSummary(stage.name, ctx.rank, ctx.world_size)
        summary.messages.append(f"{stage.name}: {reason}")
        return summary
    with startup(stage.name, validation=True):
        stage.check()
        shards = sorted(set(stage.input_shards()))
        stage.shards = shards
        ledger = ShardLedger(
            stage.name, stage.output_dir, stage.stage_config(), overwrite=ctx.overwrite
        )
        stage.ledger = ledger
        _prepare_ledger(stage, ledger)
    claims = ClaimSet(ledger.records_dir)
    try:
        if stage.input_stage is not None:
            _remove_stale(stage, ledger)
        stage.plan()
        ledger.set_input_stamps({s: stage.input_stamp(s) for s in shards})
        done_before = set(_done_and_sound(stage, ledger, shards))
        mine = [s for s in stage.my_shards() if s not in done_before]
        summary = StageSummary(
            stage.name,
            ctx.rank,
            ctx.world_size,
            shards_total=len(shards),
            shards_done_before=len(done_before),
            shards_assigned=len(mine),
        )
        logger.info(
            "%s: %d shard(s), %d done before, %d pending for rank %d/%d",
            stage.name,
            len(shards),
            len(done_before),
            len(mine),
            ctx.rank,
            ctx.world_size,
        )
        if mine:
            with startup(stage.name):
                stage.setup()
            with stage.stop:
                if stage.batch_engine:
                    _process_batch(stage, ledger, mine, summary)
                else:
                    for shard in mine:
                        if stage.stop.requested:
                            summary.interrupted = True
                        if summary.interrupted:
                            break
                        if not _process_one(stage, ledger, claims, shard, summary):
                            break  # the disk is full: every next shard would fail too
        else:
            summary.messages.append(f"{stage.name}: nothing pending for rank {ctx.rank}")
        if not summary.interrupted:
            not_done = [s for s in shards if not ledger.is_done(s)]
            if not_done:
                summary.messages.append(
                    f"{stage.name}: run-wide outputs not written yet: {len(not_done)} shard(s) "
                    f"of the run not done ({', '.join(not_done[:10])}); they are written when "
                    f"the last one is (rerun `recaption {stage.name}`)"
                )
            else:
                stage.finish(summary)
            stage.close(summary)
    finally:
        try:
            stage.teardown()
        finally:
            claims.release_all()
    summary.seconds = time.perf_counter() - start
    return summary


def _done_and_sound(stage: ShardedStage, ledger: ShardLedger, shards: list[str]) -> list[str]:
    """Done shards whose outputs are still usable; a broken one is redone (and said so)."""
    done = []
    for shard in shards:
        stats = ledger.read_stats(shard)
        if stats is not None and ledger.inputs_changed(shard, stats):
            logger.warning(
                "%s: shard %s: its inputs changed since it was done; redoing it",
                stage.name,
                shard,
            )
        if not ledger.is_done(shard):
            continue
        problem = stage.verify_output(shard)
        if problem is not None:
            logger.warning(
                "%s: shard %s is marked done but %s; redoing it", stage.name, shard, problem
            )
            ledger.marker_path(shard).unlink(missing_ok=True)
            continue
        done.append(shard)
    return done


def _process_one(
    stage: ShardedStage,
    ledger: ShardLedger,
    claims: ClaimSet,
    shard: str,
    summary: StageSummary,
) -> bool:
    """Process one shard; False when the run cannot go on (the disk is full)."""
    if not claims.acquire(shard):
        holder = describe_holder(claims.holder(shard))
        logger.info("%s: shard %s is being processed by %s; leaving it", stage.name, shard, holder)
        summary.messages.append(f"{stage.name}: shard {shard} left to {holder}")
        return True
    try:
        if ledger.is_done(shard):  # finished by another worker since we listed it
            return True
        ledger.clear_temporaries(shard)  # only the claim holder may
        t0 = time.perf_counter()
        try:
            stats = stage.process(shard)
        except StopRequested:
            ledger.clear_temporaries(shard)
            summary.interrupted = True
            logger.warning("%s: shard %s abandoned (not marked done)", stage.name, shard)
            return True
        except Exception as exc:  # one bad shard never kills the run
            ledger.clear_temporaries(shard)
            if stage.stop.requested:
                # The stop signal also reaches worker processes (a hard scancel signals the
                # whole job); what breaks after it is the stop, not the shard.
                summary.interrupted = True
                logger.warning(
                    "%s: shard %s abandoned after a stop signal (%s)", stage.name, shard, exc
                )
                return True
            full = disk_full(exc)
            error = (
                disk_full_message(full, stage.output_dir)
                if full is not None
                else f"{type(exc).__name__}: {exc}"
            )
            logger.error("%s: shard %s failed: %s", stage.name, shard, error)
            if full is None and not isinstance(exc, ShardError):
                logger.error("%s", traceback.format_exc())
            try:
                ledger.mark_failed(shard, error)
            except OSError as record_error:  # a full disk takes the record too
                logger.error("%s: cannot record the failure: %s", stage.name, record_error)
            summary.shards_failed[shard] = error
            return full is None
        stats.setdefault("seconds", round(time.perf_counter() - t0, 3))
        ledger.mark_done(shard, stats)
        summary.shards_ok.append(shard)
        summary.samples_ok += int(stats.get("n_ok", 0))
        summary.samples_failed += int(stats.get("n_failed", 0))
        return True
    finally:
        claims.release(shard)


def _process_batch(
    stage: ShardedStage, ledger: ShardLedger, pending: list[str], summary: StageSummary
) -> None:
    """One call to the stage's engine for every pending shard; the markers it wrote decide."""
    stage.process_all(pending)
    for shard in pending:
        if ledger.is_done(shard):
            summary.shards_ok.append(shard)
            ledger.failed_path(shard).unlink(missing_ok=True)
        elif stage.stop.requested:
            summary.interrupted = True
        else:
            error = f"no done marker {ledger.marker_path(shard).name} after the run (see the log)"
            ledger.mark_failed(shard, error)
            summary.shards_failed[shard] = error


def _run_single(stage: SingleOutputStage) -> StageSummary:
    ctx = stage.ctx
    start = time.perf_counter()
    summary = StageSummary(stage.name, ctx.rank, ctx.world_size, shards_total=1)
    if stage.main_rank_only and ctx.rank != 0:
        summary.messages.append(f"{stage.name} runs on rank 0 only (this is rank {ctx.rank})")
        return summary
    unit = stage.output_name
    with startup(stage.name, validation=True):
        stage.check()
        ledger = ShardLedger(
            stage.name, stage.output_dir, stage.stage_config(), overwrite=ctx.overwrite
        )
        stamp = stage.input_stamp()
        if stamp is not None:
            ledger.set_input_stamps({unit: stamp})
        if ctx.rank == 0:
            _prepare_ledger(stage, ledger)
        else:
            ledger.check_config()
    claims = ClaimSet(ledger.records_dir)
    if ctx.rank == 0 and not claims.acquire(stage.name):
        raise StartupError(
            f"{stage.output_dir} is being written by another {stage.name} process "
            f"({describe_holder(claims.holder(stage.name))}); wait for it to finish or stop it"
        )
    try:
        if ledger.is_done(unit):
            summary.shards_done_before = 1
            summary.messages.append(f"{stage.name}: already done ({ledger.marker_path(unit)})")
            return summary
        with stage.stop:
            stats = stage.run_once(summary)
        if summary.interrupted:
            return summary
        if ctx.rank == 0:
            ledger.mark_done(unit, stats)
        summary.samples_ok = summary.samples_ok or int(stats.get("n_ok", 0))
        summary.samples_failed = summary.samples_failed or int(stats.get("n_failed", 0))
        if not summary.shards_ok:  # a stage may report the shards it read instead
            summary.shards_ok.append(unit)
    finally:
        claims.release_all()
        summary.seconds = time.perf_counter() - start
    return summary
