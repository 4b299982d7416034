"""docker/compose.yaml brought up by a real engine (make test-container; marker `container`).

`docker/engine.py compose up` (what `make compose-up` runs) starts the stack under a project of
its own on free loopback ports; Prometheus is the official image where it can be pulled, else
Debian's package on the local base. Grafana runs where its image can be had; its test says why
when it cannot.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

from serving.healthcheck import check
from tests.conftest import free_port
from tests.containers import built, engines
from tests.harness import log_dir
from tests.test_deploy import DOCKER_DIR
from tests.test_soak import wait_for

pytestmark = pytest.mark.container

PORT_VARIABLES = ("CLASSIFIER_GRPC_PORT", "CLASSIFIER_METRICS_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")


@dataclass
class Stack:
    ports: dict[str, str]  # as compose reads them, from the environment
    started: engines.ComposeStack

    def get(self, port_variable: str, path: str) -> dict:
        url = f"http://127.0.0.1:{self.ports[port_variable]}{path}"
        return json.loads(urllib.request.urlopen(url, timeout=10).read())

    def prometheus(self, path: str) -> dict:
        answer = self.get("PROMETHEUS_PORT", path)
        assert answer["status"] == "success", answer
        return answer["data"]


@pytest.fixture(scope="module")
def stack(container_engine, built_cpu_image):
    ports = {variable: str(free_port()) for variable in PORT_VARIABLES}
    project = f"cifar10-test-{secrets.token_hex(4)}"
    try:
        # The image is the one built_cpu_image built; compose only starts containers from it.
        yield Stack(ports, built("compose-up", lambda out: engines.compose(
            container_engine, "up", out, project=project, env=ports, build_image=False)))
    finally:
        with open(log_dir() / f"{project}-down.log", "w") as out:
            engines.compose(container_engine, "down", out, project=project, env=ports)


def scraped_targets(stack: Stack) -> list[dict]:
    try:
        return stack.prometheus("/api/v1/targets")["activeTargets"]
    except OSError:
        return []  # Prometheus still starting


def test_prometheus_scrapes_the_classifier_through_compose_dns(stack):
    assert wait_for(lambda: [t["health"] for t in scraped_targets(stack)] == ["up"], timeout=90), \
        scraped_targets(stack)
    (target,) = scraped_targets(stack)
    assert target["labels"]["job"] == "cifar10-classifier" and target["scrapeUrl"] == "http://classifier:9090/metrics"
    (serving,) = stack.prometheus("/api/v1/query?query=classifier_serving")["result"]
    assert serving["value"][1] == "1"


def test_prometheus_loaded_the_alert_rules(stack):
    shipped = yaml.safe_load((DOCKER_DIR / "prometheus" / "alerts.yml").read_text())["groups"]
    assert wait_for(lambda: bool(stack.prometheus("/api/v1/rules")["groups"]), timeout=60)
    loaded = stack.prometheus("/api/v1/rules")["groups"]
    assert [[r["name"] for r in g["rules"]] for g in loaded] == [[r["alert"] for r in g["rules"]] for g in shipped]


def test_classifier_turns_serving_on_its_published_port(stack):
    target = f"127.0.0.1:{stack.ports['CLASSIFIER_GRPC_PORT']}"
    assert wait_for(lambda: check(target, timeout_s=1)[0], timeout=60), check(target, timeout_s=1)


def test_grafana_serves_the_provisioned_dashboard(stack):
    if "grafana" in stack.started.skipped:
        pytest.skip(f"Grafana not started: {stack.started.skipped['grafana']}")
    assert wait_for(lambda: _grafana_healthy(stack), timeout=90)
    dashboard = json.loads((DOCKER_DIR / "grafana" / "dashboards" / "cifar10-serving.json").read_text())
    found = stack.get("GRAFANA_PORT", "/api/search?query=" + urllib.request.quote(dashboard["title"]))
    assert [d["uid"] for d in found] == [dashboard["uid"]]


def _grafana_healthy(stack: Stack) -> bool:
    try:
        return stack.get("GRAFANA_PORT", "/api/health").get("database") == "ok"
    except OSError:
        return False
