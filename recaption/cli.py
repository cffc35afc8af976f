"""The ``recaption`` command line.

``recaption STAGE CONFIG [KEY=VALUE ...]`` runs one stage; ``recaption run CONFIG`` runs them in
order; ``recaption status CONFIG`` shows where a run stands. ``KEY=VALUE`` overrides a config
value by its dotted path (``run_dir=/tmp/r``, ``download.processes=4``).

Exit status: 0 when every shard succeeded, 1 when any shard failed or a stage broke after it
started (the traceback is in the log), 2 for a config or input error found at start-up
(nothing was processed), 3 when a stop signal interrupted the stage (rerun to finish).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from recaption import __version__
from recaption.config import ConfigError, RunConfig, load_config

logger = logging.getLogger("recaption")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3

# img2dataset imports albumentations, which otherwise asks the network for updates.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _add_common(p: argparse.ArgumentParser, *, workers: bool = True) -> None:
    p.add_argument("config", help="the run's YAML config, e.g. configs/demo.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config values by dotted path, e.g. run_dir=/tmp/r download.processes=4",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    if workers:
        p.add_argument(
            "--rank",
            type=int,
            default=None,
            help="this worker's index (default: SLURM array, then torchrun, then 0)",
        )
        p.add_argument(
            "--world-size",
            type=int,
            default=None,
            help="number of workers sharing the shards (default: as for --rank)",
        )
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="redo outputs made with a different config instead of refusing",
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``recaption`` and all its subcommands."""
    from recaption.stages import STAGE_HELP, STAGES

    stage_names = list(STAGES)

    parser = argparse.ArgumentParser(
        prog="recaption",
        description="Recaption image datasets with LLaVA and distil KOALA text-to-image models "
        "on the result. Every stage is resumable shard by shard.",
        epilog="Start with: recaption run configs/demo.yaml",
    )
    parser.add_argument("--version", action="version", version=f"recaption {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in stage_names:
        text = STAGE_HELP.get(name, "")
        p = sub.add_parser(name, help=text, description=text)
        _add_common(p)
    p = sub.add_parser(
        "run",
        help="run the stages in order, skipping finished shards",
        description="Run download → caption → filter → merge → (encode) → train → sample "
        "(→ evaluate with evaluate.enabled), stopping at the first stage that fails.",
    )
    _add_common(p)
    p.add_argument("--from", dest="from_stage", choices=stage_names, default=stage_names[0])
    p.add_argument(
        "--to",
        dest="to_stage",
        choices=stage_names,
        default=None,
        help=f"last stage (default: {stage_names[-1]}; evaluate only with evaluate.enabled)",
    )
    p = sub.add_parser(
        "status", help="per stage: shards done / failed / pending, samples ok / failed"
    )
    _add_common(p, workers=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("verify", help="check dataset/MANIFEST.sha256 against the files")
    _add_common(p, workers=False)
    p = sub.add_parser("publish", help="upload dataset/ to the Hugging Face Hub")
    _add_common(p, workers=False)
    p.add_argument("--repo-id", required=True, help="ORG/NAME of the dataset repo")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded")
    p.add_argument(
        "--with-images",
        action="store_true",
        help="also upload dataset/webdataset/*.tar (third-party images); default: metadata only",
    )
    return parser


def ensure_run_dir(config: RunConfig) -> None:
    """Create ``run_dir`` or say why it cannot be used, before any stage starts."""
    try:
        config.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{config.source}: run_dir {str(config.run_dir)!r} cannot be created "
            f"({exc.strerror}); choose a run_dir you can write to"
        ) from None
    if not os.access(config.run_dir, os.W_OK):
        raise ConfigError(
            f"{config.source}: run_dir {str(config.run_dir)!r} is not writable; "
            "choose a run_dir you can write to"
        )


def run_stage(name: str, config: RunConfig, rank: int, world_size: int, overwrite: bool) -> int:
    """Run one stage and turn its summary into an exit status."""
    from recaption.stages import StageContext, run

    summary = run(name, StageContext(config, rank, world_size, overwrite))
    for message in summary.messages:
        logger.info("%s", message)
    (logger.info if summary.ok else logger.error)("%s", summary.describe())
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.ok else EXIT_FAILED


def run_pipeline(config: RunConfig, args: argparse.Namespace, rank: int, world_size: int) -> int:
    """``recaption run``: the stages from ``--from`` to ``--to``, stopping at the first failure."""
    from recaption.stages import STAGES

    names = list(STAGES)
    to_stage = args.to_stage or names[-1]
    first, last = names.index(args.from_stage), names.index(to_stage)
    if first > last:
        raise ConfigError(f"--from {args.from_stage} comes after --to {to_stage}")
    # Evaluate runs when the config asks for it, or when --from/--to name it.
    evaluate = config.evaluate.enabled or "evaluate" in (args.from_stage, args.to_stage)
    for name in names[first : last + 1]:
        if name == "evaluate" and not evaluate:
            logger.info(
                "=== stage evaluate: skipped (evaluate.enabled is false; run it with "
                "`recaption evaluate %s`) ===",
                config.source,
            )
            continue
        logger.info("=== stage %s ===", name)
        code = run_stage(name, config, rank, world_size, args.overwrite)
        if code != EXIT_OK:
            logger.error(
                "stage %s did not finish (exit %d); fix the failures listed above, then resume "
                "with: recaption run %s --from %s",
                name,
                code,
                config.source,
                name,
            )
            return code
    from recaption.status import where_to_look

    for line in where_to_look(config):
        logger.info("%s", line)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recaption`` console script."""
    from recaption.distributed import resolve_rank
    from recaption.logs import setup_logging
    from recaption.stages import STAGES

    args = build_parser().parse_args(argv)
    verbosity = args.verbose - args.quiet
    config: RunConfig | None = None
    try:
        rank, world_size = (0, 1)
        if hasattr(args, "rank"):
            try:
                rank, world_size = resolve_rank(args.rank, args.world_size)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        setup_logging(verbosity, rank if world_size > 1 else None)
        config = load_config(args.config, args.overrides)
        if args.command in (*STAGES, "run"):
            ensure_run_dir(config)
        if args.command in STAGES:
            return run_stage(args.command, config, rank, world_size, args.overwrite)
        if args.command == "run":
            return run_pipeline(config, args, rank, world_size)
        if args.command == "status":
            from recaption.status import collect_status, format_status

            report = collect_status(config)
            sys.stdout.write(
                json.dumps(report, indent=2) + "\n" if args.json else format_status(report) + "\n"
            )
            return EXIT_OK
        if args.command == "verify":
            from recaption.publish import verify_dataset

            problems = verify_dataset(config)
            for line in problems:
                logger.error("%s", line)
            if not problems:
                logger.info("%s: every file matches MANIFEST.sha256", config.dataset_dir)
            return EXIT_FAILED if problems else EXIT_OK
        if args.command == "publish":
            from recaption.publish import publish_dataset

            publish_dataset(
                config,
                args.repo_id,
                private=args.private,
                dry_run=args.dry_run,
                include_images=args.with_images,
            )
            return EXIT_OK
    except Exception as exc:
        from recaption.driver import disk_full, disk_full_message, is_startup_error

        full = disk_full(exc)
        if full is not None:
            where = config.run_dir if config is not None else Path(args.config).parent
            logger.error("%s: %s", args.command, disk_full_message(full, where))
            return EXIT_FAILED
        if is_startup_error(exc):  # the config, or a stage's start-up checks
            logger.error("%s", exc)
            return EXIT_USAGE
        # It broke after it started: not a config error, so not exit 2.
        logger.exception("%s failed: %s", args.command, exc)
        return EXIT_FAILED
    raise AssertionError(f"unhandled command {args.command}")
