"""Load, overload and faults on real servers over loopback: nothing accepted is lost.

The long ones are `slow` (`make soak`; SOAK_SECONDS sets the soak length, 120 by default).
The corrupted-model test is short and runs with `make test`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.status import RETRY_AFTER_KEY
from tests.conftest import ServerProcess, encode, raw_image

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
SOAK_WARMUP_SECONDS = min(20.0, SOAK_SECONDS / 4)
PIXELS = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED


# ---- a load generator: N clients (one connection each) calling in a loop -----------------

@dataclass
class LoadReport:
    codes: Counter = field(default_factory=Counter)
    latencies: dict[grpc.StatusCode, list[float]] = field(default_factory=dict)
    images_ok: int = 0
    first_seen: dict[grpc.StatusCode, float] = field(default_factory=dict)  # time.monotonic()
    retry_hints: int = 0

    def record(self, code: grpc.StatusCode, seconds: float, images: int = 0) -> None:
        self.codes[code] += 1
        self.latencies.setdefault(code, []).append(seconds)
        self.first_seen.setdefault(code, time.monotonic())
        if code == OK:
            self.images_ok += images

    def percentile(self, code: grpc.StatusCode, q: float) -> float:
        return float(np.percentile(self.latencies[code], q))


Call = Callable[[pb_grpc.ClassifierStub, int], Awaitable[int]]  # (stub, iteration) -> images classified


async def classify_once(stub: pb_grpc.ClassifierStub, i: int, timeout: float = 10.0) -> int:
    image = raw_image(PIXELS) if i % 2 else pb.Image(encoded=PNG)
    await stub.Classify(pb.ClassifyRequest(image=image, top_k=3), timeout=timeout)
    return 1


def batch_call(images: int, timeout: float) -> Call:
    request = pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * images)

    async def call(stub: pb_grpc.ClassifierStub, i: int) -> int:
        await stub.ClassifyBatch(request, timeout=timeout)
        return images

    return call


async def mixed_call(stub: pb_grpc.ClassifierStub, i: int) -> int:
    """Every RPC shape: unary, batch, stream."""
    if i % 8 == 7:
        replies = [r async for r in stub.ClassifyStream(pb.ClassifyRequest(image=raw_image(PIXELS)) for _ in range(4))]
        assert all(not r.HasField("error") for r in replies)
        return len(replies)
    if i % 8 == 6:
        return await batch_call(4, 10.0)(stub, i)
    return await classify_once(stub, i)


PNG = encode(PIXELS)


async def _client(target: str, call: Call, stop: threading.Event, report: LoadReport,
                  stop_on: frozenset[grpc.StatusCode]) -> None:
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            try:
                images = await call(stub, i)
                report.record(OK, time.perf_counter() - started, images)
            except grpc.aio.AioRpcError as err:
                report.record(err.code(), time.perf_counter() - started)
                if err.code() == RESOURCE_EXHAUSTED and (err.trailing_metadata() or {}).get(RETRY_AFTER_KEY):
                    report.retry_hints += 1
                if err.code() in stop_on:
                    return
            i += 1


def run_load(target: str, clients: int, seconds: float, call: Call = classify_once,
             stop: threading.Event | None = None, stop_on: frozenset = frozenset()) -> LoadReport:
    """Blocks for `seconds` (or until `stop` is set) while `clients` clients call in a loop."""
    stop = stop or threading.Event()
    report = LoadReport()
    timer = threading.Timer(seconds, stop.set)
    timer.start()

    async def main():
        await asyncio.gather(*(_client(target, call, stop, report, stop_on) for _ in range(clients)))

    try:
        asyncio.run(main())
    finally:
        timer.cancel()
    return report


class InBackground:
    """run_load in a thread: `with InBackground(...) as load:` ... `load.report` after the block."""

    def __init__(self, target: str, clients: int, call: Call = classify_once, **kwargs):
        self.stop = threading.Event()
        self.report: LoadReport | None = None
        self._thread = threading.Thread(
            target=lambda: setattr(self, "report", run_load(target, clients, 3600, call, self.stop, **kwargs)))

    def __enter__(self) -> "InBackground":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._thread.join(60)
        assert self.report is not None, "the load thread did not finish"


@dataclass(frozen=True)
class Resources:
    rss_bytes: int
    fds: int
    threads: int

    @classmethod
    def of(cls, process: psutil.Process) -> "Resources":
        return cls(process.memory_info().rss, process.num_fds(), process.num_threads())


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


# ---- soak ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_soak_64_clients_without_errors_memory_growth_or_leaks(start_server):
    srv = start_server()
    server_process = psutil.Process(srv.process.pid)
    samples: list[Resources] = []
    with InBackground(srv.target, 64, mixed_call) as load:
        time.sleep(SOAK_WARMUP_SECONDS)
        after_warmup = Resources.of(server_process)
        while len(samples) * 5 < SOAK_SECONDS - SOAK_WARMUP_SECONDS:
            time.sleep(5)
            samples.append(Resources.of(server_process))
    report = load.report
    assert set(report.codes) == {OK}, report.codes
    at_end = samples[-1]
    assert at_end.rss_bytes < after_warmup.rss_bytes * 1.10, (after_warmup, at_end)
    assert at_end.fds <= after_warmup.fds + 4 and at_end.threads <= after_warmup.threads + 2, (after_warmup, at_end)
    print(f"\nsoak: {sum(report.codes.values())} calls, {report.images_ok} images in {SOAK_SECONDS:.0f}s; "
          f"p50 {report.percentile(OK, 50) * 1000:.1f} ms, p99 {report.percentile(OK, 99) * 1000:.1f} ms; "
          f"RSS {after_warmup.rss_bytes / 2**20:.0f} -> {at_end.rss_bytes / 2**20:.0f} MiB "
          f"(max {max(s.rss_bytes for s in samples) / 2**20:.0f}); fds {after_warmup.fds} -> {at_end.fds}; "
          f"threads {after_warmup.threads} -> {at_end.threads}")


# ---- overload ------------------------------------------------------------------------------

OVERLOAD_DEADLINE_S = 2.0


@pytest.mark.slow
def test_overload_is_refused_quickly_while_accepted_requests_meet_their_deadlines(start_server):
    srv = start_server("--max-batch-size", "16", "--max-queue-size", "32")
    server_process = psutil.Process(srv.process.pid)
    before = Resources.of(server_process)
    depths: list[float] = []
    with InBackground(srv.target, 128, batch_call(8, OVERLOAD_DEADLINE_S)) as load:
        for _ in range(30):  # 15 s of offered load far above what 32 queued images allow
            time.sleep(0.5)
            depths.append(srv.metric("classifier_queue_depth_images", model="cifar10"))
        during = Resources.of(server_process)
    report = load.report
    assert set(report.codes) == {OK, RESOURCE_EXHAUSTED}, report.codes  # no deadline missed, nothing else
    assert report.codes[RESOURCE_EXHAUSTED] > report.codes[OK] > 0
    assert report.retry_hints == report.codes[RESOURCE_EXHAUSTED]
    # "Quickly" as the server sees it (the Python clients share the 2 cores): handler entry to answer.
    refused = dict(method="ClassifyBatch", code="RESOURCE_EXHAUSTED")
    refused_within_10ms = srv.metric("classifier_request_duration_seconds_bucket", le="0.01", **refused)
    assert refused_within_10ms >= 0.99 * srv.metric("classifier_request_duration_seconds_count", **refused)
    assert report.percentile(RESOURCE_EXHAUSTED, 50) < report.percentile(OK, 50)  # and faster than an answer
    assert max(report.latencies[OK]) < OVERLOAD_DEADLINE_S
    assert max(depths) <= 32
    assert during.rss_bytes < before.rss_bytes + 200 * 2**20, (before, during)
    assert srv.metric("classifier_rejected_requests_total", reason="queue_full") == report.codes[RESOURCE_EXHAUSTED]
    print(f"\noverload: {report.codes[OK]} accepted (p99 {report.percentile(OK, 99) * 1000:.0f} ms), "
          f"{report.codes[RESOURCE_EXHAUSTED]} refused (p50 {report.percentile(RESOURCE_EXHAUSTED, 50) * 1000:.1f} ms, "
          f"p99 {report.percentile(RESOURCE_EXHAUSTED, 99) * 1000:.1f} ms); RSS {before.rss_bytes / 2**20:.0f} -> "
          f"{during.rss_bytes / 2**20:.0f} MiB; max queue depth {max(depths):.0f}/32")


# ---- deadlines and cancellation under load -------------------------------------------------

LOAD_BATCH = 32


async def expiring_probe(stub: pb_grpc.ClassifierStub, i: int) -> int:
    """A deadline far shorter than the queue wait under load."""
    await stub.Classify(pb.ClassifyRequest(image=raw_image(PIXELS)), timeout=0.05)
    return 1


async def cancelled_probe(stub: pb_grpc.ClassifierStub, i: int) -> int:
    """Gives up after 50 ms, while its request waits in the queue."""
    call = stub.Classify(pb.ClassifyRequest(image=raw_image(PIXELS)), timeout=30)
    await asyncio.sleep(0.05)
    if call.cancel():
        raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata())
    await call
    return 1


@pytest.mark.slow
@pytest.mark.parametrize("probe,reason", [(expiring_probe, None), (cancelled_probe, "cancelled")],
                         ids=["deadline", "cancel"])
def test_expired_and_cancelled_requests_under_load_are_never_computed(start_server, probe, reason):
    srv = start_server("--max-batch-size", str(LOAD_BATCH), "--max-queue-size", "4096")
    with InBackground(srv.target, 16, batch_call(LOAD_BATCH, 60)) as load:
        time.sleep(2)  # a queue has built up
        probes = run_load(srv.target, 8, 8, probe)
    assert set(load.report.codes) == {OK}, load.report.codes
    assert wait_for(lambda: srv.metric("classifier_queue_depth_images", model="cifar10") == 0)
    dropped = srv.metric("classifier_dropped_requests_total", model="cifar10")
    assert dropped >= probes.codes[grpc.StatusCode.CANCELLED if reason else DEADLINE_EXCEEDED] * 0.5 > 0
    if reason:
        assert srv.metric("classifier_dropped_requests_total", reason=reason) >= 1
    # Every probe that reached the batcher was either computed or dropped, never both:
    submitted_probes = srv.metric("classifier_requests_total", method="Classify")
    computed = srv.metric("classifier_batch_size_sum", model="cifar10")
    assert computed == load.report.images_ok + submitted_probes - dropped, (computed, probes.codes, dropped)
    print(f"\n{probe.__name__}: probes {dict(probes.codes)}, dropped {dropped:.0f}, computed {computed:.0f}")


# ---- SIGTERM under load --------------------------------------------------------------------

def follow_health(srv: ServerProcess, seen: list[tuple[float, int]]) -> threading.Thread:
    watch = srv.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

    def follow():
        try:
            for reply in watch:
                seen.append((time.monotonic(), reply.status))
        except grpc.RpcError:
            pass

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request_and_exits_zero(start_server):
    srv = start_server("--grace-period-s", "10")
    health: list[tuple[float, int]] = []
    watcher = follow_health(srv, health)
    with InBackground(srv.target, 32, classify_once, stop_on=frozenset({UNAVAILABLE})) as load:
        time.sleep(3)
        srv.signal(signal.SIGTERM)
        assert srv.process.wait(30) == 0
    watcher.join(5)
    report = load.report
    # Calls arriving during shutdown are refused by gRPC itself: UNAVAILABLE, or CANCELLED when they
    # race its GOAWAY. The access log shows that none of them reached a handler: nothing accepted is lost.
    assert set(report.codes) <= {OK, UNAVAILABLE, grpc.StatusCode.CANCELLED}, report.codes
    not_serving_at = next(t for t, status in health if status == health_pb2.HealthCheckResponse.NOT_SERVING)
    assert not_serving_at <= report.first_seen.get(UNAVAILABLE, float("inf")) + 0.5
    answered_ok = len(re.findall(r"native Classify .* status=OK", srv.log()))
    not_ok = re.findall(r"native Classify .* status=(?!OK)\w+", srv.log())
    assert answered_ok == report.codes[OK] and not not_ok, (answered_ok, report.codes, not_ok[:3])
    print(f"\nSIGTERM under load: {dict(report.codes)}")


# ---- a model file corrupted while serving --------------------------------------------------

def test_a_model_corrupted_on_disk_keeps_serving_the_loaded_version_after_reload(start_server, model_repo):
    srv = start_server(repository=model_repo)
    sha_before = srv.stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=10).sha256
    with InBackground(srv.target, 4) as load:
        time.sleep(0.5)
        model_file = model_repo / "cifar10" / "1" / "model.onnx"
        model_file.write_bytes(b"\x08\x07 this is not an ONNX model any more " * 100)
        listing = srv.stub.ReloadModels(pb.ReloadModelsRequest(), timeout=60)
        time.sleep(0.5)
    (version,) = [m for m in listing.models if m.name == "cifar10" and m.version == 1]
    assert version.state == pb.AVAILABLE and "reload failed" in version.error
    assert set(load.report.codes) == {OK} and load.report.codes[OK] > 0, load.report.codes
    assert srv.stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=10).sha256 == sha_before
    assert srv.metric("classifier_model_load_failures_total", model="cifar10") == 1
    assert srv.stub.Classify(pb.ClassifyRequest(image=raw_image(PIXELS)), timeout=10).predictions
