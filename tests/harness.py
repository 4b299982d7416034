"""Child processes for tests: the real server, Prometheus, an image's command.

Imports nothing of `serving` (only the standard library and prometheus_client), so the Open
Inference Protocol tests in tests_v2/, which run from Triton's client venv, share it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = REPO_ROOT / "models"
P = TypeVar("P", bound="LoggedProcess")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_dir() -> Path:
    return Path(os.environ.get("PYTEST_TMP", "/tmp"))


class LoggedProcess:
    """A child whose stdout and stderr go to a log file; stopped with SIGTERM, then SIGKILL."""

    name = "process"

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env if env is not None else dict(os.environ))

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float = 60.0,
                   retry_on: tuple[type[BaseException], ...] = (OSError,), poll_s: float = 0.05) -> float:
        """Seconds until `predicate()` holds; fails the test on timeout or if the child exits."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if predicate():
                    return time.monotonic() - started
            except retry_on:
                pass
            time.sleep(poll_s)
        raise AssertionError(f"{self.name}: {what} not reached in {timeout}s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def close_clients(self) -> None:
        """Subclasses close their channels here."""

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.close_clients()
        self._log.close()
        return self.process.returncode


class ServedProcess(LoggedProcess):
    """`python -m serving` on free loopback ports (one onnxruntime thread: CI has 2 cores)."""

    name = "server"

    def __init__(self, python: str, flags: tuple[str, ...], repository: Path = SHIPPED_MODELS,
                 env: dict[str, str] | None = None):
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        argv = [python, "-m", "serving", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                "--model-repository", str(repository), "--intra-op-threads", "1", *flags]
        super().__init__(argv, log_dir() / f"server-{self.port}.log", {**os.environ, **(env or {})})

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted label items): value} from /metrics."""
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


def started_processes(make: Callable[..., P]) -> Iterator[Callable[..., P]]:
    """For a fixture: yields a factory; every process it started is stopped afterwards."""
    started: list[P] = []

    def start(*args, **kwargs) -> P:
        proc = make(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def copy_of_shipped_models(tmp_path: Path, versions: frozenset[int] | None = None) -> Path:
    """A private copy of models/, to add, change, break and remove versions in: every version, or
    only `versions` of each model (with the repository's own config files)."""
    repo = tmp_path / "models"

    def left_out(directory: str, names: list[str]) -> set[str]:
        if versions is None or Path(directory).parent != SHIPPED_MODELS:
            return set()
        return {name for name in names if name.isdigit() and int(name) not in versions}

    shutil.copytree(SHIPPED_MODELS, repo, ignore=left_out)
    return repo
