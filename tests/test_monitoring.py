"""The shipped Prometheus config, alert rules and Grafana dashboard against a real Prometheus.

One server (the shipped model, a second version of it with a rollout config that splits traffic
and shadows, plus a deliberately broken model) is scraped every second by a real
Prometheus (Debian's `prometheus`) loaded with docker/prometheus/prometheus.yml and alerts.yml;
known traffic, including client and server errors, is driven through it; then every PromQL
expression of the dashboard and of the alert rules is run through Prometheus's HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from tests.conftest import DEFAULT_MODEL, REPO_ROOT, SHIPPED_MODELS, ServerProcess, free_port, raw_image
from tests.harness import LoggedProcess
from training import data as cifar

PROMETHEUS_DIR = REPO_ROOT / "docker" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERT_RULES = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "cifar10-serving.json"
BROKEN_MODEL = "broken"
DRIFT_ALERT_THRESHOLD = 0.1  # ClassifierInputDrift's (alerts.yml)
# What Grafana would put in place of its variables; any window covering the traffic works.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "5m", "$instance": ".*"}


def required_binary(name: str) -> str:
    """Path of a Prometheus tool: its absence fails in CI (.ci/run installs it) and skips elsewhere."""
    found = shutil.which(name)
    if found is None:
        message = f"`{name}` not found: apt-get install prometheus (done by .ci/run)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


# ---- PromQL helpers ----------------------------------------------------------------------------

SET_OPERATORS = ("or", "and", "unless")
MATCHING_MODIFIER = re.compile(r"^\s*(on|ignoring)\s*\([^)]*\)\s*(?:(group_left|group_right)\s*(\([^)]*\))?)?", re.S)
TRAILING_THRESHOLD = re.compile(r"^(.*?)\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?[0-9.]+(e[+-]?[0-9]+)?\s*$", re.S)


def top_level_split(expr: str) -> list[tuple[str, str]]:
    """[(operator before it or '', operand)] split at set operators outside brackets and quotes."""
    parts: list[tuple[str, str]] = []
    depth, quote, start, operator, i = 0, "", 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            quote = "" if char == quote and expr[i - 1] != "\\" else quote
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            word = re.match(r"\b(or|and|unless)\b", expr[i:]) if (i == 0 or not expr[i - 1].isalnum()) else None
            if word and expr[i - 1:i].isspace():
                parts.append((operator, expr[start:i]))
                operator, start = word.group(1), i + len(word.group(1))
                i = start
                continue
        i += 1
    parts.append((operator, expr[start:]))
    return parts


def strip_outer_parentheses(expr: str) -> str:
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, char in enumerate(expr):
            depth += char == "("
            depth -= char == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr  # the first "(" closes before the end: not one wrapping pair
        expr = expr[1:-1].strip()
    return expr


def inner_expressions(expr: str, must_have_data: bool = True) -> list[tuple[str, bool]]:
    """The operands of an alert expression without their thresholds, with whether each must
    return data for known traffic (the right side of `unless` is an exclusion: it may be empty)."""
    operands = top_level_split(strip_outer_parentheses(expr))
    if len(operands) == 1:
        bare = strip_outer_parentheses(expr)
        threshold = TRAILING_THRESHOLD.match(bare)
        if threshold is None:
            return [(bare, must_have_data)]
        return inner_expressions(threshold.group(1), must_have_data)
    found = []
    for operator, operand in operands:
        operand = MATCHING_MODIFIER.sub("", operand)
        found += inner_expressions(operand, must_have_data and operator != "unless")
    return found


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_expressions() -> list[tuple[str, str]]:
    """[(panel title / refId, PromQL)] of every target of every panel, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [*dashboard["panels"], *[p for row in dashboard["panels"] for p in row.get("panels", [])]]
    return [(f"{p['title']}/{t['refId']}", t["expr"]) for p in panels for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]


# ---- a real Prometheus scraping a real server ----------------------------------------------------

class PrometheusProcess(LoggedProcess):
    name = "prometheus"

    def __init__(self, workdir: Path, metrics_target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(ALERT_RULES)]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [metrics_target]}]
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.job = job["job_name"]
        super().__init__(
            [required_binary("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            workdir / "prometheus.log",
        )

    def get(self, path: str, **params: str) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 422):  # PromQL errors come back as JSON
                return json.loads(exc.read())
            raise

    def wait_ready(self) -> None:
        """Until /-/ready answers 200: before that the query API answers 503 (storage not open yet)."""
        def ready() -> bool:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=10) as reply:
                return reply.status == 200
        self.wait_until("ready", ready)

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def scrapes(self) -> float:
        """Samples of `up` for the job seen so far (grows by one per scrape)."""
        result = self.query(f'count_over_time(up{{job="{self.job}"}}[10m])')["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def wait_scrapes(self, count: int) -> None:
        target = self.scrapes() + count
        self.wait_until(f"{count} more scrapes", lambda: self.scrapes() >= target)


def repository_with_broken_model(root: Path) -> Path:
    """The shipped models plus a model whose only version cannot load (garbage ONNX), and a rollout:
    the default model's v1 and v2 labelled stable and canary, unnamed requests split 50/50, every
    answer of v1 shadowed by v2 (docs/rollouts.md)."""
    repo = root / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    broken = repo / BROKEN_MODEL / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    shutil.copy(next((SHIPPED_MODELS / DEFAULT_MODEL).glob("*/model_card.json")), broken / "model_card.json")
    rollout = {"labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 50, "canary": 50},
               "shadow": {"version": "canary", "percent": 100}}
    (repo / "repository.json").write_text(json.dumps({"models": {DEFAULT_MODEL: rollout}}))
    return repo


def drive_known_traffic(server: ServerProcess, images) -> None:
    """OK calls on every API and both versions, plus client errors (bad image, unknown model) and a
    server-side UNAVAILABLE (the broken model)."""
    for pixels in images[:6]:
        server.stub.Classify(pb.ClassifyRequest(image=raw_image(pixels)), timeout=10)
    for label in ("stable", "canary"):
        server.stub.Classify(pb.ClassifyRequest(image=raw_image(images[0]), version_label=label), timeout=10)
    server.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[raw_image(p) for p in images[6:14]]), timeout=10)
    list(server.stub.ClassifyStream(iter([pb.ClassifyRequest(image=raw_image(p)) for p in images[14:18]]), timeout=10))
    failing = [
        (pb.ClassifyRequest(image=pb.Image(encoded=b"not an image")), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ClassifyRequest(image=raw_image(images[0]), model_name="no-such-model"), grpc.StatusCode.NOT_FOUND),
        (pb.ClassifyRequest(image=raw_image(images[0]), model_name=BROKEN_MODEL), grpc.StatusCode.UNAVAILABLE),
    ]
    for request, code in failing:
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Classify(request, timeout=10)
        assert error.value.code() == code


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, test_slice):
    """A Prometheus that has scraped the server before, between and after two rounds of traffic."""
    required_binary("prometheus")
    workdir = tmp_path_factory.mktemp("monitoring")
    server = ServerProcess(repository=repository_with_broken_model(workdir))
    prom = PrometheusProcess(workdir, f"127.0.0.1:{server.metrics_port}")
    try:
        prom.wait_ready()
        prom.wait_until("first scrape", lambda: prom.scrapes() >= 1)
        for _ in range(2):
            drive_known_traffic(server, test_slice.images)
            prom.wait_scrapes(3)
        yield prom
    finally:
        prom.stop()
        server.stop()


def assert_valid(prom: PrometheusProcess, expr: str, needs_data: bool) -> None:
    reply = prom.query(expr)
    assert reply["status"] == "success", f"{expr}\n-> {reply.get('errorType')}: {reply.get('error')}"
    if needs_data:
        assert reply["data"]["result"], f"no data for:\n{expr}"


# ---- tests ---------------------------------------------------------------------------------------

def test_promtool_accepts_the_shipped_config():
    result = subprocess.run([required_binary("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_shipped_alert_rules():
    result = subprocess.run([required_binary("promtool"), "check", "rules", str(ALERT_RULES)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout


def test_every_required_alert_is_defined():
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {
        "ClassifierHighErrorRatio", "ClassifierHighLatencyP99", "ClassifierNotServing",
        "ClassifierRunningOnCpuWhenGpuRequired", "ClassifierModelLoadFailures", "ClassifierQueueSaturated",
        "ClassifierInputDrift",
        "ClassifierShadowDisagreement", "ClassifierRepositoryConfigRejected",
    }


def test_alert_inner_expressions_drop_thresholds_and_keep_unless_exclusions():
    """The helper the evaluation test relies on: proven on a shape each shipped rule uses."""
    assert inner_expressions('(a == 0) and on (job) (b{x="1"} == 1)') == [("a", True), ('b{x="1"}', True)]
    assert inner_expressions("increase(c[5m]) > 0 or (c > 0 unless c offset 15m)") == [
        ("increase(c[5m])", True), ("c", True), ("c offset 15m", False)]
    assert inner_expressions("(x or y * 0) / z > 0.05") == [("(x or y * 0) / z", True)]


def test_every_dashboard_query_parses_and_returns_data(prometheus):
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    for where, expr in expressions:
        reply = prometheus.query(grafana_to_promql(expr))
        assert reply["status"] == "success", f"{where}: {reply.get('error')}"
        assert reply["data"]["result"], f"{where}: no data for {expr}"


def test_dashboard_instance_variable_lists_the_scraped_server(prometheus):
    (variable,) = json.loads(DASHBOARD.read_text())["templating"]["list"]
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
    values = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric})["data"]
    assert len(values) == 1


def test_every_alert_expression_parses_and_evaluates(prometheus):
    for rule in alert_rules():
        assert_valid(prometheus, rule["expr"], needs_data=False)


def test_every_alert_inner_expression_returns_data(prometheus):
    for rule in alert_rules():
        inner = inner_expressions(rule["expr"])
        assert any(needs for _, needs in inner), rule["alert"]
        for expr, needs_data in inner:
            assert_valid(prometheus, expr, needs_data)


def test_prometheus_loads_and_evaluates_every_rule(prometheus):
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {rule["alert"] for rule in alert_rules()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_model_load_failure_alert_fires_for_the_broken_model(prometheus):
    def firing_models() -> set[str]:
        alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
        return {a["labels"].get("model") for a in alerts
                if a["labels"]["alertname"] == "ClassifierModelLoadFailures" and a["state"] == "firing"}

    prometheus.wait_until("ClassifierModelLoadFailures firing", lambda: BROKEN_MODEL in firing_models(), timeout=10)
    assert firing_models() == {BROKEN_MODEL}


def test_server_errors_show_in_the_error_ratio(prometheus):
    (rule,) = [r for r in alert_rules() if r["alert"] == "ClassifierHighErrorRatio"]
    ((ratio_expr, _),) = inner_expressions(rule["expr"])
    (sample,) = prometheus.query(ratio_expr)["data"]["result"]
    # 2 UNAVAILABLE among 2 * (6 + 2 labelled + 1 + 1 stream + 4 stream messages + 3 failing) RPCs, give or take
    # how the stream is counted: above 0 (the server errors count), below 1 (client errors do not).
    assert 0 < float(sample["value"][1]) < 0.25


# ---- drift: the default model's windows against its card's validation profile -------------------

DRIFT_WINDOW = 256  # the alert needs a window this full


@pytest.fixture(scope="module")
def drift_watch(tmp_path_factory):
    """A server with the shipped models (windows of DRIFT_WINDOW images), scraped every second."""
    required_binary("prometheus")
    workdir = tmp_path_factory.mktemp("drift")
    server = ServerProcess("--drift-window", str(DRIFT_WINDOW))
    prom = PrometheusProcess(workdir, f"127.0.0.1:{server.metrics_port}")
    try:
        prom.wait_ready()
        yield server, prom
    finally:
        prom.stop()
        server.stop()


def fill_window(server: ServerProcess, prom: PrometheusProcess, images) -> dict[str, float]:
    """Classify a whole window of `images`, wait for Prometheus to scrape it, and return the
    default model's drift score per signal."""
    assert len(images) == DRIFT_WINDOW
    reply = server.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[raw_image(p) for p in images]), timeout=60)
    version = reply.model_version
    prom.wait_scrapes(2)
    result = prom.query(f'classifier_drift_score{{model="{DEFAULT_MODEL}", version="{version}"}}')["data"]["result"]
    return {sample["metric"]["signal"]: float(sample["value"][1]) for sample in result}


def drift_alert_signals(prom: PrometheusProcess) -> set[str]:
    """The signals for which the ClassifierInputDrift expression is true now (before its `for`)."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "ClassifierInputDrift"]
    return {sample["metric"]["signal"] for sample in prom.query(rule["expr"])["data"]["result"]}


@pytest.fixture(scope="module")
def test_images(data_dir):
    return cifar.load_test(data_dir)


def test_clean_test_images_keep_every_drift_score_under_the_alert_threshold(drift_watch, test_images):
    server, prom = drift_watch
    scores = fill_window(server, prom, test_images.images[1000:1000 + DRIFT_WINDOW])
    assert set(scores) == {"predicted_class", "confidence", "unsure_score", "brightness", "contrast", "colourfulness"}
    assert max(scores.values()) < DRIFT_ALERT_THRESHOLD, scores
    assert drift_alert_signals(prom) == set()


def test_darkened_images_push_brightness_over_the_threshold_and_the_alert_expression_true(drift_watch, test_images):
    server, prom = drift_watch
    fill_window(server, prom, test_images.images[2000:2000 + DRIFT_WINDOW])
    darkened = (test_images.images[2000:2000 + DRIFT_WINDOW] * 0.35).astype(np.uint8)
    scores = fill_window(server, prom, darkened)
    assert scores["brightness"] > DRIFT_ALERT_THRESHOLD, scores
    assert "brightness" in drift_alert_signals(prom)


def test_a_single_class_stream_pushes_the_class_mix_over_the_threshold(drift_watch, test_images):
    server, prom = drift_watch
    fill_window(server, prom, test_images.images[3000:3000 + DRIFT_WINDOW])
    cats = test_images.images[test_images.labels == cifar.CLASS_NAMES.index("cat")][:DRIFT_WINDOW]
    scores = fill_window(server, prom, cats)
    assert scores["predicted_class"] > DRIFT_ALERT_THRESHOLD, scores
    assert scores["brightness"] < DRIFT_ALERT_THRESHOLD  # the right signal, not every signal
    assert "predicted_class" in drift_alert_signals(prom)


def test_noisy_images_push_the_unsure_score_and_colourfulness_over_the_threshold(drift_watch, test_images):
    server, prom = drift_watch
    fill_window(server, prom, test_images.images[4000:4000 + DRIFT_WINDOW])
    rng = np.random.default_rng(0)
    clean = test_images.images[4000:4000 + DRIFT_WINDOW].astype(float)
    noisy = np.clip(clean + rng.normal(0, 40, clean.shape), 0, 255).astype(np.uint8)
    scores = fill_window(server, prom, noisy)
    assert scores["unsure_score"] > DRIFT_ALERT_THRESHOLD and scores["colourfulness"] > DRIFT_ALERT_THRESHOLD, scores
    assert {"unsure_score", "colourfulness"} <= drift_alert_signals(prom)
