"""Fixtures for the Open Inference Protocol tests: the real server (`python -m serving`, run from
the project's .venv) driven by Triton's own client (tritonclient, from .venv-triton).

Nothing of `serving` is imported here (tests.harness imports none either): these tests see
the server only as a Triton/KServe client would.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.harness import REPO_ROOT, SHIPPED_MODELS, ServedProcess, copy_of_shipped_models, started_processes
from training import data as cifar

MODEL = "cifar10"
# The server runs from the project's own venv; this venv only holds the client side.
SERVER_PYTHON = os.environ.get("CIFAR10_SERVER_PYTHON", str(REPO_ROOT / ".venv" / "bin" / "python"))


class V2Server(ServedProcess):
    """`python -m serving` in a subprocess, with a tritonclient client and a raw V2 stub."""

    def __init__(self, *flags: str, repository: Path = SHIPPED_MODELS, wait_ready: bool = True):
        super().__init__(SERVER_PYTHON, flags, repository)
        self.url = self.target
        self.client = triton.InferenceServerClient(self.url)
        # Triton's generated stub, for what tritonclient does not expose (typed contents).
        self.channel = grpc.insecure_channel(self.url)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        probe = self.client.is_server_ready if wait_ready else self.client.is_server_live
        self.wait_until("ready" if wait_ready else "live", probe, retry_on=(InferenceServerException,))

    def close_clients(self) -> None:
        self.client.close()
        self.channel.close()


@pytest.fixture(scope="session")
def server():
    """The shipped models, default settings: shared by tests that only read."""
    proc = V2Server()
    yield proc
    proc.stop()


@pytest.fixture
def start_server():
    """Factory for servers with their own flags or repository; each is stopped after the test."""
    yield from started_processes(V2Server)


@pytest.fixture
def model_repo(tmp_path) -> Path:
    """A private copy of the shipped repository's version 1 of each model: the tests publish, break
    and remove later versions themselves (a copy of v1 as version 2, say)."""
    return copy_of_shipped_models(tmp_path, versions=frozenset({1}))


@pytest.fixture(scope="session")
def metadata(server) -> service_pb2.ModelMetadataResponse:
    return server.client.get_model_metadata(MODEL)


@pytest.fixture(scope="session")
def test_slice() -> cifar.Split:
    """The first 200 CIFAR-10 test images (bit-exact pixels)."""
    found = cifar.default_data_dir()
    if found is None:
        pytest.fail("CIFAR-10 not found: set CIFAR10_DIR or place it at ../shared/data/cifar-10-batches-py")
    return cifar.read_batch(found / cifar.TEST_FILE).take(slice(0, 200))


def expect_error(code: str, call, *fragments: str) -> str:
    """Runs `call`, which must fail with gRPC status `code` and a message holding every fragment."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == f"StatusCode.{code}", caught.value
    for fragment in fragments:
        assert fragment in caught.value.message(), caught.value.message()
    return caught.value.message()


def image_input(name: str, values: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    return tensor


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
