"""Images, compose stack and Kubernetes manifests, checked without a Docker engine or a cluster.

Structure is read from the shipped files; Kubernetes objects are validated against the API
schema (kubernetes-validate); and the image's own ENTRYPOINT, ENV and HEALTHCHECK are run
outside Docker against the repository's models/, to prove the container would turn SERVING.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from serving.config import ServerConfig, env_name
from serving.healthcheck import check
from tests.conftest import REPO_ROOT, SHIPPED_MODELS, free_port
from tests.containers import engines
from tests.harness import LoggedProcess

DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER_DIR / "Dockerfile", "gpu": DOCKER_DIR / "Dockerfile.gpu"}
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
K8S_DIR = DOCKER_DIR / "k8s"
K8S_VERSION = "1.30.0"  # oldest version the manifests must work on (native gRPC probes, preStop sleep)
CONFIG_ENV_NAMES = {env_name(name) for name in ServerConfig.__dataclass_fields__}
PINNED_TAG = re.compile(r"^[\w.\-/]+:v?\d+(\.\d+)+[\w.\-]*$")


# ---- Dockerfile reading --------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (args,) = self.all(keyword)
        return args

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                values[key] = value
        return values


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # ARG defaults declared before the first FROM
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, image: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args[m.group(1)], image)


def instructions_of(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped, as Docker does."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def read_dockerfile(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, text in instructions_of(path):
        if keyword == "FROM":
            words = text.split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 else ""))
        elif not stages and keyword == "ARG":
            name, _, default = text.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, text))
    return Dockerfile(path, args, stages)


def exec_form(text: str) -> list[str]:
    """The JSON array of an exec-form instruction (shell form is not allowed in ours)."""
    assert text.startswith("["), f"not exec form: {text}"
    return json.loads(text)


def healthcheck_command(stage: Stage) -> list[str]:
    options_and_cmd = stage.one("HEALTHCHECK")
    return exec_form(options_and_cmd[options_and_cmd.index("CMD") + 3:].strip())


def outside_docker(argv: list[str]) -> list[str]:
    """An image command run here: the image's `python` is this interpreter (same packages)."""
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


@pytest.fixture(params=sorted(DOCKERFILES), ids=lambda kind: kind)
def dockerfile(request) -> Dockerfile:
    return read_dockerfile(DOCKERFILES[request.param])


def test_image_runs_as_a_non_root_user(dockerfile):
    user = dockerfile.final.one("USER").split(":")[0]
    assert user not in ("root", "0") and user.isdigit()  # numeric: runAsNonRoot can verify it


def test_image_healthcheck_is_a_grpc_health_check(dockerfile):
    assert healthcheck_command(dockerfile.final)[:3] == ["python", "-m", "serving.healthcheck"]


def test_image_exposes_the_grpc_and_metrics_ports_it_configures(dockerfile):
    env = dockerfile.final.env()
    exposed = set(dockerfile.final.one("EXPOSE").split())
    assert exposed == {env["CIFAR10_PORT"], env["CIFAR10_METRICS_PORT"]}


def test_image_binds_grpc_and_metrics_on_every_interface(dockerfile):
    env = dockerfile.final.env()
    assert env["CIFAR10_HOST"] == "0.0.0.0" and env["CIFAR10_METRICS_HOST"] == "0.0.0.0"


def test_image_bases_are_pinned_to_versions(dockerfile):
    stage_names = {stage.name for stage in dockerfile.stages}
    for stage in dockerfile.stages:
        if stage.base not in stage_names:
            assert PINNED_TAG.match(dockerfile.resolve(stage.base)), stage.base


def test_image_env_names_exist_in_the_server_config(dockerfile):
    names = {name for name in dockerfile.final.env() if name.startswith("CIFAR10_")}
    assert names and names <= CONFIG_ENV_NAMES, names - CONFIG_ENV_NAMES


def test_image_bakes_the_models_where_the_server_looks(dockerfile):
    copies = [text.split() for text in dockerfile.final.all("COPY") if not text.startswith("--from")]
    destinations = {source.rstrip("/"): dest.rstrip("/") for source, dest in copies}
    assert destinations["models"] == dockerfile.final.env()["CIFAR10_MODEL_REPOSITORY"]


def test_image_installs_dependencies_only_with_the_constraints(dockerfile):
    installs = [run for stage in dockerfile.stages for run in stage.all("RUN") if "pip install" in run]
    assert installs
    for run in installs:
        for command in run.split("&&"):
            if "pip install" in command:
                assert "-c constraints.txt" in command, command


def test_build_context_admits_every_copied_path(dockerfile):
    # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile before the context's own.
    ignore = Path(f"{dockerfile.path}.dockerignore").read_text().splitlines()
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # an allow-list: nothing else (runs/, .venv/, data) enters the context
    for stage in dockerfile.stages:
        for text in stage.all("COPY"):
            if not text.startswith("--from"):
                *sources, _ = text.split()
                for source in sources:
                    assert source.rstrip("/") in admitted, source
                    assert (REPO_ROOT / source).exists(), source


def requirements_installed_by(image: Dockerfile) -> list[str]:
    """Runs the image's own `extra_requirements.py ...` step here and returns its list."""
    (run,) = [r for stage in image.stages for r in stage.all("RUN") if "extra_requirements.py" in r]
    argv = shlex.split(run.split(">")[0])[1:]  # the step's arguments, after its interpreter
    result = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return result.stdout.split()


def extra(name: str) -> list[str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def test_cpu_image_installs_exactly_the_serving_extra():
    assert requirements_installed_by(read_dockerfile(DOCKERFILES["cpu"])) == extra("serving")


def test_gpu_image_swaps_onnxruntime_for_the_pinned_onnxruntime_gpu():
    installed = requirements_installed_by(read_dockerfile(DOCKERFILES["gpu"]))
    expected = [r for r in extra("serving") if not r.startswith("onnxruntime==")] + extra("gpu")
    assert installed == expected
    (gpu_pin,) = extra("gpu")
    assert re.fullmatch(r"onnxruntime-gpu==[\d.]+", gpu_pin)
    assert f"{gpu_pin}\n" in (REPO_ROOT / "constraints.txt").read_text()


def test_gpu_image_runs_on_a_cuda_cudnn_runtime_base():
    gpu = read_dockerfile(DOCKERFILES["gpu"])
    bases = [gpu.resolve(stage.base) for stage in gpu.stages]
    assert any(re.match(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-", base) for base in bases)
    assert gpu.final.env()["CIFAR10_PROVIDERS"] == "cuda"


# ---- the image's command, run outside Docker ---------------------------------------------------

class ImageCommand(LoggedProcess):
    """ENTRYPOINT + CMD with the image's CIFAR10_* env, free ports and the repo's models/."""

    def __init__(self, image: Dockerfile, log_path: Path):
        stage = image.final
        self.env = {k: v for k, v in stage.env().items() if k.startswith("CIFAR10_")}
        self.port, self.metrics_port = free_port(), free_port()
        # Only what differs here: free ports, the repo's models/ for /models, and one onnxruntime
        # thread (the test machine has 2 cores shared with the rest of the suite).
        self.env.update(CIFAR10_PORT=str(self.port), CIFAR10_METRICS_PORT=str(self.metrics_port),
                        CIFAR10_MODEL_REPOSITORY=str(SHIPPED_MODELS), CIFAR10_INTRA_OP_THREADS="1")
        argv = exec_form(stage.one("ENTRYPOINT")) + exec_form(stage.one("CMD"))
        super().__init__(outside_docker(argv), log_path, self.child_env())

    def child_env(self, **overrides: str) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
        return {**inherited, **self.env, **overrides}

    def wait_serving(self, timeout: float = 90.0) -> None:
        self.wait_until("health SERVING", lambda: check(f"127.0.0.1:{self.port}", timeout_s=1)[0], timeout,
                        poll_s=0.2)


def run_healthcheck(image: Dockerfile, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    command = outside_docker(healthcheck_command(image.final)) + list(extra)
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def cpu_image() -> Dockerfile:
    return read_dockerfile(DOCKERFILES["cpu"])


@pytest.fixture(scope="module")
def container(cpu_image, tmp_path_factory):
    command = ImageCommand(cpu_image, tmp_path_factory.mktemp("container") / "server.log")
    try:
        command.wait_serving()
        yield command
    finally:
        command.stop()


def test_container_command_turns_serving_with_metrics_on_its_port(container):
    page = urllib.request.urlopen(f"http://127.0.0.1:{container.metrics_port}/metrics", timeout=5).read().decode()
    assert re.search(r"^classifier_serving 1\.0$", page, re.M)


def test_container_command_logs_json(container):
    first = container.log_path.read_text().splitlines()[0]
    assert isinstance(json.loads(first), dict)


def test_healthcheck_command_passes_against_the_serving_container(cpu_image, container):
    result = run_healthcheck(cpu_image, container.child_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout


def test_healthcheck_command_fails_against_a_dead_port(cpu_image, container):
    result = run_healthcheck(cpu_image, container.child_env(CIFAR10_PORT=str(free_port())))
    assert result.returncode == 1, result.stdout + result.stderr


def test_healthcheck_fails_for_an_unknown_service(cpu_image, container):
    result = run_healthcheck(cpu_image, container.child_env(), "--service", "no.such.Service")
    assert result.returncode == 1 and "NOT_FOUND" in result.stdout


def test_healthcheck_fails_while_the_server_is_not_serving(start_server, tmp_path):
    empty = start_server(repository=tmp_path, wait_ready=False)  # no model: stays NOT_SERVING
    deadline = time.monotonic() + 30
    while "NOT_SERVING" not in (seen := check(empty.target, timeout_s=1)[1]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert seen == "NOT_SERVING"
    result = subprocess.run([sys.executable, "-m", "serving.healthcheck", "--target", empty.target],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout


# ---- compose -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_cli_available() -> bool:
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not compose_cli_available(), reason="no `docker compose` plugin here (structure is checked below)")
def test_compose_file_passes_docker_compose_config():
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_builds_the_classifier_from_the_cpu_dockerfile(compose):
    build = compose["services"]["classifier"]["build"]
    assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["cpu"]


def compose_default(value: str) -> str:
    """`${VARIABLE:-default}` as compose reads it with VARIABLE unset."""
    return re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", value)


def test_compose_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = compose_default(service["image"])
        assert PINNED_TAG.match(image) or "build" in service, name
        assert not image.endswith(":latest"), name


def test_compose_image_defaults_are_the_ones_engine_py_tries_first(compose):
    # docker/engine.py pulls these defaults and builds local stand-ins only when that fails.
    for variable, service in (("PROMETHEUS_IMAGE", "prometheus"), ("GRAFANA_IMAGE", "grafana")):
        image = compose["services"][service]["image"]
        assert image.startswith(f"${{{variable}:-"), service
        assert compose_default(image) == engines.compose_default(variable)


def test_compose_ports_bind_to_loopback_with_overridable_host_ports(compose):
    for name, service in compose["services"].items():
        for mapping in service["ports"]:
            assert re.fullmatch(r"127\.0\.0\.1:\$\{\w+_PORT:-\d+\}:\d+", mapping), (name, mapping)


def test_compose_services_set_their_ulimits(compose):
    # Podman asks for a million open files by default, which some sandboxes refuse.
    for name, service in compose["services"].items():
        assert {"nofile", "nproc"} <= set(service["ulimits"]), name


def test_compose_env_names_exist_in_the_server_config(compose):
    names = set(compose["services"]["classifier"]["environment"])
    assert names <= CONFIG_ENV_NAMES, names - CONFIG_ENV_NAMES


def test_compose_bind_mounts_exist(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {volume}"


def test_compose_prometheus_scrapes_the_classifier_metrics_port(compose, cpu_image):
    prometheus_dir = COMPOSE_FILE.parent / compose["services"]["prometheus"]["volumes"][0].split(":")[0]
    config = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"classifier:{cpu_image.final.env()['CIFAR10_METRICS_PORT']}"]
    assert all((prometheus_dir / rules).exists() for rules in config["rule_files"])


def test_compose_grafana_provisions_the_dashboards_datasource(compose):
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    provisioning = COMPOSE_FILE.parent / next(s for s, d in mounts.items() if d == "/etc/grafana/provisioning")
    dashboards = COMPOSE_FILE.parent / next(s for s, d in mounts.items() if d == "/var/lib/grafana/dashboards")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "cifar10.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((dashboards / "cifar10-serving.json").read_text())
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}  # rows have none
    assert used == {datasource["uid"]}


def test_compose_waits_longer_than_the_server_drains(compose):
    classifier = compose["services"]["classifier"]
    drain = float(classifier["environment"]["CIFAR10_GRACE_PERIOD_S"])
    assert float(classifier["stop_grace_period"].rstrip("s")) > drain


# ---- Kubernetes ----------------------------------------------------------------------------------

def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def kustomize_resources(directory: Path) -> list[Path]:
    return [directory / entry for entry in load_yaml(directory / "kustomization.yaml")["resources"]]


def strategic_merge(base, patch):
    """Kubernetes' strategic merge for what our patches use: maps merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in base + patch):
        by_name = {item["name"]: item for item in base}
        for item in patch:
            by_name[item["name"]] = strategic_merge(by_name[item["name"]], item) if item["name"] in by_name else item
        return list(by_name.values())
    return copy.deepcopy(patch)


def objects(kind: str, directory: Path = K8S_DIR) -> list[dict]:
    found = [load_yaml(path) for path in kustomize_resources(directory) if path.is_file()]
    return [obj for obj in found if obj["kind"] == kind]


@pytest.fixture(scope="module")
def deployment() -> dict:
    (found,) = objects("Deployment")
    return found


@pytest.fixture(scope="module")
def gpu_deployment(deployment) -> dict:
    overlay = K8S_DIR / "gpu"
    (patch_entry,) = load_yaml(overlay / "kustomization.yaml")["patches"]
    return strategic_merge(deployment, load_yaml(overlay / patch_entry["path"]))


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.mark.parametrize("directory", ["", "monitoring", "gpu"])
def test_kustomizations_list_only_existing_files(directory):
    root = K8S_DIR / directory
    kustomization = load_yaml(root / "kustomization.yaml")
    for path in kustomize_resources(root):
        assert path.exists(), path
    for patch in kustomization.get("patches", []):
        assert (root / patch["path"]).is_file(), patch


@pytest.mark.parametrize("path", sorted(p.name for p in kustomize_resources(K8S_DIR)))
def test_manifest_is_valid_against_the_kubernetes_schema(path):
    kubernetes_validate.validate(load_yaml(K8S_DIR / path), K8S_VERSION, strict=True)


def test_gpu_overlay_yields_a_valid_deployment(gpu_deployment):
    kubernetes_validate.validate(gpu_deployment, K8S_VERSION, strict=True)


def test_schema_validation_rejects_a_malformed_deployment(deployment):
    broken = copy.deepcopy(deployment)
    container_of(broken)["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_probes_are_native_grpc_on_the_grpc_port(deployment):
    container = container_of(deployment)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe


def test_deployment_ports_match_the_image(deployment, cpu_image):
    ports = {p["name"]: str(p["containerPort"]) for p in container_of(deployment)["ports"]}
    env = cpu_image.final.env()
    assert ports == {"grpc": env["CIFAR10_PORT"], "metrics": env["CIFAR10_METRICS_PORT"]}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_termination_grace_covers_prestop_and_server_drain(variant, deployment, gpu_deployment):
    chosen = deployment if variant == "cpu" else gpu_deployment
    container = container_of(chosen)
    drain = float(env_of(container).get("CIFAR10_GRACE_PERIOD_S", ServerConfig.grace_period_s))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert chosen["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deployment_env_names_exist_in_the_server_config(variant, deployment, gpu_deployment):
    names = set(env_of(container_of(deployment if variant == "cpu" else gpu_deployment)))
    assert names <= CONFIG_ENV_NAMES, names - CONFIG_ENV_NAMES


def test_deployment_sets_requests_and_limits(deployment):
    resources = container_of(deployment)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_runtime_threads_match_the_cpu_limit(deployment):
    container = container_of(deployment)
    assert env_of(container)["CIFAR10_INTRA_OP_THREADS"] == container["resources"]["limits"]["cpu"]


def test_gpu_overlay_requests_a_gpu_and_requires_it(gpu_deployment):
    container = container_of(gpu_deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(container)["CIFAR10_REQUIRE_GPU"] == "true"
    images = load_yaml(K8S_DIR / "gpu" / "kustomization.yaml")["images"]
    assert [(i["name"], i["newTag"]) for i in images] == [(container["image"], "gpu")]


def test_services_select_the_deployments_pods(deployment):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in container_of(deployment)["ports"]}
    services = objects("Service")
    assert len(services) == 2
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert [s["spec"].get("clusterIP") for s in services].count("None") == 1


def test_hpa_scales_the_deployment(deployment):
    (hpa,) = objects("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 < hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_service_monitor_scrapes_the_services_metrics_port():
    (monitor,) = objects("ServiceMonitor", K8S_DIR / "monitoring")
    (endpoint,) = monitor["spec"]["endpoints"]
    scraped = [s for s in objects("Service")
               if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
               and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
    assert [s["metadata"]["name"] for s in scraped] == ["cifar10-classifier"]  # = the alerts' job label


def test_pod_monitor_scrapes_the_pods_metrics_port(deployment):
    monitor = load_yaml(K8S_DIR / "monitoring" / "podmonitor.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container_of(deployment)["ports"]}
    assert pod_labels[monitor["spec"]["jobLabel"]] == "cifar10-classifier"


def test_prometheus_rule_carries_the_shipped_alert_rules():
    (rule,) = objects("PrometheusRule", K8S_DIR / "monitoring")
    assert rule["spec"]["groups"] == load_yaml(DOCKER_DIR / "prometheus" / "alerts.yml")["groups"]
