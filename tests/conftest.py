"""Fixtures: real servers (`python -m serving`) on loopback ports, real models, real data."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc
from training import data as cifar

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = REPO_ROOT / "models"
DEFAULT_MODEL = "cifar10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serving` in a subprocess, with a channel, stubs and a metrics scraper."""

    def __init__(self, *flags: str, repository: Path = SHIPPED_MODELS, env: dict | None = None,
                 wait_ready: bool = True, credentials: grpc.ChannelCredentials | None = None):
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"server-{self.port}.log"
        self.target = f"127.0.0.1:{self.port}"
        args = [
            sys.executable, "-m", "serving", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--model-repository", str(repository), "--intra-op-threads", "1", *flags,
        ]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            args, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        # TLS servers: `credentials` (grpc.ssl_channel_credentials) make self.channel a secure one.
        self.channel = (grpc.secure_channel(self.target, credentials) if credentials is not None
                        else grpc.insecure_channel(self.target))
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        if wait_ready:
            self.wait_serving()

    def wait_serving(self, timeout: float = 60.0) -> float:
        """Seconds until health says SERVING (fails the test on timeout or early exit)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not SERVING after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted label items): value} from /metrics."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a sample over every series whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, lbls), v in self.metrics().items() if n == name and wanted <= set(lbls))

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.channel.close()
        self._log.close()
        return self.process.returncode


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
    started: list[ServerProcess] = []

    def start(*flags: str, **kwargs) -> ServerProcess:
        proc = ServerProcess(*flags, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def model_repo(tmp_path) -> Path:
    """A private copy of the shipped repository, to add, change and remove versions in."""
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    return repo


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_image(pixels: np.ndarray) -> pb.Image:
    return pb.Image(encoded=encode(pixels))


def raw_image(pixels: np.ndarray) -> pb.Image:
    h, w, c = pixels.shape
    return pb.Image(raw=pb.RawPixels(data=pixels.tobytes(), height=h, width=w, channels=c))
