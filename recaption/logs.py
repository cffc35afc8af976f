"""Logging set-up for the command line: one format, the worker's rank in every line."""

from __future__ import annotations

import logging
import os


def setup_logging(verbosity: int = 0, rank: int | None = None) -> None:
    """Configure the root logger: INFO by default, DEBUG with ``-v``, WARNING with ``-q``."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    tag = f"[rank {rank}] " if rank is not None else ""
    root = logging.getLogger()
    # Replace only the handler set up here before, never handlers others installed.
    for handler in [h for h in root.handlers if getattr(h, "_recaption", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._recaption = True  # type: ignore[attr-defined]
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    )
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries that are chatty at INFO.
    for name in ("httpx", "urllib3", "PIL", "matplotlib", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
