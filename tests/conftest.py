"""Fixtures: real servers (`python -m serving`) on loopback ports, real models, real data."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.trust import Calibration
from tests.harness import REPO_ROOT, SHIPPED_MODELS, free_port  # noqa: F401 - test modules import them from here
from tests.harness import ServedProcess, copy_of_shipped_models, started_processes
from tests.containers import Engine, built, engines, usable_engine
from training import data as cifar

DEFAULT_MODEL = "cifar10"


class ServerProcess(ServedProcess):
    """`python -m serving` in a subprocess, with a channel, stubs and a metrics scraper."""

    def __init__(self, *flags: str, repository: Path = SHIPPED_MODELS, env: dict | None = None,
                 wait_ready: bool = True, credentials: grpc.ChannelCredentials | None = None):
        super().__init__(sys.executable, flags, repository, env)
        # TLS servers: `credentials` (grpc.ssl_channel_credentials) make self.channel a secure one.
        self.channel = (grpc.secure_channel(self.target, credentials) if credentials is not None
                        else grpc.insecure_channel(self.target))
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        if wait_ready:
            self.wait_serving()

    def wait_serving(self, timeout: float = 60.0) -> float:
        """Seconds until health says SERVING (fails the test on timeout or early exit)."""
        check = health_pb2.HealthCheckRequest(service="")
        return self.wait_until("health SERVING", lambda: self.health.Check(check, timeout=1).status
                               == health_pb2.HealthCheckResponse.SERVING, timeout, retry_on=(grpc.RpcError,))

    def close_clients(self) -> None:
        self.channel.close()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = cifar.default_data_dir()
    if found is None:
        pytest.fail("CIFAR-10 not found: set CIFAR10_DIR or place it at ../shared/data/cifar-10-batches-py")
    return found


@pytest.fixture(scope="session")
def test_slice(data_dir) -> cifar.Split:
    """The first 200 test images (bit-exact pixels, see ../shared/data/README.md)."""
    return cifar.read_batch(data_dir / cifar.TEST_FILE).take(slice(0, 200))


@pytest.fixture(scope="session")
def server():
    """The shipped models, default settings: shared by tests that only read."""
    proc = ServerProcess()
    yield proc
    proc.stop()


@pytest.fixture
def start_server():
    """Factory for servers with their own flags; each is stopped after the test."""
    yield from started_processes(ServerProcess)


@pytest.fixture
def model_repo(tmp_path) -> Path:
    """A private copy of the shipped repository's version 1 of each model: the tests publish, break
    and remove later versions themselves (a copy of v1 as version 2, say)."""
    return copy_of_shipped_models(tmp_path, versions=frozenset({1}))


@pytest.fixture(scope="session")
def container_engine() -> Engine:
    """The engine `make image` uses; the test skips when none can start a container here."""
    return usable_engine()


@pytest.fixture(scope="session")
def built_cpu_image(container_engine) -> str:
    """cifar10-serving:cpu built from this tree, as `make image` builds it (layers cached by the engine)."""
    return built("cpu-image", lambda out: engines.build_cpu_image(container_engine, out))


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_image(pixels: np.ndarray) -> pb.Image:
    return pb.Image(encoded=encode(pixels))


def raw_image(pixels: np.ndarray) -> pb.Image:
    h, w, c = pixels.shape
    return pb.Image(raw=pb.RawPixels(data=pixels.tobytes(), height=h, width=w, channels=c))


def calibrated_as_served(version_dir: Path, probabilities: np.ndarray) -> np.ndarray:
    """A version's graph probabilities as the server answers with them: calibrated as its card
    says (vector scaling, unlike a temperature, can move the argmax of a close call)."""
    card = json.loads((version_dir / "model_card.json").read_text())
    return Calibration.from_card(card.get("calibration"), probabilities.shape[1]).apply(probabilities)


def run_python(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_python("-m", module, *args)


WHITENED_NAME, WHITENED_INT8, WHITENED_VERSION = "tiny", "tiny-int8", 2


@pytest.fixture(scope="session")
def whitened(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """(run dir, repository): two epochs of the `fast` recipe (the default's patch-whitened net,
    grouped SGD, Lookahead) on 1,024 images, exported (trust blocks, explain.onnx) as tiny v2 and
    quantized as tiny-int8 v2. Shared by the training and explain-graph tests: training is the
    slow part."""
    root = tmp_path_factory.mktemp("whitened")
    run_dir, repo = root / "run", root / "models"
    run_module("training.train", "--recipe", "fast", "--epochs", "2", "--limit", "1024", "--run-dir", str(run_dir),
               "--data-dir", str(data_dir))
    run_module("training.export", "--run-dir", str(run_dir), "--repository", str(repo), "--name", WHITENED_NAME,
               "--version", str(WHITENED_VERSION), "--data-dir", str(data_dir), "--fit-images", "1000")
    run_module("training.quantize", "--source", str(repo / WHITENED_NAME / str(WHITENED_VERSION)), "--repository",
               str(repo), "--name", WHITENED_INT8, "--version", str(WHITENED_VERSION), "--data-dir", str(data_dir),
               "--threads", "1")
    return run_dir, repo
