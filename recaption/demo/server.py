"""A real HTTP server on 127.0.0.1 that serves the demo world, faults included.

Paths: ``/files/NAME`` the image; ``/missing/NAME`` a 404; ``/notimage/NAME`` an HTML page
with status 200; ``/truncated/NAME`` the first half of the image bytes; ``/hang/NAME`` answers
only after ``hang_seconds`` (past any sane download timeout); ``/noai/NAME`` the image with an
``X-Robots-Tag: noai`` header, which img2dataset's ``disallowed_header_directives`` refuses.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


class DemoRequestHandler(BaseHTTPRequestHandler):
    """Serves ``files/`` of a demo world with the faults listed in the module docstring."""

    server_version = "recaption-demo/1"

    def __init__(self, *args: object, files: Path, hang_seconds: float, **kwargs: object) -> None:
        self.files = files
        self.hang_seconds = hang_seconds
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("demo server: " + format, *args)

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def do_GET(self) -> None:
        parts = self.path.lstrip("/").split("/", 1)
        kind, name = (parts[0], parts[1]) if len(parts) == 2 else ("", "")
        path = self.files / Path(name).name
        if kind == "missing" or not path.is_file():
            self._send(404, b"not found", "text/plain")
            return
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        data = path.read_bytes()
        if kind == "files":
            self._send(200, data, content_type)
        elif kind == "notimage":
            self._send(200, b"<html><body>This page has moved.</body></html>", "text/html")
        elif kind == "truncated":
            self._send(200, data[: len(data) // 2], content_type)
        elif kind == "hang":
            time.sleep(self.hang_seconds)
            self._send(200, data, content_type)
        elif kind == "noai":
            self._send(200, data, content_type, X_Robots_Tag="noai")
        else:
            self._send(404, b"not found", "text/plain")


@contextlib.contextmanager
def serve_world(files: Path, hang_seconds: float = 60.0) -> Iterator[str]:
    """Serve ``files`` on a free port of 127.0.0.1; yield the base URL; stop on exit."""
    handler = partial(DemoRequestHandler, files=Path(files), hang_seconds=hang_seconds)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a hanging request never blocks shutdown
    thread = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    logger.info("demo image server listening on %s", base)
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
