"""Prometheus metrics of the service. The registry is passed in (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

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
            "requests_total", "RPCs answered, by method, gRPC status code, protocol and model",
            ["method", "code", "protocol", "model"], namespace=NAMESPACE, registry=registry,
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
