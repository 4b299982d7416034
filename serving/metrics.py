"""Prometheus metrics of the service. The registry is passed in (tests use a fresh one)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.drift import DriftWindow

# *_created series double the page and no dashboard uses them.
disable_created_metrics()

NAMESPACE = "classifier"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            "requests_total", "RPCs answered, by method, gRPC status code, protocol, model and the version "
            "that answered (empty when none was chosen)",
            ["method", "code", "protocol", "model", "version"], namespace=NAMESPACE, registry=registry,
        )
        self.routed = Counter(
            "routed_requests_total", "Requests routed to a model version, by how it was chosen: version (a number), "
            "label (a version label), split (the traffic policy), newest (no policy)",
            ["model", "version", "route"], namespace=NAMESPACE, registry=registry,
        )
        self.request_latency = Histogram(
            "request_duration_seconds", "RPC latency from handler entry to answer",
            ["method", "code", "protocol"], buckets=LATENCY_BUCKETS, namespace=NAMESPACE, registry=registry,
        )
        self.phase_latency = Histogram(
            "phase_duration_seconds",
            "Time per request phase: decode, queue_wait, inference, postprocess; explain_wait, explain (Explain only)",
            ["phase", "model", "version"], buckets=LATENCY_BUCKETS, namespace=NAMESPACE, registry=registry,
        )
        self.batch_size = Histogram(
            "batch_size", "Images per onnxruntime run, as the dynamic batcher formed them",
            ["model", "version"], buckets=BATCH_BUCKETS, namespace=NAMESPACE, registry=registry,
        )
        self.images = Counter(
            "images_classified_total", "Images classified, by model version and predicted (top-1) class",
            ["model", "version", "predicted_class"], namespace=NAMESPACE, registry=registry,
        )
        self.inflight = Gauge(
            "inflight_requests", "RPCs being handled now", ["protocol"], namespace=NAMESPACE, registry=registry,
        )
        self.queue_depth = Gauge(
            "queue_depth_images", "Images waiting in the batcher queue", ["model", "version"],
            namespace=NAMESPACE, registry=registry,
        )
        self.queue_capacity = Gauge(
            "queue_capacity_images", "Queue bound (--max-queue-size) per model version", ["model", "version"],
            namespace=NAMESPACE, registry=registry,
        )
        self.dropped = Counter(
            "dropped_requests_total", "Queued requests never computed: deadline_exceeded or cancelled",
            ["model", "version", "reason"], namespace=NAMESPACE, registry=registry,
        )
        self.rejections = Counter(
            "rejected_requests_total", "Requests refused, by reason (invalid input kinds, queue_full, ...)",
            ["reason", "protocol"], namespace=NAMESPACE, registry=registry,
        )
        self.model_info = Gauge(
            "model_info", "1 per loaded model version, with its sha256 and the execution provider it runs on",
            ["model", "version", "sha256", "provider"], namespace=NAMESPACE, registry=registry,
        )
        self.model_on_gpu = Gauge(
            "model_gpu", "1 when the model version runs on a GPU provider, 0 on CPU", ["model", "version"],
            namespace=NAMESPACE, registry=registry,
        )
        self.gpu_required = Gauge(
            "gpu_required", "1 when --require-gpu is set", namespace=NAMESPACE, registry=registry,
        )
        self.model_loads = Counter(
            "model_loads_total", "Model versions loaded and warmed up", ["model"], namespace=NAMESPACE, registry=registry,
        )
        self.model_load_failures = Counter(
            "model_load_failures_total", "Model versions that failed to load", ["model"],
            namespace=NAMESPACE, registry=registry,
        )
        self.model_load_seconds = Histogram(
            "model_load_duration_seconds", "Load plus warm-up time of a model version", ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), namespace=NAMESPACE, registry=registry,
        )
        self.serving = Gauge(
            "serving", "1 while health is SERVING", namespace=NAMESPACE, registry=registry,
        )
        self.unsure = Counter(
            "unsure_total", "Answers flagged unsure (at the threshold that answered: the model's or the request's)",
            ["model", "version"], namespace=NAMESPACE, registry=registry,
        )
        self.drift = DriftCollector()
        registry.register(self.drift)
        # Rollouts: the config in force, and the shadow's comparison with the version that answered.
        self.repository_config_ok = Gauge(
            "repository_config_ok", "1 when the repository config file on disk is in force; 0 when it was "
            "rejected (the last good config stays in force; the log says why)", namespace=NAMESPACE, registry=registry,
        )
        self.version_labels = Gauge(
            "version_label", "1 per version label in force, naming the version it points to",
            ["model", "label", "version"], namespace=NAMESPACE, registry=registry,
        )
        self.traffic_percent = Gauge(
            "traffic_percent", "Configured share (%) of the requests naming no version, per model version "
            "(no series: no split, the newest version takes them all)",
            ["model", "version"], namespace=NAMESPACE, registry=registry,
        )
        self.shadow_percent = Gauge(
            "shadow_sample_percent", "Configured percent of a model's answered requests copied to its shadow version",
            ["model", "shadow"], namespace=NAMESPACE, registry=registry,
        )
        self.shadow_agreement = Gauge(
            "shadow_agreement_ratio", "Top-1 agreement of the shadow version with the version that answered, over "
            "the last --shadow-window-images images compared", ["model", "primary", "shadow"],
            namespace=NAMESPACE, registry=registry,
        )
        self.shadow_confidence_shift = Gauge(
            "shadow_confidence_shift", "Mean top-1 probability of the shadow minus that of the version that "
            "answered, over the same window (negative: the shadow is less sure)", ["model", "primary", "shadow"],
            namespace=NAMESPACE, registry=registry,
        )
        self.shadow_compared = Counter(
            "shadow_compared_images_total", "Images answered by the primary and by its shadow, compared",
            ["model", "primary", "shadow"], namespace=NAMESPACE, registry=registry,
        )
        self.shadow_agreed = Counter(
            "shadow_agreed_images_total", "Compared images on which the shadow's top-1 class was the primary's",
            ["model", "primary", "shadow"], namespace=NAMESPACE, registry=registry,
        )
        self.shadow_latency = Histogram(
            "shadow_duration_seconds", "Shadow copy from hand-off to the shadow's answer (queue and inference, off "
            "the caller's path)", ["model", "shadow"], buckets=LATENCY_BUCKETS, namespace=NAMESPACE, registry=registry,
        )
        self.shadow_dropped = Counter(
            "shadow_dropped_images_total", "Sampled images never compared: budget (--shadow-max-inflight-images "
            "reached), load (the primary was busy: --shadow-drop-queue-images), stale (waited too long), "
            "unavailable, failed",
            ["model", "shadow", "reason"], namespace=NAMESPACE, registry=registry,
        )
        self.explain_queue_depth = Gauge(
            "explain_queue_depth", "Explain requests waiting for an explanation worker (--max-queued-explanations)",
            namespace=NAMESPACE, registry=registry,
        )
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, remembered. A request makes ~8 of these calls on the event loop,
        and each costs ~1 µs (a lock, a tuple, checks) where the lookup costs ~0.2. Only for series
        that are never removed: a removed series would live on here, unexported."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observer_for(self, model: str, version: int) -> "BatchMetrics":
        return BatchMetrics(self, model, str(version))

    def model_loaded(self, model: str, version: int, sha256: str, providers: list[str], on_gpu: bool) -> None:
        self.model_info.labels(model, str(version), sha256, providers[0]).set(1)
        self.model_on_gpu.labels(model, str(version)).set(1 if on_gpu else 0)

    def rollout_in_force(self, rollouts: dict) -> None:
        """The labels, traffic shares and shadow percents of the config just put in force
        ({model: ModelRollout}); the series of the previous config go."""
        for gauge in (self.version_labels, self.traffic_percent, self.shadow_percent):
            gauge.clear()
        for model, rollout in rollouts.items():
            for label, version in rollout.labels.items():
                self.version_labels.labels(model, label, str(version)).set(1)
            for share in rollout.traffic:
                self.traffic_percent.labels(model, str(share.version)).set(share.percent)
            if rollout.shadow is not None:
                self.shadow_percent.labels(model, str(rollout.shadow.version)).set(rollout.shadow.percent)

    def model_unloaded(self, model: str, version: int, sha256: str, providers: list[str]) -> None:
        for gauge, labels in (
            (self.model_info, (model, str(version), sha256, providers[0])),
            (self.model_on_gpu, (model, str(version))),
            (self.queue_depth, (model, str(version))),
            (self.queue_capacity, (model, str(version))),
        ):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass


class DriftCollector(Collector):
    """The drift windows of the served versions, scored when Prometheus scrapes (serving/drift.py).

    A version without a reference in its card has no drift series; every family is still
    exported (help and type) so dashboards and alerts find it.
    """

    def __init__(self):
        self._windows: dict[tuple[str, str], DriftWindow] = {}
        self._lock = threading.Lock()

    def add(self, model: str, version: int, window: DriftWindow) -> None:
        with self._lock:
            self._windows[(model, str(version))] = window

    def remove(self, model: str, version: int, window: DriftWindow) -> None:
        with self._lock:
            if self._windows.get((model, str(version))) is window:
                del self._windows[(model, str(version))]

    def collect(self):
        scores = GaugeMetricFamily(
            f"{NAMESPACE}_drift_score",
            "Jensen-Shannon divergence (base 2, 0..1) between the recent window and the validation profile "
            "in the model card, per signal",
            labels=["model", "version", "signal"])
        unsure = GaugeMetricFamily(
            f"{NAMESPACE}_drift_window_unsure_ratio", "Share of the recent window's images flagged unsure "
            "at the model's own threshold", labels=["model", "version"])
        images = GaugeMetricFamily(
            f"{NAMESPACE}_drift_window_images", "Images in the recent window (at most --drift-window)",
            labels=["model", "version"])
        with self._lock:
            windows = list(self._windows.items())
        for (model, version), window in windows:
            filled, unsure_share, per_signal = window.snapshot()
            images.add_metric([model, version], filled)
            unsure.add_metric([model, version], unsure_share)
            for signal, value in per_signal.items():
                scores.add_metric([model, version, signal], value)
        return [scores, unsure, images]


class BatchMetrics:
    """The batcher's observer for one model version."""

    def __init__(self, metrics: ServingMetrics, model: str, version: str):
        self._batch = metrics.batch_size.labels(model, version)
        self._depth = metrics.queue_depth.labels(model, version)
        self._dropped = {r: metrics.dropped.labels(model, version, r) for r in ("deadline_exceeded", "cancelled")}

    def batch_ran(self, size: int, inference_s: float) -> None:
        self._batch.observe(size)

    def queue_depth(self, images: int) -> None:
        self._depth.set(images)

    def dropped(self, reason: str, requests: int) -> None:
        self._dropped[reason].inc(requests)


def serve_metrics(host: str, port: int, registry: CollectorRegistry):
    """Start the /metrics HTTP endpoint; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=registry)
