"""/metrics after known traffic: every family, exact counts."""

from __future__ import annotations

import grpc
import pytest

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from tests.conftest import raw_image

FAMILIES = [
    "classifier_requests_total", "classifier_request_duration_seconds_bucket",
    "classifier_phase_duration_seconds_bucket", "classifier_batch_size_bucket",
    "classifier_images_classified_total", "classifier_inflight_requests", "classifier_queue_depth_images",
    "classifier_model_info", "classifier_model_loads_total", "classifier_serving", "classifier_explain_queue_depth",
]


@pytest.fixture
def traffic(start_server, test_slice):
    srv = start_server()
    for pixels in test_slice.images[:7]:
        srv.stub.Classify(pb.ClassifyRequest(image=raw_image(pixels)), timeout=10)
    srv.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[raw_image(p) for p in test_slice.images[:5]]), timeout=10)
    with pytest.raises(grpc.RpcError):
        srv.stub.Classify(pb.ClassifyRequest(image=pb.Image(encoded=b"junk")), timeout=10)
    # A call is counted just after its answer has gone out, so the last one may still be on its way.
    srv.wait_until("all 9 calls counted", lambda: srv.metric("classifier_request_duration_seconds_count") >= 9,
                   timeout=5)
    return srv


def test_every_family_is_exported(traffic):
    names = {name for name, _ in traffic.metrics()}
    assert set(FAMILIES) <= names


def test_requests_are_counted_by_method_and_code(traffic):
    assert traffic.metric("classifier_requests_total", method="Classify", code="OK") == 7
    assert traffic.metric("classifier_requests_total", method="Classify", code="INVALID_ARGUMENT") == 1
    assert traffic.metric("classifier_requests_total", method="ClassifyBatch", code="OK") == 1
    assert traffic.metric("classifier_request_duration_seconds_count", method="Classify") == 8


def test_images_are_counted_by_predicted_class(traffic):
    assert traffic.metric("classifier_images_classified_total", model="cifar10") == 12
    assert len({dict(lbls)["predicted_class"] for n, lbls in traffic.metrics()
                if n == "classifier_images_classified_total"}) >= 2


def test_every_phase_is_timed(traffic):
    for phase in ("decode", "queue_wait", "inference", "postprocess"):
        assert traffic.metric("classifier_phase_duration_seconds_count", phase=phase) >= 8, phase


def test_model_info_names_version_sha256_and_provider(traffic):
    (labels,) = [dict(lbls) for n, lbls in traffic.metrics()
                 if n == "classifier_model_info" and dict(lbls)["model"] == "cifar10"]
    assert labels["model"] == "cifar10" and labels["provider"] == "CPUExecutionProvider"
    assert len(labels["sha256"]) == 64


def test_gauges_are_back_to_zero_when_idle(traffic):
    assert traffic.metric("classifier_inflight_requests") == 0
    assert traffic.metric("classifier_queue_depth_images") == 0
    assert traffic.metric("classifier_serving") == 1
