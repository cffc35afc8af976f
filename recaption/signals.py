"""Stop signals: SIGTERM (preemption, ``scancel``) and SIGUSR1 (SLURM's time-limit warning).

One place owns them: :class:`StopSignals` turns them into a flag while a stage runs (the
stage driver and the training loop check it at safe points and stop cleanly), and
:func:`ignore_stop_signals` is the ``worker_init_fn`` of DataLoader workers, which leave the
signal to their main process (SLURM signals every process of a job step; a worker that died
of it first would turn a clean stop into a crash).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None
)


class StopRequested(Exception):  # noqa: N818 - it is a request, not an error
    """Raised at a safe point after SIGTERM/SIGUSR1 asked the worker to stop."""


class StopSignals:
    """While entered, SIGTERM/SIGUSR1 set :attr:`received` instead of killing the process.

    The previous handlers are restored on exit. Outside the main thread (where Python cannot
    install handlers) it does nothing and the signals keep their handlers.
    """

    def __init__(self, what: str = "recaption") -> None:
        self.what = what
        self.received: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.received is not None

    @property
    def name(self) -> str:
        """The signal's name (``SIGTERM``), or ``""``."""
        return signal.Signals(self.received).name if self.received is not None else ""

    def check(self) -> None:
        """Raise :class:`StopRequested` if a stop signal arrived (call at safe points)."""
        if self.received is not None:
            raise StopRequested(self.name)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        logger.warning(
            "%s: got %s, stopping at the next safe point", self.what, signal.Signals(signum).name
        )
        self.received = signum

    def __enter__(self) -> StopSignals:
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave the handlers alone
            self._previous = {}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` for DataLoader workers: leave SIGTERM/SIGUSR1 to the main process,
    which stops cleanly and then shuts its workers down; decode with one torch thread."""
    try:
        import torch

        torch.set_num_threads(1)  # the worker decodes; the main process owns the cores
    except ImportError:  # pragma: no cover - torch-free callers
        pass
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
