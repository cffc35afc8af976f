"""Claims with a lease: which live worker is working on a shard (or holds a stage's output).

Two workers must never process the same shard or write the same file, whether they are ranks
of one job, a rerun started while the first is still alive, or extra workers started to help a
running stage. Before a worker touches a shard it creates ``_ledger/{shard}.claim`` as a hard
link of a fully written private file (``link`` fails when the claim exists: atomic on local
file systems and on NFS, Lustre and GPFS, and a claim is never seen half written), holding
its host, pid and a random token; a background thread renews the claim's time while the work
goes on. A claim is stale, and may be taken over, when its holder is a dead process on this
host, or when it has not been renewed for ``lease_seconds`` (a worker on a node that died).

Taking over a stale claim replaces it atomically and then re-reads it: when two workers race
for the same stale claim, only the one whose token is in the file goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CLAIM_SUFFIX = ".claim"
# A claim not renewed for this long is taken to belong to a dead worker on another node.
DEFAULT_LEASE_SECONDS = float(os.environ.get("RECAPTION_CLAIM_LEASE_SECONDS", 600))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``host pid 123 (since 12 s)`` for messages."""
    if not holder:
        return "an unknown worker"
    age = time.time() - float(holder.get("time", time.time()))
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} (claimed {age:.0f} s ago)"


class ClaimSet:
    """The claims one worker holds in one folder, renewed by a background thread."""

    def __init__(self, folder: Path, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.folder = Path(folder)
        self.lease_seconds = lease_seconds
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._held: dict[str, str] = {}  # name -> token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{CLAIM_SUFFIX}"

    def holder(self, name: str) -> dict[str, Any] | None:
        """Who holds ``name`` (its claim file's content), or None when nobody does."""
        try:
            return json.loads(self.path(name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def is_stale(self, name: str, holder: dict[str, Any] | None) -> bool:
        """True when the claim's holder is dead (same host) or has not renewed it in time."""
        if holder is None:
            return True
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int) and not _pid_alive(pid):
            return True
        try:
            age = time.time() - self.path(name).stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.lease_seconds

    def acquire(self, name: str) -> bool:
        """Claim ``name``; False when a live worker holds it."""
        token = secrets.token_hex(8)
        record = json.dumps(
            {"host": self.host, "pid": self.pid, "token": token, "time": time.time()}
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(name)
        # Written whole under a private name, then linked into place: link() fails when the
        # claim exists (atomic on NFS too), and a claim is never seen empty.
        tmp = path.with_name(f".{path.name}.{token}")
        tmp.write_text(record)
        try:
            os.link(tmp, path)
        except FileExistsError:
            holder = self.holder(name)
            if holder and holder.get("token") in self._held.values():
                return True  # ours already
            if not self.is_stale(name, holder):
                return False
            logger.warning(
                "taking over the stale claim on %s held by %s", name, describe_holder(holder)
            )
            os.replace(tmp, path)
            time.sleep(0.05)  # a racing taker's replace lands now or never
            if (self.holder(name) or {}).get("token") != token:
                return False
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self._held[name] = token
        self._start_renewing()
        return True

    def release(self, name: str) -> None:
        """Give ``name`` up (only when we still hold it)."""
        with self._lock:
            token = self._held.pop(name, None)
        if token is not None and (self.holder(name) or {}).get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                self.path(name).unlink()

    def release_all(self) -> None:
        for name in list(self._held):
            self.release(name)
        self._stop.set()

    def _start_renewing(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="claim-renewal", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        interval = max(1.0, self.lease_seconds / 4)
        while not self._stop.wait(interval):
            with self._lock:
                held = list(self._held)
            for name in held:
                with contextlib.suppress(OSError):
                    os.utime(self.path(name))
