"""Per-call bookkeeping shared by every API face: request ids, status, metrics, access log."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from serving.metrics import ServingMetrics
from serving.status import status_of, trailing_metadata_of

access_log = logging.getLogger("serving.access")
log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
STREAM_WINDOW = 64  # messages of one stream in flight at once (answers stay in order)


@dataclass
class CallRecord:
    method: str
    protocol: str
    request_id: str
    deadline: float | None  # time.monotonic() seconds, from the client's gRPC deadline
    model: str = ""
    version: int = 0
    images: int = 0
    extra: dict = field(default_factory=dict)


def request_id_from(context: grpc.aio.ServicerContext, given: str = "") -> str:
    if given:
        return given[:128]
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)[:128]
    return secrets.token_hex(8)  # 64 random bits; uuid4().hex[:16] had 60 and cost 4x as much


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class CallObserver:
    """Runs a handler and turns its outcome into a status, metrics and one access-log line."""

    def __init__(self, metrics: ServingMetrics, access_log_enabled: bool = True):
        self.metrics = metrics
        self.access_log_enabled = access_log_enabled

    def record(self, method: str, protocol: str, context: grpc.aio.ServicerContext, request_id: str = "") -> CallRecord:
        return CallRecord(method, protocol, request_id_from(context, request_id), deadline_of(context))

    async def unary(self, call: CallRecord, context: grpc.aio.ServicerContext,
                    handler: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        inflight = self.metrics.child(self.metrics.inflight, call.protocol)
        inflight.inc()
        failure: BaseException | None = None
        code = grpc.StatusCode.OK
        try:
            return await handler()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - mapped below, never leaked
            failure = exc
            code, message, reason = status_of(exc, call.request_id)
            if code == grpc.StatusCode.INTERNAL and reason == "internal":
                log.exception("request %s (%s) failed", call.request_id, call.method)
            self.count_rejection(reason, call.protocol, code)
        finally:
            inflight.dec()
            # Counted and logged once gRPC has the answer: the metrics and the access-log line
            # cost ~0.1 ms of the event loop, which the client no longer waits for (bench/NOTES.md).
            asyncio.get_running_loop().call_soon(self.finish, call, code, time.perf_counter() - started)
        metadata = trailing_metadata_of(failure)
        if metadata:
            context.set_trailing_metadata(metadata)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def count_rejection(self, reason: str, protocol: str, code: grpc.StatusCode) -> None:
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL):
            self.metrics.child(self.metrics.rejections, reason, protocol).inc()

    def finish(self, call: CallRecord, code: grpc.StatusCode, seconds: float) -> None:
        version = str(call.version) if call.version else ""
        self.metrics.child(self.metrics.requests, call.method, code.name, call.protocol, call.model, version).inc()
        self.metrics.child(self.metrics.request_latency, call.method, code.name, call.protocol).observe(seconds)
        if self.access_log_enabled:
            access_log.info(
                "%s %s model=%s version=%s images=%d status=%s latency_ms=%.2f request_id=%s",
                call.protocol, call.method, call.model or "-", call.version or "-", call.images,
                code.name, seconds * 1000, call.request_id,
                extra={"access": {
                    "protocol": call.protocol, "method": call.method, "model": call.model,
                    "version": call.version, "images": call.images, "status": code.name,
                    "latency_ms": round(seconds * 1000, 3), "request_id": call.request_id, **call.extra,
                }},
            )

    async def ordered_stream(
        self, call: CallRecord, requests: AsyncIterable[R],
        handle: Callable[[R], Awaitable[tuple[T, int]]], window: int = STREAM_WINDOW,
    ) -> AsyncIterator[T]:
        """Handle each request of a stream concurrently (up to `window`), answer in order.

        `handle` returns (response, images) and must answer its own failures in-band; the
        stream call as a whole is counted, timed and logged once.
        """
        started = time.perf_counter()
        inflight = self.metrics.child(self.metrics.inflight, call.protocol)
        inflight.inc()
        pending: asyncio.Queue = asyncio.Queue(maxsize=window)

        async def read() -> None:
            try:
                async for request in requests:
                    await pending.put(asyncio.ensure_future(handle(request)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        code = grpc.StatusCode.OK
        try:
            while (task := await pending.get()) is not None:
                response, images = await task
                call.images += images
                yield response
            await reader  # surfaces a broken request stream
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
            inflight.dec()
            self.finish(call, code, time.perf_counter() - started)
