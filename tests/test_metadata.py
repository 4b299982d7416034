"""Model metadata, model listing, health and reflection."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from tests.conftest import DEFAULT_MODEL, REPO_ROOT, encode
from training.data import CLASS_NAMES

GRPCURL = shutil.which("grpcurl") or str(Path(REPO_ROOT / ".venv/bin/grpcurl"))


def test_metadata_describes_classes_input_provider_and_accuracy(server):
    meta = server.stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=5)
    assert meta.name == DEFAULT_MODEL and meta.state == pb.AVAILABLE
    assert list(meta.class_names) == list(CLASS_NAMES)
    assert (meta.input.datatype, list(meta.input.shape), meta.input.layout) == ("uint8", [-1, 32, 32, 3], "NHWC")
    assert list(meta.output.shape) == [-1, 10]
    assert list(meta.execution_providers) == ["CPUExecutionProvider"]
    assert meta.test_accuracy >= 0.80 and meta.test_accuracy_bit_exact >= 0.80
    assert len(meta.sha256) == 64
    assert json.loads(meta.model_card_json)["sha256"] == meta.sha256
    assert "bilinear" in meta.preprocessing and "mean" in meta.model_preprocessing


def test_list_models_reports_every_version_and_its_state(server):
    listing = server.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert listing.default_model == DEFAULT_MODEL
    default = [m for m in listing.models if m.name == DEFAULT_MODEL]
    assert default and all(m.state == pb.AVAILABLE for m in default)
    assert default[0].execution_providers == ["CPUExecutionProvider"]


def test_health_is_serving_overall_and_per_service(server):
    for service in ("", "cifar10.classifier.v1.Classifier"):
        reply = server.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_health_of_an_unknown_service_is_not_found(server):
    with pytest.raises(grpc.RpcError) as err:
        server.health.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpcurl_lists_services_through_reflection(server):
    listed = subprocess.run([GRPCURL, "-plaintext", server.target, "list"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert {"cifar10.classifier.v1.Classifier", "grpc.health.v1.Health"} <= set(listed.stdout.split())


def test_grpcurl_classifies_a_base64_png(server, test_slice):
    body = json.dumps({"image": {"encoded": base64.b64encode(encode(test_slice.images[0])).decode()}, "top_k": 2})
    call = subprocess.run(
        [GRPCURL, "-plaintext", "-d", body, server.target, "cifar10.classifier.v1.Classifier/Classify"],
        capture_output=True, text=True, timeout=30,
    )
    assert call.returncode == 0, call.stderr
    reply = json.loads(call.stdout)
    assert len(reply["predictions"]) == 2 and reply["model_name"] == DEFAULT_MODEL
