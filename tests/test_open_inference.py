"""The Open Inference Protocol (KServe V2) face as seen from the project's own venv: health,
reflection + grpcurl, and the Triton-documentation example agreeing with Classify.

The protocol itself is tested with Triton's own client in tests_v2/ (its own venv).
"""

from __future__ import annotations

import base64
import json
import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.inference import grpc_service_pb2 as v2
from tests.conftest import REPO_ROOT, raw_image
from tests.test_bad_input import CORRUPT_MESSAGE
from tests.test_metadata import GRPCURL

V2_SERVICE = "inference.GRPCInferenceService"
TRITON_PYTHON = REPO_ROOT / ".venv-triton" / "bin" / "python"


def grpcurl(server, method: str, body: dict | None = None) -> dict:
    args = [GRPCURL, "-plaintext", *(["-d", json.dumps(body)] if body is not None else []), server.target, method]
    call = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert call.returncode == 0, call.stderr
    return json.loads(call.stdout)


def test_open_inference_service_is_serving_in_grpc_health(server):
    reply = server.health.Check(health_pb2.HealthCheckRequest(service=V2_SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_runs_model_infer_with_raw_contents_through_reflection(server, test_slice):
    body = {
        "model_name": "cifar10",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3]}],
        "raw_input_contents": [base64.b64encode(test_slice.images[0].tobytes()).decode()],
    }
    reply = grpcurl(server, f"{V2_SERVICE}/ModelInfer", body)
    assert reply["outputs"][0]["datatype"] == "FP32" and reply["outputs"][0]["shape"] == ["1", "10"]
    probabilities = np.frombuffer(base64.b64decode(reply["raw_output_contents"][0]), dtype="<f4")
    assert probabilities.shape == (10,) and abs(probabilities.sum() - 1.0) < 1e-4


def test_triton_example_script_predicts_exactly_like_classify_batch(server, test_slice, data_dir):
    assert TRITON_PYTHON.exists(), "the Triton client venv is missing: run `make test` (it builds .venv-triton)"
    run = subprocess.run(
        [str(TRITON_PYTHON), "examples/triton_classify.py", "--url", server.target, "--data-dir", str(data_dir),
         "--count", str(len(test_slice)), "--model", "cifar10", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    example = json.loads(run.stdout)
    reply = server.stub.ClassifyBatch(
        pb.ClassifyBatchRequest(images=[raw_image(px) for px in test_slice.images], top_k=1), timeout=60
    )
    classify = [result.predictions[0].class_index for result in reply.results]
    assert example["images"] == len(test_slice) == len(classify)
    assert example["predictions"] == classify
    assert example["accuracy"] == np.mean(np.array(classify) == test_slice.labels)


def v2_infer_request(request_id: str, pixels: np.ndarray) -> bytes:
    request = v2.ModelInferRequest(model_name="cifar10", id=request_id, raw_input_contents=[pixels.tobytes()])
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    return request.SerializeToString()


def test_a_corrupt_model_infer_request_is_invalid_argument(server):
    call = server.channel.unary_unary(f"/{V2_SERVICE}/ModelInfer", request_serializer=lambda raw: raw,
                                      response_deserializer=v2.ModelInferResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(CORRUPT_MESSAGE, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest message" in err.value.details()


def test_a_corrupt_message_in_model_stream_infer_is_answered_in_band_and_the_stream_goes_on(server, test_slice):
    call = server.channel.stream_stream(f"/{V2_SERVICE}/ModelStreamInfer", request_serializer=lambda raw: raw,
                                        response_deserializer=v2.ModelStreamInferResponse.FromString)
    pixels = test_slice.images[0]
    replies = list(call(iter([v2_infer_request("a", pixels), CORRUPT_MESSAGE, v2_infer_request("b", pixels)]),
                        timeout=20))
    assert [r.error_message == "" for r in replies] == [True, False, True]
    assert [replies[0].infer_response.id, replies[2].infer_response.id] == ["a", "b"]
    assert "not a valid inference.ModelInferRequest message" in replies[1].error_message
