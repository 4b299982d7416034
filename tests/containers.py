"""Real containers for the `container` tests (make test-container): the engine and the images
that docker/engine.py finds and builds, and containers started from them on loopback ports.

The tests skip only when no engine can start any container on this machine (the reason says
what failed). A failed build or a container that misbehaves fails them.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TextIO, TypeVar

import grpc
import pytest

from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.harness import REPO_ROOT, log_dir


def _load_engine_module():
    """docker/engine.py, the code behind `make image` (not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("container_engine", REPO_ROOT / "docker" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


engines = _load_engine_module()
Engine = engines.Engine
T = TypeVar("T")
# The image's EXPOSEd ports (tests/test_deploy.py checks they are CIFAR10_PORT and CIFAR10_METRICS_PORT).
GRPC_PORT, METRICS_PORT = 50051, 9090


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def built(what: str, make: Callable[[TextIO], T]) -> T:
    """Runs a build step with its output in a log file; a failure fails the test with the log's tail."""
    path = log_dir() / f"container-build-{what}.log"
    with open(path, "w") as out:
        try:
            return make(out)
        except engines.BuildError as err:
            failure = f"{err}"
    pytest.fail(f"{failure}\n--- {path} (tail) ---\n{log_tail(path)}")


def usable_engine() -> Engine:
    """The engine that `make image` would use, once it has shown it can start a container."""
    try:
        engine = engines.probe()
    except engines.NoEngine as err:
        pytest.skip(f"no container engine answers on this machine: {err}")
    base = built("python-base", lambda out: engines.python_base(engine, out))
    started = engine.call("run", "--rm", *engine.run_flags, base, "true", timeout=120)
    if started.returncode != 0:
        pytest.skip(f"{engine.command} cannot start a container on this machine: {engines.last_words(started)}")
    return engine


class Container:
    """`ENGINE run -d IMAGE` with the gRPC and metrics ports published on loopback; remove() ends it."""

    def __init__(self, engine: Engine, image: str, *flags: str, env: dict[str, str] | None = None):
        self.engine = engine
        self.name = f"cifar10-test-{secrets.token_hex(4)}"
        environment = [f"--env={key}={value}" for key, value in (env or {}).items()]
        started = engine.call("run", "-d", "--name", self.name, *engine.run_flags,
                              "-p", f"127.0.0.1::{GRPC_PORT}", "-p", f"127.0.0.1::{METRICS_PORT}",
                              *environment, *flags, image, timeout=120)
        self.started_at = time.monotonic()
        self.seconds_to_healthy: float | None = None  # set by wait_healthy
        if started.returncode != 0:
            engine.call("rm", "-f", self.name)  # created but not started
            raise AssertionError(f"{engine.command} run failed: {started.stderr}")
        self.target = f"127.0.0.1:{self.host_port(GRPC_PORT)}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def host_port(self, port: int) -> int:
        mapped = self.engine.call("port", self.name, f"{port}/tcp")
        assert mapped.returncode == 0, mapped.stderr
        return int(mapped.stdout.split()[0].rsplit(":", 1)[1])

    def exec(self, *argv: str) -> subprocess.CompletedProcess:
        return self.engine.call("exec", self.name, *argv, timeout=60)

    def inspect(self) -> dict:
        (state,) = json.loads(self.engine.call("inspect", self.name).stdout)
        return state

    def logs(self) -> str:
        printed = self.engine.call("logs", self.name)
        return printed.stdout + printed.stderr

    def healthcheck_command(self) -> list[str]:
        """The image's own HEALTHCHECK (CMD form), as the engine recorded it for this container."""
        kind, *command = self.inspect()["Config"]["Healthcheck"]["Test"]
        assert kind == "CMD", kind
        return command

    def wait_healthy(self, timeout: float) -> float:
        """Seconds from `run` to the first passing run of the image's health check inside the
        container; fails the test with the log when none passes within `timeout`."""
        command = self.healthcheck_command()
        while True:
            checked = self.exec(*command)
            if checked.returncode == 0:
                self.seconds_to_healthy = time.monotonic() - self.started_at
                return self.seconds_to_healthy
            if time.monotonic() - self.started_at > timeout:
                raise AssertionError(f"{self.name}: health check did not pass within {timeout}s "
                                     f"({checked.stdout.strip()} {checked.stderr.strip()}):\n{self.logs()}")
            time.sleep(0.5)

    def remove(self) -> None:
        self.channel.close()
        self.engine.call("rm", "-f", self.name, timeout=60)
