"""Async gRPC load generators (grpc.aio): closed loop at a fixed concurrency, open loop at a fixed rate.

Closed loop: N workers, each sends its next request when the previous one answers (the
throughput a fixed client population gets). Open loop: requests leave on a fixed schedule
whatever the answers do; latency counts from the scheduled send time, so a stalled server
shows up as latency instead of silently slowing the senders (no coordinated omission).
Only requests that complete inside the measurement window (after the warm-up) count.

Streaming endpoints (ClassifyStream) run closed loop too: `concurrency` is the number of messages
in flight in all, carried by streams that each keep up to STREAM_DEPTH messages outstanding
(c=64: 16 streams of 4), the way a client streams frames without waiting for each answer.
Latency is per message, from its write to its answer.
"""

from __future__ import annotations

import asyncio
import collections
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np

from bench.endpoints import Endpoint

CALL_TIMEOUT_S = 30.0
SAMPLED_RESPONSES = 64  # decoded after the run to check the answers
MAX_OPEN_LOOP_INFLIGHT = 4096  # beyond this the open loop counts CLIENT_BACKLOG instead of sending
STREAM_DEPTH = 4  # messages one stream keeps in flight in the streaming closed loop


@dataclass
class LoadResult:
    label: str
    mode: str  # "closed" | "open"
    concurrency: int | None
    target_rate: float | None
    duration_s: float
    latencies_s: np.ndarray
    errors: dict[str, int]
    accuracy: float
    client_cpu_s: float
    images_per_request: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def images(self) -> int:
        """Images answered OK."""
        return self.ok * self.images_per_request

    @property
    def throughput(self) -> float:
        """Images per second answered OK."""
        return self.images / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.ok else float("nan")

    def summary(self) -> dict:
        return {
            "label": self.label, "mode": self.mode, "concurrency": self.concurrency,
            "target_rate": self.target_rate, "duration_s": round(self.duration_s, 3), "ok": self.ok,
            "throughput": round(self.throughput, 1),
            **{f"p{q}_ms": round(self.percentile_ms(q), 3) for q in (50, 95, 99)},
            "max_ms": round(float(self.latencies_s.max() * 1000), 3) if self.ok else float("nan"),
            "errors": dict(self.errors), "accuracy": self.accuracy,
            "client_cpu_s": round(self.client_cpu_s, 2), "images": self.images, **self.extra,
        }


class _Window:
    """Collects latencies of calls inside [start, end]; counts errors the same way.

    Closed loop: calls that finish inside the window. Open loop (by_send_time): calls scheduled
    inside it, however late they finish, so a slow tail is never cut off.
    """

    def __init__(self, start: float, end: float, by_send_time: bool = False):
        self.start, self.end, self.by_send_time = start, end, by_send_time
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}  # first message per status code
        self.samples: list[tuple[int, bytes]] = []

    def record(self, index: int, sent: float, body: bytes | None, error: str | None, detail: str = "") -> None:
        done = time.perf_counter()
        if not self.start <= (sent if self.by_send_time else done) <= self.end:
            return
        if error is not None:
            self.errors[error] += 1
            self.error_examples.setdefault(error, detail[:300])
            return
        self.latencies.append(done - sent)
        if len(self.samples) < SAMPLED_RESPONSES:
            self.samples.append((index, body))


class _Progress:
    """One status line on stderr, refreshed every second."""

    def __init__(self, label: str, window: _Window, total_s: float, enabled: bool, images_per_request: int = 1):
        self.label, self.window, self.total_s, self.enabled = label, window, total_s, enabled
        self.images_per_request = images_per_request
        self.began = time.perf_counter()

    async def run(self) -> None:
        if not self.enabled:
            return
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            measured = max(0.0, min(now, self.window.end) - self.window.start)
            rate = len(self.window.latencies) * self.images_per_request / measured if measured > 0 else 0.0
            p50 = np.percentile(self.window.latencies, 50) * 1000 if self.window.latencies else float("nan")
            phase = "warm-up" if now < self.window.start else "measuring"
            sys.stderr.write(
                f"\r  {self.label}: {now - self.began:5.1f}/{self.total_s:.0f}s {phase:9s} "
                f"{rate:8.1f} img/s  p50 {p50:7.2f} ms  errors {sum(self.window.errors.values())}   "
            )
            sys.stderr.flush()

    def done(self, result: LoadResult) -> None:
        if self.enabled:
            sys.stderr.write(
                f"\r  {self.label}: {result.throughput:8.1f} img/s  p50 {result.percentile_ms(50):7.2f} ms  "
                f"p99 {result.percentile_ms(99):7.2f} ms  errors {dict(result.errors) or 0}{' ' * 20}\n"
            )


def _call_of(channel: grpc.aio.Channel, endpoint: Endpoint):
    # No serializers: requests go as the bytes prepared beforehand, responses come back as bytes.
    return channel.unary_unary(endpoint.method)


async def _one(call, endpoint: Endpoint, index: int, sent: float, window: _Window) -> None:
    try:
        body = await call(endpoint.requests[index % len(endpoint.requests)], timeout=CALL_TIMEOUT_S)
        window.record(index, sent, body, None)
    except grpc.aio.AioRpcError as exc:
        window.record(index, sent, None, exc.code().name, exc.details() or "")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


CpuClock = Callable[[], float]  # the server's CPU seconds so far (its process tree)


async def _measure(label: str, mode: str, endpoint: Endpoint, warmup_s: float, duration_s: float,
                   drive, progress: bool, server_cpu: CpuClock | None, concurrency: int | None = None,
                   rate: float | None = None) -> LoadResult:
    began = time.perf_counter()
    window = _Window(began + warmup_s, began + warmup_s + duration_s, by_send_time=mode == "open")
    reporter = _Progress(label, window, warmup_s + duration_s, progress, endpoint.images_per_request)
    progress_task = asyncio.ensure_future(reporter.run())
    client_cpu_s = server_cpu_s = float("nan")

    async def mark_cpu() -> None:
        """Client and server CPU over the measurement window only."""
        nonlocal client_cpu_s, server_cpu_s
        await asyncio.sleep(warmup_s)
        client_at_start = _cpu_seconds()
        server_at_start = server_cpu() if server_cpu else 0.0
        await asyncio.sleep(duration_s)
        client_cpu_s = _cpu_seconds() - client_at_start
        if server_cpu:
            server_cpu_s = server_cpu() - server_at_start

    cpu_task = asyncio.ensure_future(mark_cpu())
    try:
        await drive(window)
    finally:
        progress_task.cancel()
    await cpu_task
    result = LoadResult(
        label, mode, concurrency, rate, duration_s, np.asarray(window.latencies, dtype=np.float64),
        dict(window.errors), endpoint.accuracy(window.samples), client_cpu_s, endpoint.images_per_request,
    )
    if window.error_examples:
        result.extra["error_examples"] = window.error_examples
    if server_cpu and result.ok:
        result.extra["server_cpu_ms_per_image"] = round(server_cpu_s * 1000 / result.images, 3)
    reporter.done(result)
    return result


def stream_depths(concurrency: int) -> list[int]:
    """Messages in flight per stream, STREAM_DEPTH each, summing to `concurrency`."""
    full, rest = divmod(concurrency, STREAM_DEPTH)
    return [STREAM_DEPTH] * full + ([rest] if rest else [])


async def _stream_worker(method, endpoint: Endpoint, depth: int, first: int, step: int, window: _Window) -> None:
    """One stream at a time with up to `depth` messages outstanding; a failed stream's outstanding
    messages count as errors of its status code and a new stream takes over."""
    index = first
    while time.perf_counter() < window.end:
        call = method()
        outstanding: collections.deque[tuple[int, float]] = collections.deque()
        slots = asyncio.Semaphore(depth)

        async def write() -> None:
            nonlocal index
            while time.perf_counter() < window.end:
                await slots.acquire()
                outstanding.append((index, time.perf_counter()))
                await call.write(endpoint.requests[index % len(endpoint.requests)])
                index += step
            await call.done_writing()

        writer = asyncio.ensure_future(write())
        try:
            while (body := await call.read()) is not grpc.aio.EOF:
                sent_index, sent = outstanding.popleft()
                slots.release()
                failure = endpoint.error_of(body) if endpoint.error_of else None
                if failure:
                    window.record(sent_index, sent, None, *failure)
                else:
                    window.record(sent_index, sent, body, None)
            await writer
        except grpc.aio.AioRpcError as exc:
            for sent_index, sent in outstanding:
                window.record(sent_index, sent, None, exc.code().name, exc.details() or "")
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)


async def closed_loop(channel: grpc.aio.Channel, endpoint: Endpoint, concurrency: int, duration_s: float,
                      warmup_s: float, label: str = "", progress: bool = True,
                      server_cpu: CpuClock | None = None) -> LoadResult:
    async def drive_calls(window: _Window) -> None:
        call = _call_of(channel, endpoint)

        async def worker(first: int) -> None:
            index = first
            while time.perf_counter() < window.end:
                await _one(call, endpoint, index, time.perf_counter(), window)
                index += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))

    async def drive_streams(window: _Window) -> None:
        method = channel.stream_stream(endpoint.method)  # bytes in, bytes out, as for unary calls
        depths = stream_depths(concurrency)
        await asyncio.gather(*(_stream_worker(method, endpoint, depth, first, len(depths), window)
                               for first, depth in enumerate(depths)))

    return await _measure(label or f"closed c={concurrency}", "closed", endpoint, warmup_s, duration_s,
                          drive_streams if endpoint.streaming else drive_calls, progress, server_cpu,
                          concurrency=concurrency)


async def open_loop(channel: grpc.aio.Channel, endpoint: Endpoint, rate: float, duration_s: float,
                    warmup_s: float, label: str = "", progress: bool = True,
                    server_cpu: CpuClock | None = None) -> LoadResult:
    if endpoint.streaming:
        raise ValueError("the open loop sends unary calls; streaming endpoints run closed loop only")
    call = _call_of(channel, endpoint)

    async def drive(window: _Window) -> None:
        inflight: set[asyncio.Task] = set()
        began = time.perf_counter()
        index = 0
        while True:
            scheduled = began + index / rate
            if scheduled > window.end:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= MAX_OPEN_LOOP_INFLIGHT:
                if window.start <= time.perf_counter() <= window.end:
                    window.errors["CLIENT_BACKLOG"] += 1
            else:
                task = asyncio.ensure_future(_one(call, endpoint, index, scheduled, window))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            index += 1
        if inflight:
            await asyncio.wait(inflight, timeout=CALL_TIMEOUT_S)

    return await _measure(label or f"open {rate:g}/s", "open", endpoint, warmup_s, duration_s, drive, progress,
                          server_cpu, rate=rate)
