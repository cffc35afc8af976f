"""A small OpenAI-compatible chat-completions server on 127.0.0.1 that injects faults.

The caption stage's fault tests run against it: it answers like vLLM or ``transformers serve``
(``/v1/models``, ``/v1/chat/completions`` with ``usage`` and ``finish_reason``), and for the
requests whose instruction contains a marker it misbehaves on purpose:

- ``error500``: answers 500 every time; ``flaky500``: 500 on the first attempt only;
- ``stall``: answers after ``--stall`` seconds (past the client's timeout);
- ``toolong``: answers 400 (a sample-specific refusal, as vLLM does for a prompt too long);
- ``ratelimit``: answers 429 with ``Retry-After: 0`` on the first attempt.

``--fail-all STATUS`` answers every chat request with STATUS; ``--api-key`` requires
``Authorization: Bearer KEY``. ``GET /_stats`` reports what it saw (attempts per marker,
the most requests in flight at once, image sizes, the authorization headers' digests).

Captions are a digest of the image and the instruction, so a rerun gives the same rows.
Run it alone with ``python fake_openai_server.py --port 8000``; the tests also start it in a
thread with :func:`start`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

MODEL_ID = "fake/llava-1.5-test"
MARKERS = ("error500", "flaky500", "stall", "toolong", "ratelimit")


class FakeState:
    """What the server was told to do and what it saw."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        stall: float = 30.0,
        fail_all: int | None = None,
        api_key: str | None = None,
        model: str = MODEL_ID,
    ) -> None:
        self.delay = delay
        self.stall = stall
        self.fail_all = fail_all
        self.api_key = api_key
        self.model = model
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.attempts: dict[str, int] = {}
        self.image_sizes: list[list[int]] = []
        self.instructions: list[str] = []
        self.auth_digests: set[str] = set()
        self.bodies: list[dict[str, Any]] = []

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "max_in_flight": self.max_in_flight,
                "attempts": dict(self.attempts),
                "image_sizes": list(self.image_sizes),
                "instructions": list(self.instructions),
                "auth_digests": sorted(self.auth_digests),
                "fields": sorted({k for b in self.bodies for k in b if k != "messages"}),
                "bodies": [{k: v for k, v in b.items() if k != "messages"} for b in self.bodies],
            }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Handler(BaseHTTPRequestHandler):
    """One request; the server's :class:`FakeState` is ``self.server.state``."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read /_stats instead."""

    # -- helpers ------------------------------------------------------------------------------
    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        state: FakeState = self.server.state
        header = self.headers.get("Authorization", "")
        with state.lock:
            state.auth_digests.add(_digest(header))
        if state.api_key is None or header == f"Bearer {state.api_key}":
            return True
        self._send(401, {"error": {"message": "invalid API key", "type": "auth"}})
        return False

    # -- endpoints ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        state: FakeState = self.server.state
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/_stats":
            self._send(200, state.stats())
        elif self.path == "/v1/models":
            if self._authorised():
                self._send(
                    200, {"object": "list", "data": [{"id": state.model, "object": "model"}]}
                )
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        state: FakeState = self.server.state
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path != "/v1/chat/completions":
            self._send(404, {"detail": "Not Found"})
            return
        if not self._authorised():
            return
        with state.lock:
            state.in_flight += 1
            state.requests += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._chat(state, body)
        finally:
            with state.lock:
                state.in_flight -= 1

    def _chat(self, state: FakeState, body: dict[str, Any]) -> None:
        content = body["messages"][0]["content"]
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        text = next(c["text"] for c in content if c["type"] == "text")
        marker = next((m for m in MARKERS if m in text), None)
        with state.lock:
            attempt = state.attempts.get(text, 0) + 1
            state.attempts[text] = attempt
            state.bodies.append(body)
        if body.get("model") != state.model:
            self._send(404, {"detail": f"model {body.get('model')!r} is not served"})
            return
        extra = set(body) - {"model", "messages", "max_tokens", "temperature", "top_p", "seed"}
        if extra:
            self._send(422, {"detail": f"Unexpected fields in the request: {sorted(extra)}"})
            return
        if state.fail_all is not None:
            self._send(state.fail_all, {"detail": "the engine is broken"})
            return
        if marker == "error500" or (marker == "flaky500" and attempt == 1):
            self._send(500, {"detail": "Internal Server Error"})
            return
        if marker == "ratelimit" and attempt == 1:
            self._send(429, {"detail": "slow down"}, {"Retry-After": "0"})
            return
        if marker == "toolong":
            self._send(400, {"detail": "prompt is longer than the model's context"})
            return
        if marker == "stall":
            time.sleep(state.stall)
        time.sleep(state.delay)
        data = base64.b64decode(url.split(",", 1)[1])
        image = Image.open(io.BytesIO(data))
        with state.lock:
            state.image_sizes.append(list(image.size))
            state.instructions.append(text)
        words = ["fake", "caption", _digest(url), "for", _digest(text)]
        budget = int(body.get("max_tokens") or 16)
        if budget > len(words):  # every word, then the end token
            caption, n_new, finish = " ".join(words), len(words) + 1, "stop"
        else:
            caption, n_new, finish = " ".join(words[:budget]), budget, "length"
        self._send(
            200,
            {
                "id": f"chatcmpl-{_digest(url + text)}",
                "object": "chat.completion",
                "created": 0,
                "model": state.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": caption},
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": 16 + len(text.split()),
                    "completion_tokens": n_new,
                    "total_tokens": 16 + len(text.split()) + n_new,
                },
            },
        )


class FakeServer(ThreadingHTTPServer):
    """The HTTP server with its :class:`FakeState`."""

    daemon_threads = True

    def __init__(self, port: int, state: FakeState) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.state = state

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def start(port: int = 0, **options: Any) -> FakeServer:
    """Start a fake server in a daemon thread; ``server.shutdown()`` stops it."""
    server = FakeServer(port, FakeState(**options))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--stall", type=float, default=30.0)
    parser.add_argument("--fail-all", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=MODEL_ID)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.startup_delay)
    server = FakeServer(
        args.port,
        FakeState(
            delay=args.delay,
            stall=args.stall,
            fail_all=args.fail_all,
            api_key=args.api_key,
            model=args.model,
        ),
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
