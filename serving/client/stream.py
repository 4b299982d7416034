"""Many images over ClassifyStream: a bounded number in flight, results in input order.

One stream carries the images, one message each; the server answers every message in order
and a failed one in-band (its own status), so one bad image never ends the stream. On top:

- **Bounded**: at most `max_in_flight` images are taken from the input and not yet yielded,
  so memory stays flat however long the input is and however slowly the caller consumes.
- **In order**: results come out in input order (an image waiting for its retry holds back the
  ones after it; the bound above holds back the input).
- **Retries**: an image answered RESOURCE_EXHAUSTED or UNAVAILABLE goes again after its back-off
  (never sooner than the server's RetryInfo hint), up to the policy's attempts. Under
  RESOURCE_EXHAUSTED the number of messages on the wire halves (at most once per round trip)
  and grows back by one per window of answers, so a client that fills a small server queue
  settles at what the queue holds instead of spending its retries.
- **A failed stream** (the connection lost, the server restarting) is reopened after a back-off
  and its unanswered images resent; other stream failures (UNAUTHENTICATED, ...) end the run,
  as do `max_attempts` failed streams in a row without one answer: every image left then
  fails with that status, still one result each. An image unanswered for `timeout` seconds
  ends its stream with DEADLINE_EXCEEDED for the unanswered ones (not retried: they may have
  been classified).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable

import grpc

from serving.client.results import Classification, RequestError, Result
from serving.client.retry import RETRYABLE, Retry, RetryCallback, RetryPolicy, hint_from_metadata, hint_from_status
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb

CLASSIFY_STREAM = "/cifar10.classifier.v1.Classifier/ClassifyStream"
UNREADABLE = (OSError, ValueError, TypeError)  # what turning an input into a request may raise


@dataclass(eq=False)
class _Image:
    index: int
    input: Any
    done: asyncio.Future
    request: bytes = b""
    attempts: int = 0
    sent_at: float = 0.0


@dataclass
class StreamSettings:
    metadata: tuple[tuple[str, str], ...] | None
    timeout: float  # seconds an image may wait for its answer
    retry: RetryPolicy
    on_retry: RetryCallback | None
    max_message_bytes: int
    prepare: Callable[[Any], bytes]  # an input -> a serialized ClassifyRequest (may raise UNREADABLE)


@dataclass
class _Window:
    """Messages allowed on the wire: halved under RESOURCE_EXHAUSTED, grown back by answers."""

    ceiling: int
    size: float = field(init=False)
    last_cut: float = 0.0

    def __post_init__(self) -> None:
        self.size = float(self.ceiling)

    def grow(self) -> None:
        self.size = min(self.ceiling, self.size + 1 / self.size)

    def cut(self, sent_at: float, now: float) -> None:
        if sent_at > self.last_cut:  # one cut per round trip: the rejections of one burst count once
            self.size, self.last_cut = max(1.0, self.size / 2), now

    def room(self, on_wire: int) -> bool:
        return on_wire < int(self.size)


class BulkClassification:
    """One classify_many run; iterate `results()` once."""

    def __init__(self, channel: grpc.aio.Channel, images: Iterable | AsyncIterable, max_in_flight: int,
                 settings: StreamSettings):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._method = channel.stream_stream(CLASSIFY_STREAM)  # bytes both ways: requests are serialized once
        self._settings = settings
        self._source_async = hasattr(images, "__aiter__")
        self._source = aiter(images) if self._source_async else iter(images)
        self._max_in_flight = max_in_flight
        self._window = _Window(max_in_flight)
        self._indices = itertools.count()
        self._order: asyncio.Queue[_Image | None] = asyncio.Queue()  # taken images, in input order
        self._unresolved: dict[int, _Image] = {}
        self._outstanding: collections.deque[_Image] = collections.deque()  # sent on the current stream
        self._due: list[tuple[float, int, _Image]] = []  # retries, by the time they may go
        self._held = 0  # taken and not yet yielded: at most max_in_flight
        self._exhausted = False
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._failure: BaseException | None = None  # what ended the run early
        self._input_error: Exception | None = None  # what the input raised, if it did
        # The current stream: its last answer, whether any came, whether we closed our side, timed out.
        self._last_answer = 0.0
        self._answered = self._writing_closed = self._timed_out = False

    # --- the caller's side -----------------------------------------------------------------------

    async def results(self) -> AsyncIterator[Result]:
        runner = asyncio.ensure_future(self._run())
        try:
            while (image := await self._order.get()) is not None:
                try:
                    result = await image.done
                except asyncio.CancelledError:
                    if isinstance(self._failure, Exception):
                        raise self._failure from None
                    raise
                self._held -= 1
                self._wake.set()
                yield result
            await runner  # raises what ended the run early (the input's own exception)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    # --- bookkeeping -----------------------------------------------------------------------------

    async def _take(self, prepare: bool = True) -> _Image | None:
        """The next input as an image to send, None at the end (an unreadable one resolves at once)."""
        try:
            item = await anext(self._source) if self._source_async else next(self._source)
        except (StopIteration, StopAsyncIteration):
            self._exhausted = True
            return None
        image = _Image(next(self._indices), item, self._loop.create_future())
        self._held += 1
        self._unresolved[image.index] = image
        self._order.put_nowait(image)
        if not prepare:
            return image
        try:
            image.request = self._settings.prepare(item)
        except UNREADABLE as exc:
            self._resolve(image, error=RequestError(None, unreadable_message(item, exc)))
            return image
        if len(image.request) > self._settings.max_message_bytes:
            self._resolve(image, error=RequestError(
                None, f"the request is {len(image.request):,} bytes, over the {self._settings.max_message_bytes:,}-byte "
                      "message limit (max_message_bytes; the server's --max-message-bytes)"))
        return image

    def _resolve(self, image: _Image, classification: Classification | None = None,
                 error: RequestError | None = None) -> None:
        del self._unresolved[image.index]
        if error is not None:  # its own copy: a failed stream's error ends many images
            error = RequestError(error.code, error.message, error.retry_after_ms, image.attempts)
        image.done.set_result(Result(image.input, classification, error, image.attempts))

    def _retry_or_fail(self, image: _Image, error: RequestError, resend_in: float | None = None) -> None:
        """Schedule another attempt (after resend_in, else the image's own back-off) or resolve with error."""
        policy = self._settings.retry
        if error.code not in RETRYABLE or image.attempts >= policy.max_attempts:
            self._resolve(image, error=error)
            return
        delay = policy.delay_s(image.attempts, error.retry_after_ms) if resend_in is None else resend_in
        if resend_in is None:
            self._notify(error, image.attempts, delay)
        when = self._loop.time() + delay
        heapq.heappush(self._due, (when, image.index, image))
        self._loop.call_at(when, self._wake.set)

    def _notify(self, error: RequestError, attempt: int, delay: float, images: int = 1) -> None:
        if self._settings.on_retry is not None:
            self._settings.on_retry(Retry(error.code, error.message, attempt, delay, error.retry_after_ms, images))

    def _finished(self) -> bool:
        return self._exhausted and not self._unresolved

    # --- one stream ------------------------------------------------------------------------------

    async def _next_to_send(self) -> _Image | None:
        """The next image for the wire, when the window has room; None when every image is answered."""
        while True:
            if self._window.room(len(self._outstanding)):
                if self._due and self._due[0][0] <= self._loop.time():
                    return heapq.heappop(self._due)[2]
                if not self._exhausted and self._held < self._max_in_flight:
                    image = await self._take()
                    if image is not None and not image.done.done():
                        return image
                    continue
            if self._finished():
                return None
            self._wake.clear()
            await self._wake.wait()

    async def _send(self, call) -> None:
        try:
            while (image := await self._next_to_send()) is not None:
                image.attempts += 1
                image.sent_at = self._loop.time()
                self._outstanding.append(image)
                await call.write(image.request)
            self._writing_closed = True
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended: _receive reports how
        except Exception as exc:  # the input itself raised: the run ends with it
            self._input_error = exc
            call.cancel()  # wakes _receive

    def _answer(self, body: bytes) -> None:
        image = self._outstanding.popleft()
        self._answered = True
        self._last_answer = self._loop.time()
        answer = pb.ClassifyStreamResponse.FromString(body)
        if not answer.error.code:
            self._window.grow()
            self._resolve(image, Classification.from_response(answer.response))
            return
        error = RequestError.of_status(answer.error.code, answer.error.message, hint_from_status(answer.error))
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._window.cut(image.sent_at, self._loop.time())
        self._retry_or_fail(image, error)

    async def _receive(self, call) -> None:
        """Reads answers until the stream ends."""
        while (body := await call.read()) is not grpc.aio.EOF:
            self._answer(body)
            self._wake.set()
        if self._outstanding or not self._writing_closed:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"the server ended the stream early, "
                                                            f"{len(self._outstanding)} messages unanswered")

    async def _watch(self, call) -> None:
        """Ends the stream when its oldest unanswered image has waited `timeout` seconds."""
        timeout = self._settings.timeout
        while True:
            await asyncio.sleep(timeout / 4)
            if self._outstanding:
                waiting_since = max(self._outstanding[0].sent_at, self._last_answer)
                if self._loop.time() - waiting_since > timeout:
                    self._timed_out = True
                    call.cancel()
                    return

    async def _stream(self) -> RequestError | None:
        """One stream until it ends: None when every image was answered, else why it failed."""
        call = self._method(metadata=self._settings.metadata)
        self._timed_out = self._answered = self._writing_closed = False
        sender = asyncio.ensure_future(self._send(call))
        watchdog = asyncio.ensure_future(self._watch(call))
        try:
            await self._receive(call)
            await sender
            return None
        except grpc.aio.AioRpcError as exc:
            return RequestError(exc.code(), exc.details() or "", hint_from_metadata(exc.trailing_metadata()))
        except RequestError as exc:
            return exc
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            if self._input_error is not None:
                raise self._input_error from None
            if not self._timed_out:
                raise
            return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no answer within {self._settings.timeout:g} s (timeout)")
        finally:
            for task in (sender, watchdog):
                task.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)
            if not call.done():
                call.cancel()

    # --- the run ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._drive()
        except BaseException as exc:
            self._failure = exc
            for image in self._unresolved.values():
                image.done.cancel()  # wakes the caller, who raises self._failure
            raise
        finally:
            self._order.put_nowait(None)

    async def _drive(self) -> None:
        policy = self._settings.retry
        failed_in_a_row = 0
        while not self._finished():
            failure = await self._stream()
            if failure is None:
                continue
            failed_in_a_row = 1 if self._answered else failed_in_a_row + 1
            unanswered = list(self._outstanding)
            self._outstanding.clear()
            retrying = failure.code in RETRYABLE
            if (not retrying and failure.code != grpc.StatusCode.DEADLINE_EXCEEDED) or failed_in_a_row >= policy.max_attempts:
                await self._give_up(failure)
                return
            if retrying:
                delay = policy.delay_s(failed_in_a_row, failure.retry_after_ms)
                self._notify(failure, failed_in_a_row, delay, len(unanswered))
                for image in unanswered:
                    self._retry_or_fail(image, failure, resend_in=0.0)
                await asyncio.sleep(delay)
            else:
                for image in unanswered:
                    self._resolve(image, error=failure)

    async def _give_up(self, failure: RequestError) -> None:
        """Every image not yet answered, and every one still to come, fails with `failure`."""
        self._due.clear()
        for image in list(self._unresolved.values()):
            self._resolve(image, error=failure)
        while not self._exhausted:
            if self._held >= self._max_in_flight:
                self._wake.clear()
                await self._wake.wait()
                continue
            image = await self._take(prepare=False)
            if image is not None:
                self._resolve(image, error=failure)


def unreadable_message(item: Any, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"cannot read {item}: {exc.strerror or exc}"
    return str(exc)
