"""The servers under test, each in its own process: ours (`python -m serving`) and the MLServer peer.

Each records its startup time (process start -> ready) and exposes its process tree's RSS and
CPU time, so results can be put per image.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
MLSERVER_VENV = REPO_ROOT / ".venv-mlserver"
READY_TIMEOUT_S = 60.0
READY_POLL_S = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class BatchSizes:
    """The classifier_batch_size histogram: cumulative count per upper bound, plus sum and count."""

    buckets: dict[float, float]
    total: float
    count: float

    def minus(self, earlier: "BatchSizes") -> "BatchSizes":
        return BatchSizes({le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                          self.total - earlier.total, self.count - earlier.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def distribution(self) -> dict[str, int]:
        """Batches per bucket, non-cumulative, labelled by range ("1", "2", "3-4", ..., ">512")."""
        result, previous_le, previous_count = {}, 0.0, 0.0
        for le in sorted(self.buckets):
            count = self.buckets[le] - previous_count
            low = int(previous_le) + 1
            name = (">" + str(int(previous_le))) if le == float("inf") else (
                str(int(le)) if low >= le else f"{low}-{int(le)}")
            if count:
                result[name] = int(count)
            previous_le, previous_count = le, self.buckets[le]
        return result


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds and counts of the server's own latency histograms: each request phase
    (decode, queue_wait, inference, postprocess) and the whole handler ("handler")."""

    seconds: dict[str, float]
    counts: dict[str, float]

    def minus(self, earlier: "PhaseTimes") -> "PhaseTimes":
        return PhaseTimes({k: v - earlier.seconds.get(k, 0.0) for k, v in self.seconds.items()},
                          {k: v - earlier.counts.get(k, 0.0) for k, v in self.counts.items()})

    def mean_ms(self) -> dict[str, float]:
        return {k: round(self.seconds[k] / n * 1000, 3) for k, n in self.counts.items() if n}


class ManagedServer:
    name = "server"

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.startup_s = float("nan")
        self.target = ""

    def _spawn(self, args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> float:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        started = time.perf_counter()
        self.process = subprocess.Popen(args, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, start_new_session=True)
        return started

    def _wait(self, started: float, is_ready) -> None:
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            if is_ready():
                self.startup_s = time.perf_counter() - started
                return
            time.sleep(READY_POLL_S)
        self.stop()  # no orphan left serving (or holding ports) after a failed start
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S}s; see {self.log_path}")

    def _tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def rss_bytes(self) -> int:
        """Resident memory of the server and any worker processes it started."""
        return sum(p.memory_info().rss for p in self._tree())

    def cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self._tree())

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class OurServer(ManagedServer):
    """`python -m serving` with the given flags; ready when gRPC health says SERVING."""

    name = "ours"

    def __init__(self, log_path: Path, flags: list[str], model_repository: Path, launcher: list[str] | None = None):
        super().__init__(log_path)
        # `-m serving` for every row; bench/tune.py may put an experiment wrapper in front.
        self.launcher = launcher or ["-m", "serving"]
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.flags = flags
        self.model_repository = model_repository

    def start(self) -> "OurServer":
        args = [sys.executable, *self.launcher, "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                "--model-repository", str(self.model_repository), *self.flags]
        started = self._spawn(args)
        channel = grpc.insecure_channel(self.target)
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        try:
            self._wait(started, serving)
        finally:
            channel.close()
        return self

    def metric_families(self):
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return text_string_to_metric_families(text)

    def phase_times(self) -> PhaseTimes:
        seconds: dict[str, float] = {}
        counts: dict[str, float] = {}
        for family in self.metric_families():
            if family.name not in ("classifier_phase_duration_seconds", "classifier_request_duration_seconds"):
                continue
            for sample in family.samples:
                phase = sample.labels.get("phase", "handler")
                if sample.name.endswith("_sum"):
                    seconds[phase] = seconds.get(phase, 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    counts[phase] = counts.get(phase, 0.0) + sample.value
        return PhaseTimes(seconds, counts)

    def batch_sizes(self, model: str = "") -> BatchSizes:
        buckets: dict[float, float] = {}
        total = count = 0.0
        for family in self.metric_families():
            if family.name != "classifier_batch_size":
                continue
            for sample in family.samples:
                if model and sample.labels.get("model") != model:
                    continue
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
        return BatchSizes(buckets, total, count)


class MLServerPeer(ManagedServer):
    """MLServer 1.7.1 in .venv-mlserver serving the same ONNX file through bench/mlserver/onnx_runtime.py.

    Adaptive batching is on (max_batch_size requests, waiting at most max_batch_time_s);
    `parallel_workers` inference processes (MLServer's default is 1), each with its own session.
    Ready when GET /v2/models/<model>/ready answers 200.
    """

    name = "mlserver"

    def __init__(self, log_path: Path, model_dir: Path, work_dir: Path, model_name: str = "cifar10",
                 intra_op_threads: int = 2, max_batch_size: int = 64, max_batch_time_s: float = 0.002,
                 parallel_workers: int = 1):
        super().__init__(log_path)
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.model_name = model_name
        self.settings = {
            "name": model_name,
            "implementation": "onnx_runtime.OnnxClassifier",
            "max_batch_size": max_batch_size,
            "max_batch_time": max_batch_time_s,
            "parameters": {"uri": str(model_dir.resolve()), "version": "1",
                           "extra": {"intra_op_threads": intra_op_threads}},
        }
        self.parallel_workers = parallel_workers
        # Absolute: MLServer runs with this as its cwd, so a relative repository path (from a
        # relative --out) would point nowhere and it would start with no model, never ready.
        self.work_dir = work_dir.resolve()

    def start(self) -> "MLServerPeer":
        executable = MLSERVER_VENV / "bin" / "mlserver"
        if not executable.exists():
            raise RuntimeError(f"MLServer is not installed in {MLSERVER_VENV}: run `make bench-venvs`")
        repository = self.work_dir / "mlserver-repository"
        (repository / self.model_name).mkdir(parents=True, exist_ok=True)
        (repository / self.model_name / "model-settings.json").write_text(json.dumps(self.settings, indent=2))
        env = {
            "MLSERVER_HOST": "127.0.0.1", "MLSERVER_GRPC_PORT": str(self.grpc_port),
            "MLSERVER_HTTP_PORT": str(self.http_port), "MLSERVER_METRICS_PORT": str(self.metrics_port),
            "MLSERVER_PARALLEL_WORKERS": str(self.parallel_workers), "MLSERVER_DEBUG": "false",
            "MLSERVER_METRICS_DIR": str(self.work_dir / "mlserver-metrics"),
            "MLSERVER_ENVIRONMENTS_DIR": str(self.work_dir / "mlserver-envs"),
            "PYTHONPATH": str(REPO_ROOT / "bench" / "mlserver"),
        }
        started = self._spawn([str(executable), "start", str(repository)], env=env, cwd=self.work_dir)
        ready_url = f"http://127.0.0.1:{self.http_port}/v2/models/{self.model_name}/ready"

        def ready() -> bool:
            try:
                return urllib.request.urlopen(ready_url, timeout=0.5).status == 200
            except OSError:
                return False

        self._wait(started, ready)
        return self
