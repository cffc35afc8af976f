"""Captions from an OpenAI-compatible chat-completions server (vLLM, SGLang, transformers serve).

The caption stage's ``openai`` backend sends every sample as one chat-completions request: a
user message with the image (a base64 ``data:`` URL) and the instruction, exactly the
conversation the in-process backend renders with the checkpoint's chat template. Serving
engines batch the requests themselves (continuous batching, paged attention), so the client
only keeps ``caption.concurrency`` requests in flight.

- :func:`model_view` downscales an image to what the model sees before it is sent, the way
  CLIP-style image processors (LLaVA's) resize it: the shorter side to the model's input side,
  the longer one in proportion (truncated), bicubic. The server's own resize of that image is
  then a no-op, so the model gets the pixels it would have got from the original; images that
  are already small enough are sent as decoded. Images travel as PNG: lossless.
- :class:`ChatCaptionClient` wraps the ``openai`` package's async client: greedy decoding by
  default with the generation options the API has, retries with exponential backoff for
  timeouts, dropped connections, 429 and 5xx, and a clear :class:`EndpointError` when the
  server is down or refuses every request (wrong key, unknown model, unsupported option).
- :func:`run_requests` runs a stream of requests with a bounded number in flight, checking for
  stop signals while it waits.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

# HTTP statuses worth retrying: timeouts, conflicts, rate limits and server errors.
RETRY_STATUSES = frozenset({408, 409, 425, 429})
# Statuses that say the request itself is wrong for this server, so every request will fail:
# bad or missing key, unknown path or model, unsupported fields.
FATAL_STATUSES = frozenset({401, 403, 404, 405, 422})
MAX_BACKOFF_SECONDS = 60.0
PROBE_TIMEOUT_SECONDS = 10.0
POLL_SECONDS = 0.1
MESSAGE_CHARS = 300


class EndpointError(RuntimeError):
    """The server cannot caption at all (down, refusing the key, the model or the options)."""


# -- images ---------------------------------------------------------------------------------------
def model_view(image: Image.Image, side: int) -> Image.Image:
    """``image`` with its shorter side brought down to ``side`` pixels (never up).

    The size follows transformers' ``get_resize_output_image_size`` for a ``shortest_edge``
    resize (the longer side is truncated, not rounded) and the resampling is bicubic, as in
    CLIP's image processor, so the server's resize of the result changes nothing.
    """
    width, height = image.size
    if min(width, height) <= side:
        return image
    if width <= height:
        size = (side, int(side * height / width))
    else:
        size = (int(side * width / height), side)
    return image.resize(size, Image.Resampling.BICUBIC)


def image_data_url(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,...`` URL (lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- requests and results --------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    """One sample to caption: its row index in the shard, the instruction and the image."""

    index: int
    instruction: str
    image_url: str


@dataclass
class ChatResult:
    """What the server answered for one request (``error`` set when it never did)."""

    index: int
    caption: str | None = None
    finish_reason: str | None = None
    n_prompt_tokens: int | None = None
    n_new_tokens: int | None = None
    error: str | None = None
    attempts: int = 1


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed request is sent again."""

    max_retries: int = 4
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = MAX_BACKOFF_SECONDS

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...): the server's
        ``Retry-After`` if it sent one, else exponential backoff with jitter."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff_seconds)
        base = min(self.backoff_seconds * 2 ** (retry - 1), self.max_backoff_seconds)
        return base * random.uniform(0.5, 1.0)  # jitter spreads the retries of many requests


@dataclass(frozen=True)
class GenerationOptions:
    """The request's generation fields: standard ones, and the engines' extra ones."""

    fields: dict[str, Any] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)


def generation_options(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    min_new_tokens: int | None,
    seed: int,
) -> GenerationOptions:
    """The chat-completions fields for the caption config's generation options.

    Greedy decoding is ``temperature: 0`` (vLLM, SGLang and transformers serve all take it
    so). ``repetition_penalty`` and ``min_new_tokens`` are not in the OpenAI API: they are
    sent only when set, as vLLM's and SGLang's extra parameters ``repetition_penalty`` and
    ``min_tokens`` (transformers serve refuses unknown fields).
    """
    fields: dict[str, Any] = {"max_tokens": max_new_tokens}
    if do_sample:
        fields.update(temperature=temperature, top_p=top_p, seed=seed)
    else:
        fields["temperature"] = 0.0
    extra: dict[str, Any] = {}
    if repetition_penalty != 1.0:
        extra["repetition_penalty"] = repetition_penalty
    if min_new_tokens:
        extra["min_tokens"] = min(min_new_tokens, max_new_tokens)
    return GenerationOptions(fields, extra)


def _status_text(exc: Any) -> str:
    """``HTTP 500: <the server's message>``, shortened, on one line."""
    body = getattr(exc, "body", None)
    detail: Any = body if body is not None else getattr(exc, "message", str(exc))
    if isinstance(detail, dict):
        detail = detail.get("detail") or detail.get("message") or detail.get("error") or detail
        if isinstance(detail, dict):
            detail = detail.get("message") or detail
    text = " ".join(str(detail).split())
    if len(text) > MESSAGE_CHARS:
        text = text[: MESSAGE_CHARS - 3] + "..."
    return f"HTTP {exc.status_code}: {text}"


def _connection_text(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        return f"connection failed ({exc})"
    return f"connection failed ({type(cause).__name__}: {cause})".replace("\n", " ")


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: use our own backoff
        return None


# -- the client ------------------------------------------------------------------------------------
class ChatCaptionClient:
    """Captions one image per chat-completions request, with retries; an async context manager.

    ``server_problem`` (for a server the stage started) says why the server process is gone;
    a request that fails while it is gone fails at once instead of retrying.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        options: GenerationOptions,
        request_timeout: float,
        retry: RetryPolicy,
        api_key: str | None = None,
        api_key_env: str | None = None,
        server_problem: Callable[[], str | None] | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.options = options
        self.request_timeout = request_timeout
        self.retry = retry
        self._api_key = api_key
        self.api_key_env = api_key_env
        self.server_problem = server_problem
        self.model = ""
        self._client: Any = None

    async def __aenter__(self) -> ChatCaptionClient:
        from openai import AsyncOpenAI

        from recaption.serving import quiet_http_logs

        quiet_http_logs()
        # A key the config did not ask for (OPENAI_API_KEY) is never sent to this server.
        self._client = AsyncOpenAI(
            base_url=self.endpoint,
            api_key=self._api_key or "none",
            max_retries=0,  # retried here, with the backoff and limits of the config
            timeout=self.request_timeout,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()

    # -- the server -------------------------------------------------------------------------
    async def served_models(self) -> list[str]:
        """The model ids of ``/v1/models``; raises :class:`EndpointError` when it does not
        answer after the retries."""
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        reason = ""
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt))
            problem = self.server_problem() if self.server_problem else None
            if problem is not None:
                raise EndpointError(f"the server of {self.endpoint} {problem}")
            try:
                page = await self._client.models.list(timeout=PROBE_TIMEOUT_SECONDS)
                return [m.id async for m in page]
            except APITimeoutError:
                reason = f"no answer within {PROBE_TIMEOUT_SECONDS:g}s"
            except APIConnectionError as exc:
                reason = _connection_text(exc)
            except APIStatusError as exc:
                if exc.status_code in (401, 403):
                    raise EndpointError(self._auth_message(exc)) from None
                reason = _status_text(exc)
        raise EndpointError(
            f"{self.endpoint}/models does not answer ({reason}, {self.retry.max_retries + 1} "
            "attempts): is the server running and is caption.endpoint its base URL?"
        )

    async def choose_model(self, wanted: Sequence[str]) -> str:
        """The served model to ask: the only one, or the one named in ``wanted``."""
        served = await self.served_models()
        if not served:
            raise EndpointError(f"{self.endpoint}/models lists no model")
        if len(served) == 1:
            self.model = served[0]
        else:
            matches = [m for m in served if m in wanted]
            if not matches:
                raise EndpointError(
                    f"{self.endpoint} serves {len(served)} models ({', '.join(served[:10])}); "
                    "set caption.model to the one to caption with"
                )
            self.model = matches[0]
        return self.model

    async def probe(self) -> str | None:
        """Why the server is unusable right now (down, not answering), or None."""
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        problem = self.server_problem() if self.server_problem else None
        if problem is not None:
            return f"the server {problem}"
        try:
            await self._client.models.list(timeout=PROBE_TIMEOUT_SECONDS)
        except APITimeoutError:
            return f"{self.endpoint}/models does not answer within {PROBE_TIMEOUT_SECONDS:g}s"
        except APIConnectionError as exc:
            return f"{self.endpoint}: {_connection_text(exc)}"
        except APIStatusError as exc:
            if exc.status_code >= 500:
                return f"{self.endpoint}/models answers {_status_text(exc)}"
        return None

    def _auth_message(self, exc: Any) -> str:
        where = (
            f"the key in ${self.api_key_env}"
            if self.api_key_env
            else "no key (caption.api_key_env is not set)"
        )
        return (
            f"{self.endpoint} refused the request with {_status_text(exc)}; it was sent "
            f"{where}: set caption.api_key_env to the environment variable that holds the "
            "server's key"
        )

    # -- one request ----------------------------------------------------------------------------
    def _messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": request.image_url}},
                    {"type": "text", "text": request.instruction},
                ],
            }
        ]

    async def caption(self, request: ChatRequest) -> ChatResult:
        """Caption one request, retrying transient failures; :class:`EndpointError` when the
        server is down or refuses requests of this kind altogether."""
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        reason = ""
        attempts = self.retry.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                response = await self._client.chat.completions.create(
                    model=self.model,
                    messages=self._messages(request),
                    extra_body=self.options.extra_body or None,
                    **self.options.fields,
                )
            except APITimeoutError:
                reason = f"no answer within caption.request_timeout={self.request_timeout:g}s"
            except APIConnectionError as exc:
                reason = _connection_text(exc)
            except APIStatusError as exc:
                status = exc.status_code
                if status in (401, 403):
                    raise EndpointError(self._auth_message(exc)) from None
                if status in FATAL_STATUSES:
                    raise EndpointError(self._refusal_message(exc)) from None
                if status not in RETRY_STATUSES and status < 500:
                    # This request is wrong for the server (a prompt too long, an image it
                    # cannot read): the sample's error row, no retry.
                    return ChatResult(
                        request.index,
                        error=f"the server refused the request: {_status_text(exc)}",
                        attempts=attempt + 1,
                    )
                reason = _status_text(exc)
                retry_after = _retry_after(exc)
            else:
                return self._result(request, response, attempt + 1)
            problem = self.server_problem() if self.server_problem else None
            if problem is not None:
                raise EndpointError(f"the server of {self.endpoint} {problem}")
            if attempt + 1 < attempts:
                wait = self.retry.delay(attempt + 1, retry_after)
                logger.debug("request %d: %s; retrying in %.1fs", request.index, reason, wait)
                await asyncio.sleep(wait)
        problem = await self.probe()
        if problem is not None:
            raise EndpointError(f"{problem} (a request failed {attempts} times; last: {reason})")
        return ChatResult(
            request.index, error=f"request failed {attempts} times: {reason}", attempts=attempts
        )

    def _refusal_message(self, exc: Any) -> str:
        extra = ""
        if self.options.extra_body:
            names = ", ".join(sorted(self.options.extra_body))
            extra = (
                f" The request carried the engine parameters {names} (from "
                "caption.repetition_penalty / caption.min_new_tokens), which vLLM and SGLang "
                "take but other servers may refuse: leave those keys at their defaults there."
            )
        return (
            f"{self.endpoint}/chat/completions refused the request with {_status_text(exc)}; "
            f"every request would be refused the same way (model {self.model!r}).{extra}"
        )

    @staticmethod
    def _result(request: ChatRequest, response: Any, attempts: int) -> ChatResult:
        choices = getattr(response, "choices", None) or []
        if not choices or choices[0].message is None:
            return ChatResult(
                request.index, error="the server answered without a choice", attempts=attempts
            )
        choice = choices[0]
        usage = getattr(response, "usage", None)
        return ChatResult(
            request.index,
            caption=(choice.message.content or "").strip(),
            finish_reason=choice.finish_reason,
            n_prompt_tokens=getattr(usage, "prompt_tokens", None),
            n_new_tokens=getattr(usage, "completion_tokens", None),
            attempts=attempts,
        )


# -- many requests ---------------------------------------------------------------------------------
@dataclass
class RunReport:
    """What :func:`run_requests` did: the results (any order) and where the time went."""

    results: list[ChatResult] = field(default_factory=list)
    seconds_waiting_for_images: float = 0.0
    retries: int = 0


async def run_requests(
    client: ChatCaptionClient,
    batches: Iterator[list[ChatRequest]],
    *,
    concurrency: int,
    check_stop: Callable[[], None],
    on_result: Callable[[ChatResult], None] | None = None,
    give_up_after: int | None = None,
) -> RunReport:
    """Send every request of ``batches`` with at most ``concurrency`` in flight.

    ``batches`` is a blocking iterator (a DataLoader): it is read in a thread, so requests
    keep flowing while the next batch is prepared. ``check_stop`` is called between events
    and raises to stop; the requests in flight are then cancelled. ``give_up_after``
    consecutive failed requests (default ``max(10, 2 * concurrency)``) mean the server is not
    working: :class:`EndpointError`.
    """
    report = RunReport()
    limit = give_up_after or max(10, 2 * concurrency)
    in_flight: set[asyncio.Task[ChatResult]] = set()
    consecutive = 0

    def settle(done: set[asyncio.Task[ChatResult]]) -> None:
        nonlocal consecutive
        for task in done:
            in_flight.discard(task)
            result = task.result()  # an EndpointError raises here
            report.results.append(result)
            report.retries += result.attempts - 1
            consecutive = consecutive + 1 if result.error else 0
            if on_result is not None:
                on_result(result)
            if consecutive >= limit:
                raise EndpointError(
                    f"the last {consecutive} requests to {client.endpoint} all failed (latest: "
                    f"{result.error}); the server is not captioning"
                )

    async def wait_below(count: int) -> None:
        while len(in_flight) >= count:
            done, _ = await asyncio.wait(
                in_flight, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            settle(done)
            check_stop()

    fetch: asyncio.Future[list[ChatRequest] | None] | None = None
    try:
        while True:
            fetch = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
            while not fetch.done():
                idle = len(in_flight) < concurrency
                t0 = time.perf_counter()
                await asyncio.wait(
                    {fetch, *in_flight}, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
                if idle:
                    report.seconds_waiting_for_images += time.perf_counter() - t0
                settle({t for t in in_flight if t.done()})
                check_stop()
            batch = fetch.result()  # the iterator's own error (a broken shard) raises here
            fetch = None
            if batch is None:
                break
            for request in batch:
                await wait_below(concurrency)
                check_stop()
                in_flight.add(asyncio.create_task(client.caption(request)))
        await wait_below(1)
    except BaseException:
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        if fetch is not None:  # a thread cannot be cancelled: let it hand over its batch
            await asyncio.gather(fetch, return_exceptions=True)
        raise
    return report
