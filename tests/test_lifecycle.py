"""Batching, deadlines, the queue bound, readiness and graceful shutdown, on real servers."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.status import RETRY_AFTER_KEY
from tests.conftest import raw_image

PIXELS = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def single(pixels=PIXELS) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(image=raw_image(pixels))


def test_concurrent_requests_are_coalesced_into_batches(start_server):
    # A 200 ms batching window: 16 concurrent requests can only be answered in few runs.
    srv = start_server("--max-batch-size", "16", "--max-batch-delay-ms", "200")
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: srv.stub.Classify(single(), timeout=10), range(16)))
    assert len(replies) == 16
    runs = srv.metric("classifier_batch_size_count", model="cifar10")  # warm-up runs are not counted
    assert 1 <= runs <= 4
    assert srv.metric("classifier_batch_size_sum", model="cifar10") == 16


def test_max_batch_size_one_turns_batching_off(start_server):
    srv = start_server("--max-batch-size", "1", "--max-queue-size", "64")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: srv.stub.Classify(single(), timeout=10), range(8)))
    assert srv.metric("classifier_batch_size_count", model="cifar10") == 8
    assert srv.metric("classifier_batch_size_bucket", model="cifar10", le="1.0") == 8


def test_a_request_whose_deadline_passes_in_the_queue_is_never_computed(start_server):
    srv = start_server("--max-batch-size", "8", "--max-batch-delay-ms", "1000")
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Classify(single(), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.3)  # past the batching window: the worker has reached the request
    assert srv.metric("classifier_batch_size_count", model="cifar10") == 0
    assert srv.metric("classifier_images_classified_total") == 0
    assert srv.metric("classifier_dropped_requests_total", model="cifar10") == 1


def test_a_full_queue_answers_resource_exhausted_at_once_with_a_retry_hint(start_server):
    srv = start_server("--max-batch-size", "8", "--max-queue-size", "8", "--max-batch-delay-ms", "3000")
    waiting = srv.stub.ClassifyBatch.future(pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * 6), timeout=10)
    time.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * 3), timeout=10)
    assert time.monotonic() - started < 1.0
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queue-size" in err.value.details()
    assert dict(err.value.trailing_metadata())[RETRY_AFTER_KEY].isdigit()
    assert len(waiting.result().results) == 6  # the accepted request is still answered
    assert srv.metric("classifier_rejected_requests_total", reason="queue_full") == 1


def test_a_stream_message_refused_by_a_full_queue_carries_the_retry_hint_as_retry_info(start_server):
    """A stream message has no metadata of its own: its status carries google.rpc.RetryInfo instead."""
    srv = start_server("--max-batch-size", "1", "--max-queue-size", "1")  # one running, one waiting
    answers = list(srv.stub.ClassifyStream(iter([single()] * 32), timeout=30))
    assert len(answers) == 32
    refused = [answer.error for answer in answers if answer.error.code]
    assert refused and {error.code for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    for error in refused:
        (detail,) = error.details
        info = error_details_pb2.RetryInfo()
        assert detail.Unpack(info) and info.retry_delay.ToMilliseconds() > 0


def test_a_cancelled_request_frees_its_queue_slot(start_server):
    srv = start_server("--max-batch-size", "8", "--max-queue-size", "8", "--max-batch-delay-ms", "3000")
    pending = srv.stub.ClassifyBatch.future(pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * 6), timeout=10)
    time.sleep(0.3)
    assert srv.metric("classifier_queue_depth_images", model="cifar10") == 6
    pending.cancel()
    deadline = time.monotonic() + 5
    while srv.metric("classifier_queue_depth_images", model="cifar10") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.metric("classifier_queue_depth_images", model="cifar10") == 0
    assert srv.metric("classifier_dropped_requests_total", reason="cancelled") == 1
    reply = srv.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * 8), timeout=10)
    assert len(reply.results) == 8


def test_health_turns_serving_fast_after_start(start_server):
    srv = start_server(wait_ready=False)
    started = time.monotonic()
    srv.wait_serving()
    assert time.monotonic() - started < 10  # generous for CI; the benchmark measures the real figure
    assert "warmed batch sizes [1, 2, 4, 8, 16, 32, 64]" in srv.log()


def test_sigterm_flips_health_then_drains_in_flight_requests_and_exits_zero(start_server):
    srv = start_server("--max-batch-size", "64", "--max-batch-delay-ms", "1500", "--grace-period-s", "10")
    statuses: list[int] = []
    watch = srv.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)

    def follow():
        try:
            for reply in watch:
                statuses.append(reply.status)
        except grpc.RpcError:
            pass

    watcher = threading.Thread(target=follow)
    watcher.start()
    in_flight = [srv.stub.Classify.future(single(), timeout=15) for _ in range(5)]
    time.sleep(0.3)  # queued, waiting out the batching window
    srv.signal(signal.SIGTERM)
    results = [f.result() for f in in_flight]
    assert all(len(r.predictions) == 5 for r in results)
    assert srv.process.wait(20) == 0
    watcher.join(5)
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert "shutting down" in srv.log()


def test_require_gpu_on_a_cpu_machine_keeps_health_not_serving(start_server):
    srv = start_server("--require-gpu", wait_ready=False)
    deadline = time.monotonic() + 20
    while "failed to load" not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "--require-gpu" in srv.log()
    reply = srv.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    listing = srv.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert listing.models[0].state == pb.FAILED and "GPU" in listing.models[0].error
    assert srv.metric("classifier_gpu_required") == 1
