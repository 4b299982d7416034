"""Fixtures for the Open Inference Protocol tests: the real server (`python -m serving`, run from
the project's .venv) driven by Triton's own client (tritonclient, from .venv-triton).

Nothing of `serving` is imported here: these tests see the server only as a Triton/KServe
client would.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from training import data as cifar

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = REPO_ROOT / "models"
MODEL = "cifar10"
# The server runs from the project's own venv; this venv only holds the client side.
SERVER_PYTHON = os.environ.get("CIFAR10_SERVER_PYTHON", str(REPO_ROOT / ".venv" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class V2Server:
    """`python -m serving` in a subprocess, with a tritonclient client and a raw V2 stub."""

    def __init__(self, *flags: str, repository: Path = SHIPPED_MODELS, wait_ready: bool = True):
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"server-v2-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [SERVER_PYTHON, "-m", "serving", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
             "--model-repository", str(repository), "--intra-op-threads", "1", *flags],
            cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.client = triton.InferenceServerClient(self.url)
        # Triton's generated stub, for what tritonclient does not expose (typed contents).
        self.channel = grpc.insecure_channel(self.url)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.wait_until(self.client.is_server_ready if wait_ready else self.client.is_server_live)

    def wait_until(self, probe, timeout: float = 60.0) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if probe():
                    return
            except InferenceServerException:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a sample over every series whose labels include `labels`."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        wanted = set(labels.items())
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and wanted <= set(sample.labels.items())
        )

    def stop(self, timeout: float = 30.0) -> None:
        self.client.close()
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server():
    """The shipped models, default settings: shared by tests that only read."""
    proc = V2Server()
    yield proc
    proc.stop()


@pytest.fixture
def start_server():
    """Factory for servers with their own flags or repository; each is stopped after the test."""
    started: list[V2Server] = []

    def start(*flags: str, **kwargs) -> V2Server:
        proc = V2Server(*flags, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def model_repo(tmp_path) -> Path:
    """A private copy of the shipped repository, to add, break and remove versions in."""
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    return repo


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
