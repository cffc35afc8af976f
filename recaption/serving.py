"""OpenAI-compatible serving engines: endpoint URLs, server commands, and a server the caption
stage starts and stops itself.

vLLM (``vllm serve``), SGLang (``python -m sglang.launch_server``) and transformers
(``transformers serve``) all answer the same chat-completions API under a base URL such as
``http://127.0.0.1:8000/v1``. The caption stage's ``openai`` backend is a client of that API
(:mod:`recaption.chat_captions`); this module holds what it needs around the client:

- :func:`endpoint_problem` and :func:`command_problem` check ``caption.endpoint`` and
  ``caption.server.command`` when the config is loaded, so a bad value stops the run before
  anything is touched;
- :class:`ManagedServer` runs ``caption.server.command`` with ``{port}`` (and ``{host}``,
  ``{model}``, ``{gpus}``) filled in, writes its output to a log file, waits until its
  ``/v1/models`` answers, and stops it (SIGTERM to its process group, then SIGKILL). The
  server is started through a small wrapper that asks Linux to send it SIGTERM when the stage's
  process dies (``PR_SET_PDEATHSIG``), so even a stage killed with SIGKILL leaves no server
  behind to hold the GPUs or the port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

ENDPOINT_EXAMPLE = "http://127.0.0.1:8000/v1"
# Placeholders a server command may use; {port} is required.
COMMAND_PLACEHOLDERS: tuple[str, ...] = ("port", "host", "model", "gpus")
# How often the start-up wait polls the server, and says it is still waiting.
POLL_SECONDS = 0.5
PROGRESS_SECONDS = 30.0
LOG_TAIL_LINES = 20
# The HTTP clients under the openai package log every request at INFO: a line per image.
QUIET_LOGGERS: tuple[str, ...] = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")

# Run in the server's process before it becomes the server (exec): ask the kernel to send it
# SIGTERM when its parent (the caption stage) dies, then check the parent did not die first.
_EXEC_WITH_PARENT_DEATH = """\
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: the stage's own teardown stops the server
if os.getppid() != parent:
    sys.exit(f"the caption stage (pid {parent}) is gone; not starting the server")
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.exit(f"cannot run {sys.argv[2]!r}: {exc}")
"""


class ServerStartError(RuntimeError):
    """The server command did not bring up a server that answers; the message says why."""


def quiet_http_logs() -> None:
    """Keep the openai client's HTTP libraries at WARNING unless a level was set for them."""
    for name in QUIET_LOGGERS:
        quiet = logging.getLogger(name)
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)


# -- config checks -------------------------------------------------------------------------------
CREDENTIALS_PROBLEM = (
    "carries credentials (user:password@): they would be written into logs and the run's "
    "records; put the API key in an environment variable and name it in caption.api_key_env"
)


KEY_IN_COMMAND_PROBLEM = (
    "passes --api-key: the key would be written into the run's records and logs; vLLM reads "
    "its key from $VLLM_API_KEY, which the server inherits from the stage, and "
    "caption.api_key_env names the variable the stage sends"
)


def passes_api_key(command: str) -> bool:
    """True when ``command`` has an ``--api-key`` argument (a key written into the config)."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return "--api-key" in command
    return any(arg == "--api-key" or arg.startswith("--api-key=") for arg in argv)


def has_credentials(url: str) -> bool:
    """True when ``url`` has a ``user:password@`` part."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "@" in url
    return parts.username is not None or parts.password is not None


def endpoint_problem(url: str) -> str | None:
    """Why ``url`` cannot be an OpenAI-compatible base URL, or None when it can."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        return f"is not a URL ({exc}); write it like {ENDPOINT_EXAMPLE}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"is not an http(s) URL with a host; write it like {ENDPOINT_EXAMPLE}"
    if parts.username is not None or parts.password is not None:
        return CREDENTIALS_PROBLEM
    if parts.query or parts.fragment:
        return f"has a query or fragment; give the API's base URL, like {ENDPOINT_EXAMPLE}"
    if parts.path.strip("/") == "":
        return (
            "has no path; OpenAI-compatible servers (vLLM, SGLang, transformers serve) "
            f"answer under /v1: {parts.scheme}://{parts.netloc}/v1"
        )
    if port == 0:
        return "has port 0; give the port the server listens on"
    return None


def command_problem(command: str) -> str | None:
    """Why ``command`` cannot be a server command, or None when it can."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return f"cannot be split into arguments ({exc}); check its quotes"
    if not argv:
        return "is empty"
    names = set()
    for arg in argv:
        try:
            names |= {name for _, name, _, _ in string.Formatter().parse(arg) if name is not None}
        except ValueError as exc:
            return f"has a bad placeholder in {arg!r} ({exc}); write {{{{ and }}}} for braces"
    unknown = sorted(n for n in names if n not in COMMAND_PLACEHOLDERS)
    if unknown:
        known = ", ".join(f"{{{p}}}" for p in COMMAND_PLACEHOLDERS)
        found = ", ".join(f"{{{n}}}" for n in unknown)
        return f"uses unknown placeholder(s) {found}; known: {known}"
    if "port" not in names:
        return (
            "has no {port}: the stage picks a free port and must tell the server to listen on "
            "it, e.g. 'vllm serve llava-hf/llava-1.5-7b-hf --port {port}'"
        )
    return None


def render_command(command: str, **values: Any) -> list[str]:
    """``command`` split into arguments, placeholders filled in from ``values``."""
    return [arg.format(**values) for arg in shlex.split(command)]


def executable_problem(command: str) -> str | None:
    """Why the command's program cannot be run here (not on PATH), or None."""
    program = shlex.split(command)[0]
    if shutil.which(program) is None:
        hint = ""
        if program == "transformers":
            hint = ": install the serving extra with pip install -e '.[serve]'"
        elif program == "vllm":
            hint = ": install vLLM in this environment (pip install vllm) on the GPU nodes"
        return f"its program {program!r} is not on PATH{hint}"
    return None


def visible_gpus() -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else what torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0


# -- ports ---------------------------------------------------------------------------------------
def free_port(host: str) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (empty if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -- the managed server --------------------------------------------------------------------------
class ManagedServer:
    """A server process started from a command, ready when its ``/v1/models`` answers.

    Use :meth:`start`, then :meth:`stop` in a ``finally``: :meth:`stop` is idempotent and
    also stops a server whose start-up failed. ``state_path`` holds the running server's pid,
    port and command (for ``recaption status`` readers and for tests), removed on stop.
    """

    def __init__(
        self,
        command: str,
        *,
        host: str,
        port: int | None,
        model: str,
        log_path: Path,
        state_path: Path,
        startup_timeout: float,
        stop_timeout: float,
        api_key: str | None = None,
    ) -> None:
        self.command = command
        self.host = host
        self.fixed_port = port
        self.port = 0
        self.model = model
        self.log_path = log_path
        self.state_path = state_path
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.api_key = api_key
        self.process: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The server's OpenAI-compatible base URL."""
        return f"http://{url_host(self.host)}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group id), or None before start."""
        return self.process.pid if self.process is not None else None

    # -- start --------------------------------------------------------------------------------
    def start(self) -> str:
        """Start the server and wait until it answers; return its endpoint.

        Raises :class:`ServerStartError` (the server stopped again) when the command exits,
        or does not answer within ``startup_timeout`` seconds.
        """
        tries = 1 if self.fixed_port else 3
        for attempt in range(1, tries + 1):
            self.port = self.fixed_port or free_port(self.host)
            self._spawn()
            try:
                self._wait_until_ready()
                return self.endpoint
            except ServerStartError:
                raced = self.fixed_port is None and attempt < tries and self._lost_port_race()
                self.stop()
                if not raced:
                    raise
                logger.warning("caption: port %d was taken meanwhile; trying another", self.port)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self) -> None:
        values = {"port": self.port, "host": self.host, "model": self.model}
        if "{gpus}" in self.command:
            values["gpus"] = visible_gpus()
        self.argv = render_command(self.command, **values)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"\n=== {stamp} recaption starts: {shlex.join(self.argv)}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_PARENT_DEATH, str(os.getpid()), *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        state = {
            "pid": self.process.pid,
            "host": self.host,
            "port": self.port,
            "endpoint": self.endpoint,
            "command": self.argv,
            "log": str(self.log_path),
            "parent_pid": os.getpid(),
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(state, indent=2) + "\n")
        logger.info(
            "caption: started the server (pid %d) for %s: %s; its output goes to %s",
            self.process.pid,
            self.endpoint,
            shlex.join(self.argv),
            self.log_path,
        )

    def _lost_port_race(self) -> bool:
        return (
            self.process is not None
            and self.process.poll() is not None
            and (port_open(self.host, self.port))
        )

    def _answers(self) -> bool:
        from openai import OpenAI, OpenAIError

        quiet_http_logs()
        client = OpenAI(
            base_url=self.endpoint, api_key=self.api_key or "none", max_retries=0, timeout=5.0
        )
        try:
            return bool(list(client.models.list()))
        except OpenAIError:
            return False
        finally:
            client.close()

    def _wait_until_ready(self) -> None:
        start = time.monotonic()
        said = start
        while True:
            problem = self.problem()
            if problem is not None:
                raise ServerStartError(
                    f"caption.server.command {shlex.join(self.argv)!r} {problem} before it "
                    f"answered on {self.endpoint}"
                )
            if self._answers():
                logger.info(
                    "caption: the server answers on %s (after %.0fs)",
                    self.endpoint,
                    time.monotonic() - start,
                )
                return
            now = time.monotonic()
            if now - start > self.startup_timeout:
                tail = log_tail(self.log_path)
                raise ServerStartError(
                    f"caption.server.command {shlex.join(self.argv)!r} did not answer on "
                    f"{self.endpoint}/models within caption.server.startup_timeout="
                    f"{self.startup_timeout:g}s; it was stopped. Raise the timeout if the model "
                    f"loads slowly. Last lines of {self.log_path}:\n{tail}"
                )
            if now - said >= PROGRESS_SECONDS:
                logger.info(
                    "caption: still waiting for the server on %s (%.0fs; log: %s)",
                    self.endpoint,
                    now - start,
                    self.log_path,
                )
                said = now
            time.sleep(POLL_SECONDS)

    # -- while it runs ------------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why the server process is gone (its exit status and last log lines), or None."""
        if self.process is None:
            return "was never started"
        code = self.process.poll()
        if code is None:
            return None
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
        return (
            f"{how} (pid {self.process.pid}); last lines of {self.log_path}:\n"
            f"{log_tail(self.log_path)}"
        )

    # -- stop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the server and everything it started: SIGTERM, then SIGKILL after
        ``stop_timeout`` seconds. Safe to call more than once."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                self._signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "caption: the server (pid %d) did not stop within %gs of SIGTERM; "
                        "killing it",
                        process.pid,
                        self.stop_timeout,
                    )
                    self._signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            # Children that outlived their leader (engine workers) go too.
            self._signal_group(process.pid, signal.SIGKILL)
            code = process.returncode
            logger.info(
                "caption: stopped the server (pid %d, %s)",
                process.pid,
                f"ended by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}",
            )
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        with contextlib.suppress(OSError):
            self.state_path.unlink(missing_ok=True)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
