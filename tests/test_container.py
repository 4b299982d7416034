"""The CPU image, built and run by a real engine (make test-container; marker `container`).

Containers run under the Kubernetes Deployment's security settings (docker/k8s/deployment.yaml):
its user, a read-only root filesystem with tmpfs only where it mounts one, no capabilities, no
privilege escalation. Predictions are compared with the in-process onnxruntime model of the
name and version that answered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from serving.config import ServerConfig
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from tests.conftest import REPO_ROOT, SHIPPED_MODELS, calibrated_as_served, png_image
from tests.containers import Container, Engine
from tests.test_deploy import COMPOSE_FILE, container_of, objects
from tests.test_model_repository import publish
from tests.test_soak import OK, UNAVAILABLE, InBackground, classify_once, wait_for

pytestmark = pytest.mark.container

STARTUP_SECONDS = 20.0  # health SERVING, from `run`, through the image's own health check
TRITON_PYTHON = REPO_ROOT / ".venv-triton" / "bin" / "python"
ONE_THREAD = {"CIFAR10_INTRA_OP_THREADS": "1"}  # the test machine has 2 cores, shared
# Classify lines of the JSON access log (CIFAR10_LOG_FORMAT=json in the image).
ACCESS_LOG_STATUS = re.compile(r'"method": "Classify", .*?"status": "(\w+)"')


# ---- the Deployment's settings, as engine flags -------------------------------------------------

@pytest.fixture(scope="module")
def deployment() -> dict:
    (found,) = objects("Deployment")
    return found


def deployment_tmpfs(deployment: dict) -> set[str]:
    """Where the Deployment mounts an emptyDir: the only writable paths it gives the container."""
    empty_dirs = {volume["name"] for volume in deployment["spec"]["template"]["spec"]["volumes"] if "emptyDir" in volume}
    return {mount["mountPath"] for mount in container_of(deployment)["volumeMounts"] if mount["name"] in empty_dirs}


@pytest.fixture(scope="module")
def deployment_flags(container_engine: Engine, deployment) -> list[str]:
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    context = container_of(deployment)["securityContext"]
    flags = ["--user", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
    if context["readOnlyRootFilesystem"]:
        flags += container_engine.read_only_flags
    flags += [f"--cap-drop={capability}" for capability in context["capabilities"]["drop"]]
    if not context["allowPrivilegeEscalation"]:
        flags += ["--security-opt", "no-new-privileges"]
    return flags + [f"--tmpfs={path}" for path in sorted(deployment_tmpfs(deployment))]


@pytest.fixture(scope="module")
def served(container_engine, built_cpu_image, deployment_flags):
    """The built image with its baked-in models, under the Deployment's settings."""
    container = Container(container_engine, built_cpu_image, *deployment_flags, env=ONE_THREAD)
    try:
        container.wait_healthy(timeout=60)  # the startup test holds it to STARTUP_SECONDS
        yield container
    finally:
        container.remove()


def in_process_top1(model: str, version: int | str, images: np.ndarray) -> list[int]:
    """The argmax of output 0 of models/<model>/<version>/model.onnx, run here and calibrated as
    the server calibrates it."""
    version_dir = SHIPPED_MODELS / model / str(version)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    (probabilities,) = session.run([output], {session.get_inputs()[0].name: images})
    return calibrated_as_served(version_dir, probabilities).argmax(axis=1).tolist()


def process_status(container: Container) -> dict[str, str]:
    """/proc/1/status of the server (PID 1 of the container)."""
    read = container.exec("cat", "/proc/1/status")
    assert read.returncode == 0, read.stderr
    return dict(line.split(":", 1) for line in read.stdout.splitlines() if ":" in line)


# ---- startup, accuracy ------------------------------------------------------------------------

def test_turns_serving_within_20s_by_its_own_healthcheck_inside_the_container(served):
    assert served.seconds_to_healthy <= STARTUP_SECONDS, f"{served.seconds_to_healthy:.1f}s"
    command = served.healthcheck_command()
    assert command[:3] == ["python", "-m", "serving.healthcheck"]
    checked = served.exec(*command)
    assert checked.returncode == 0 and checked.stdout.strip().endswith(": SERVING"), checked.stdout


def test_native_api_top1_equals_the_in_process_model_on_200_test_images(served, test_slice):
    reply = served.stub.ClassifyBatch(
        pb.ClassifyBatchRequest(images=[png_image(pixels) for pixels in test_slice.images], top_k=1), timeout=120)
    served_top1 = [result.predictions[0].class_index for result in reply.results]
    assert len(served_top1) == len(test_slice.images) >= 200
    assert served_top1 == in_process_top1(reply.model_name, reply.model_version, test_slice.images)
    accuracy = float(np.mean(np.array(served_top1) == test_slice.labels))
    print(f"\nnative API, {reply.model_name} v{reply.model_version}: top-1 {accuracy:.1%} on {len(served_top1)} images")


def test_open_inference_protocol_top1_through_tritons_client_equals_the_in_process_model(served, test_slice,
                                                                                          tmp_path):
    assert TRITON_PYTHON.exists(), "Triton's client venv is missing: make test-container sets it up"
    images = tmp_path / "images.npy"
    np.save(images, test_slice.images)
    run = subprocess.run([str(TRITON_PYTHON), "tests_v2/classify_over_v2.py", "--target", served.target,
                          "--images", str(images)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert len(answer["top1"]) == len(test_slice.images) >= 200
    assert answer["top1"] == in_process_top1(answer["model_name"], answer["model_version"], test_slice.images)
    accuracy = float(np.mean(np.array(answer["top1"]) == test_slice.labels))
    print(f"\nOpen Inference Protocol, {answer['model_name']} v{answer['model_version']}: "
          f"top-1 {accuracy:.1%} on {len(answer['top1'])} images")


# ---- the Deployment's security settings -------------------------------------------------------

def test_server_runs_as_the_deployments_user_with_no_capabilities_or_privilege_escalation(served, deployment):
    status = process_status(served)
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert status["Uid"].split() == [str(pod["runAsUser"])] * 4
    assert status["Gid"].split() == [str(pod["runAsGroup"])] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


def test_root_filesystem_is_read_only_and_only_the_deployments_tmpfs_is_writable(served, deployment):
    mounts = [line.split() for line in served.exec("cat", "/proc/mounts").stdout.splitlines()]
    writable = {path for _, path, _, options, *_ in mounts
                if "rw" in options.split(",") and not re.match(r"/(dev|proc|sys)(/|$)", path)}
    assert writable == deployment_tmpfs(deployment)
    refused = served.exec("touch", "/app/written")
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    for path in deployment_tmpfs(deployment):
        assert served.exec("touch", f"{path}/written").returncode == 0, path


# ---- what the image holds ---------------------------------------------------------------------

def test_image_holds_no_tensorflow_no_compiler_and_passes_pip_check(served, container_engine, built_cpu_image):
    checked = served.exec("python", "-m", "pip", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    found = served.exec("python", "-c", "import importlib.util as u; "
                        "print([m for m in ('tensorflow', 'keras', 'tf2onnx') if u.find_spec(m)])")
    assert found.stdout.strip() == "[]", found.stdout + found.stderr
    compilers = served.exec("sh", "-c", "for c in cc c++ gcc g++ clang clang++ tcc; do command -v $c; done; true")
    assert compilers.stdout.strip() == "", compilers.stdout
    (image,) = json.loads(container_engine.call("image", "inspect", built_cpu_image).stdout)
    print(f"\nimage {built_cpu_image}: {image['Size'] / 1e6:.0f} MB ({image['Size']} bytes)")


# ---- a mounted repository, reloaded on SIGHUP ---------------------------------------------------

@pytest.fixture
def mounted_repo():
    """Two versions of the default model in a directory the container's user can read."""
    repo = Path(tempfile.mkdtemp(prefix="cifar10-mounted-"))
    try:
        os.chmod(repo, 0o755)  # mkdtemp makes it private to root; the server runs as uid 10001
        source = max((p for p in (SHIPPED_MODELS / "cifar10").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        for version in (1, 2):
            publish(repo, "cifar10", version, source)
        yield repo, source
    finally:
        shutil.rmtree(repo)


def wait_for_version(container: Container, version: int, timeout: float = 60.0) -> pb.ClassifyResponse:
    deadline = time.monotonic() + timeout
    request = pb.ClassifyRequest(image=png_image(np.zeros((32, 32, 3), np.uint8)))
    while True:
        reply = container.stub.Classify(request, timeout=10)
        if reply.model_version == version or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def test_a_read_only_mounted_repository_is_served_and_sighup_picks_up_a_new_version(
        container_engine, built_cpu_image, deployment_flags, mounted_repo):
    repo, source = mounted_repo
    container = Container(container_engine, built_cpu_image, *deployment_flags, f"--volume={repo}:/models:ro",
                          env=ONE_THREAD)
    try:
        container.wait_healthy(timeout=60)
        listed = container.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert {(m.name, m.version) for m in listed.models if m.state == pb.AVAILABLE} == {("cifar10", 2)}
        assert wait_for_version(container, 2).model_name == "cifar10"
        publish(repo, "cifar10", 3, source)
        killed = container_engine.call("kill", "--signal", "HUP", container.name)
        assert killed.returncode == 0, killed.stderr
        assert wait_for_version(container, 3).model_version == 3, container.logs()
    finally:
        container.remove()


# ---- stop under load ----------------------------------------------------------------------------

def seconds(duration: str) -> float:
    """A compose duration such as "15s"."""
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def test_stop_under_16_client_load_answers_or_refuses_every_call_and_exits_zero_within_the_grace(
        container_engine, built_cpu_image, deployment_flags):
    classifier = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["classifier"]
    grace = float(classifier["environment"].get("CIFAR10_GRACE_PERIOD_S", ServerConfig.grace_period_s))
    stop_timeout = seconds(classifier["stop_grace_period"])  # room beyond the grace (the engine then kills)
    container = Container(container_engine, built_cpu_image, *deployment_flags,
                          env={**ONE_THREAD, "CIFAR10_GRACE_PERIOD_S": str(grace)})
    try:
        container.wait_healthy(timeout=60)
        with InBackground(container.target, 16, classify_once, stop_on=frozenset({UNAVAILABLE})) as load:
            assert wait_for(lambda: "OK" in ACCESS_LOG_STATUS.findall(container.logs()), timeout=30), container.logs()
            stop_started = time.monotonic()
            stopped = container_engine.call("stop", "-t", str(int(stop_timeout)), container.name, timeout=60)
            stop_seconds = time.monotonic() - stop_started
        assert stopped.returncode == 0, stopped.stderr
        state = container.inspect()["State"]
        codes = load.report.codes
        log = container.logs()
        # Calls racing the server's GOAWAY end CANCELLED on the client (as in tests/test_soak.py);
        # the access log then shows that none of them reached a handler.
        assert set(codes) <= {OK, UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
        assert codes[OK] > 0, codes
        assert state["ExitCode"] == 0, log
        assert stop_seconds < grace, f"stopped after {stop_seconds:.1f}s, grace {grace}s"
        assert "draining" in log and '"message": "stopped"' in log
        answered = ACCESS_LOG_STATUS.findall(log)
        assert answered.count("OK") == codes[OK] and set(answered) == {"OK"}, (codes, set(answered))
        print(f"\nstop under 16-client load: { {code.name: n for code, n in codes.items()} }, exit {state['ExitCode']}")
    finally:
        container.remove()
