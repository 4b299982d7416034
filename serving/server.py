"""Assembles the service: gRPC server, API faces, health, reflection, metrics, lifecycle.

Shutdown order: health NOT_SERVING -> stop accepting -> drain in-flight -> release sessions.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dataclasses import replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from serving import wire
from serving.auth import BearerTokenInterceptor, load_tokens
from serving.calls import CallObserver
from serving.config import ServerConfig
from serving.errors import StartupError
from serving.explain import ExplanationService
from serving.event_loop import running_loop_name
from serving.metrics import ServingMetrics, serve_metrics
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc
from serving.repository import BatchingOptions, ModelRepository
from serving.runtime import RuntimeOptions
from serving.service import InferenceCore
from serving.shadow import ShadowDispatcher
from serving.servicer import PROTOCOL as NATIVE_PROTOCOL
from serving.servicer import SERVICE_NAME, ClassifierServicer
from serving.v2.servicer import PROTOCOL as V2_PROTOCOL
from serving.v2.servicer import SERVICE_NAME as V2_SERVICE_NAME
from serving.v2.servicer import OpenInferenceServicer

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def read_setting_file(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise StartupError(f"{flag} {path}: {exc.strerror or exc}") from None


class ClassifierServer:
    def __init__(self, config: ServerConfig, registry: CollectorRegistry | None = None):
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServingMetrics(self.registry)
        self.metrics.gpu_required.set(1 if config.require_gpu else 0)
        runtime = RuntimeOptions(config.providers, config.require_gpu, config.intra_op_threads,
                                 config.inter_op_threads, config.graph_optimization, config.intra_op_spinning)
        self.repository = ModelRepository(
            config.model_repository, runtime,
            BatchingOptions(config.max_batch_size, config.max_batch_delay_ms / 1000.0, config.max_queue_size),
            self.metrics, config.default_model, config.version_policy,
            Path(config.repository_config) if config.repository_config else None, config.drift_window,
        )
        shadows = ShadowDispatcher(self.metrics, config.shadow_max_inflight_images, config.shadow_drop_queue_images,
                                   config.shadow_window_images)
        self.core = InferenceCore(self.repository, self.metrics, shadows)
        self.explanations = ExplanationService(
            self.core, self.metrics, replace(runtime, intra_op_threads=config.explain_intra_op_threads),
            config.explain, config.max_concurrent_explanations, config.max_queued_explanations,
        )
        self.calls = CallObserver(self.metrics, config.access_log)
        self.health = HealthServicer()
        self.health_services = ["", SERVICE_NAME]
        # Repository scans load and warm models: never on the event loop.
        self._scan_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repository-scan")
        self._server: grpc.aio.Server | None = None
        self._metrics_server = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.port = 0

    def _grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.max_concurrent_streams", self.config.max_concurrent_streams),
            ("grpc.so_reuseport", 0),
        ]

    def add_services(self, server: grpc.aio.Server) -> list[str]:
        """Register every API face; returns the full service names for reflection and health."""
        classifier = ClassifierServicer(
            self.core, self.repository, self.calls, self.config.max_images_per_request,
            self.config.max_image_pixels, self.reload, self.explanations,
        )
        wire.register(classifier_pb2_grpc.add_ClassifierServicer_to_server, classifier, server, self.calls,
                      NATIVE_PROTOCOL)
        open_inference = OpenInferenceServicer(  # KServe V2 / Triton clients, same core and port
            self.core, self.repository, self.calls, self.config.max_images_per_request,
            self.config.max_image_pixels, self.reload, ready=lambda: not self._stopping and self.repository.ready(),
        )
        return [SERVICE_NAME, open_inference.register(server)]

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Bearer-token auth when any token is configured (a bad tokens file fails the start)."""
        tokens = load_tokens(self.config.auth_tokens_file, self.config.auth_tokens)
        if not tokens:
            return []
        log.info("bearer-token auth on (%d tokens; health checks %s)", len(tokens),
                 "need a token" if self.config.auth_health else "open")
        protocols = {SERVICE_NAME: NATIVE_PROTOCOL, V2_SERVICE_NAME: V2_PROTOCOL}
        return [BearerTokenInterceptor(tokens, self.metrics, protocols, self.config.auth_health)]

    def _bind(self, server: grpc.aio.Server) -> int:
        """Plaintext, TLS, or mutual TLS (a client CA makes a client certificate mandatory)."""
        address = f"{self.config.host}:{self.config.port}"
        if not self.config.tls_cert:
            return server.add_insecure_port(address)
        pair = (read_setting_file("--tls-key", self.config.tls_key), read_setting_file("--tls-cert", self.config.tls_cert))
        client_ca = read_setting_file("--tls-client-ca", self.config.tls_client_ca) if self.config.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        log.info("TLS on the gRPC port (%s)", "mutual: client certificates required" if client_ca else "server-only")
        return server.add_secure_port(address, credentials)

    async def start(self) -> int:
        server = grpc.aio.server(options=self._grpc_options(), interceptors=self._interceptors())
        names = self.add_services(server)
        self.health_services = ["", *names]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        for service in self.health_services:
            await self.health.set(service, NOT_SERVING)
        self.port = self._bind(server)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {self.config.host}:{self.config.port}")
        await server.start()
        self._server = server
        if self.config.metrics_enabled:
            self._metrics_server = serve_metrics(self.config.metrics_host, self.config.metrics_port, self.registry)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.config.metrics_port)
        log.info("gRPC listening on %s:%d, event loop %s (health NOT_SERVING until models are warm)",
                 self.config.host, self.port, running_loop_name())
        self._tasks.append(asyncio.ensure_future(self._initial_load()))
        return self.port

    async def _initial_load(self) -> None:
        await self.reload()
        if self.config.poll_interval_s > 0:
            self._tasks.append(asyncio.ensure_future(self._poll()))

    async def _poll(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - the poller must survive anything on disk
                log.exception("repository scan failed")

    async def reload(self) -> None:
        """Rescan the repository off the loop, then publish readiness."""
        await asyncio.get_running_loop().run_in_executor(self._scan_executor, self.repository.scan)
        await self._publish_health()

    async def _publish_health(self) -> None:
        if self._stopping:
            return
        ready = self.repository.ready()
        status = SERVING if ready else NOT_SERVING
        for service in self.health_services:
            await self.health.set(service, status)
        self.metrics.serving.set(1 if ready else 0)
        if not ready:
            log.warning("NOT_SERVING: %s", self.repository.not_ready_reason())

    async def stop(self, grace: float | None = None) -> None:
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.grace_period_s if grace is None else grace
        log.info("shutting down: health NOT_SERVING, draining for up to %.1fs", grace)
        await self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            await self._server.stop(grace)  # stops accepting, waits for in-flight calls
        await asyncio.get_running_loop().run_in_executor(None, self.explanations.close)
        await asyncio.get_running_loop().run_in_executor(None, self.repository.close)
        self._scan_executor.shutdown(wait=False)
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            server.server_close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


async def serve(config: ServerConfig) -> None:
    server = ClassifierServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload()))
    await stop_requested.wait()
    await server.stop()
