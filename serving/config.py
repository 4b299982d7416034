"""The server's configuration: one typed object, from CLI flags with env-var equivalents.

Every flag `--some-option` may also be given as `CIFAR10_SOME_OPTION`; a flag on the command
line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "CIFAR10_"
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
EVENT_LOOPS = ("uvloop", "asyncio")


@dataclass(frozen=True)
class ServerConfig:
    # Network
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090  # 0 disables the metrics endpoint
    # Models
    model_repository: Path = Path("models")
    default_model: str = "cifar10"
    version_policy: str = "latest:1"  # latest:N | all | specific:1,3
    poll_interval_s: float = 0.0  # 0 = no polling (ReloadModels RPC and SIGHUP still work)
    repository_config: str = ""  # "" = <model_repository>/repository.json (policies, labels, traffic, shadow)
    # Shadow traffic (docs/rollouts.md): its cost is bounded, its agreement measured over a window.
    shadow_max_inflight_images: int = 64
    shadow_drop_queue_images: int = 0  # 0: a copy goes only while the answering version is idle
    shadow_window_images: int = 1000
    # Runtime
    providers: str = "auto"
    require_gpu: bool = False
    intra_op_threads: int = 0  # 0 = one per available core
    inter_op_threads: int = 1
    # Spinning gives the lowest batch-1 latency; off hands the cores back between runs, for
    # servers whose cores are shared (measured in bench/NOTES.md: no throughput gain here).
    intra_op_spinning: bool = True
    graph_optimization: str = "all"
    # Batching and limits
    max_batch_size: int = 64  # 1 turns dynamic batching off
    max_batch_delay_ms: float = 0.0  # 0 = run whatever is queued as soon as the runtime is free
    max_queue_size: int = 1024  # images waiting across all requests of one model version
    max_images_per_request: int = 256
    max_image_pixels: int = 4096 * 4096  # decompression-bomb guard: checked before decoding
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_streams: int = 1000  # 100 refused streams (RST_STREAM 7) with 64 clients on one channel
    # Trust: the images each version's drift scores look back over (serving/drift.py)
    drift_window: int = 512
    # Explain (docs/explain.md): its own sessions, workers and queue, so it never holds up Classify
    explain: bool = True
    max_concurrent_explanations: int = 1
    max_queued_explanations: int = 8
    explain_intra_op_threads: int = 1  # one core per explanation: on 2 cores, Classify keeps the other
    # uvloop: +6% images/s at 16 clients against asyncio's own loop, the same at 1 (bench/NOTES.md)
    event_loop: str = "uvloop"
    # Security: TLS and bearer-token auth are off unless configured ("" = off)
    tls_cert: str = ""  # PEM server certificate chain; with tls_key turns TLS on
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    auth_tokens_file: str = ""  # one bearer token per line
    auth_tokens: str = ""  # comma-separated bearer tokens (meant for the env var, not the command line)
    auth_health: bool = False  # health checks need a token too (default: open for probes)
    # Lifecycle and logs
    grace_period_s: float = 10.0
    log_format: str = "text"  # text | json
    log_level: str = "INFO"
    access_log: bool = True

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port > 0


_HELP = {
    "host": "address the gRPC port binds to",
    "port": "gRPC port (0 picks a free one, logged at start)",
    "metrics_host": "address of the Prometheus /metrics endpoint (127.0.0.1: local only)",
    "metrics_port": "port of the /metrics endpoint; 0 disables it",
    "model_repository": "directory laid out <name>/<version>/model.onnx + model_card.json",
    "default_model": "model that answers requests naming none",
    "version_policy": "versions to serve per model: latest:N, all, or specific:V1,V2",
    "poll_interval_s": "seconds between repository scans for new/changed/removed versions (0: off)",
    "repository_config": "repository config file: version policies, version labels, traffic split, shadow "
                         "(empty: <model-repository>/repository.json; re-read on every scan)",
    "shadow_max_inflight_images": "most images copied to shadow versions and not yet compared; more are dropped",
    "shadow_drop_queue_images": "drop a shadow copy while the answering version's queue holds this many images or "
                                "more; 0: while it runs a batch or anything waits (shadow work goes first under load)",
    "shadow_window_images": "images over which classifier_shadow_agreement_ratio and the confidence shift are taken",
    "providers": "execution providers: auto (TensorRT, CUDA, CPU: best available), cpu, cuda, tensorrt",
    "require_gpu": "fail readiness instead of silently falling back to the CPU provider",
    "intra_op_threads": "onnxruntime intra-op threads (0: one per core)",
    "inter_op_threads": "onnxruntime inter-op threads",
    "intra_op_spinning": "let idle onnxruntime intra-op threads spin-wait for work (session.intra_op.allow_spinning)",
    "graph_optimization": "onnxruntime graph optimisation level",
    "max_batch_size": "most images per onnxruntime run (1 turns dynamic batching off)",
    "max_batch_delay_ms": "longest wait for more requests to fill a batch (0: greedy, no wait)",
    "max_queue_size": "images queued per model version before RESOURCE_EXHAUSTED",
    "max_images_per_request": "most images in one ClassifyBatch / ModelInfer",
    "max_image_pixels": "largest width*height accepted, checked from the header before decoding",
    "max_message_bytes": "largest gRPC message received or sent (bytes)",
    "max_concurrent_streams": "HTTP/2 concurrent streams per connection",
    "drift_window": "images per model version in the sliding window that the drift scores compare with the card's reference",
    "explain": "serve the Explain RPC (saliency heatmaps and feature maps); off: it answers UNIMPLEMENTED",
    "max_concurrent_explanations": "explanations computed at once (each runs in its own worker thread)",
    "max_queued_explanations": "explanations waiting for a worker before Explain answers RESOURCE_EXHAUSTED",
    "explain_intra_op_threads": "onnxruntime intra-op threads of each explanation's sessions (0: one per core)",
    "event_loop": "event loop that runs gRPC and the handlers: uvloop, or asyncio's own",
    "tls_cert": "PEM certificate chain of the gRPC port; with --tls-key turns TLS on",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
    "auth_tokens_file": "file of bearer tokens, one per line; any token turns authentication on",
    "auth_tokens": "comma-separated bearer tokens (prefer the env var: command lines are visible to ps)",
    "auth_health": "require a token on the gRPC health service too (default: open for probes)",
    "grace_period_s": "seconds in-flight requests get to finish at SIGTERM",
    "log_format": "text or json",
    "log_level": "DEBUG, INFO, WARNING, ERROR",
    "access_log": "one log line per request",
}
_CHOICES = {
    "providers": PROVIDER_CHOICES,
    "graph_optimization": OPTIMIZATION_LEVELS,
    "log_format": ("text", "json"),
    "event_loop": EVENT_LOOPS,
}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="CIFAR-10 gRPC classification server. Every flag has an env var: "
        f"--max-batch-size is {env_name('max_batch_size')}.",
    )
    defaults = ServerConfig()
    for field in fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = f"{_HELP[field.name]} (env {env_name(field.name)}; default {default})"
        if field.type in ("bool", bool):
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "Path": Path}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, default=None, choices=_CHOICES.get(field.name), help=help_text)
    return parser


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Flags over env vars over defaults; invalid values exit with argparse's message."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    for field in fields(ServerConfig):
        value = getattr(args, field.name)
        if value is None and env_name(field.name) in environ:
            raw = environ[env_name(field.name)]
            try:
                value = parser._option_string_actions["--" + field.name.replace("_", "-")].type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env_name(field.name)}={raw!r}: {exc}")
            if field.name in _CHOICES and value not in _CHOICES[field.name]:
                parser.error(f"{env_name(field.name)}={raw!r}: choose from {', '.join(_CHOICES[field.name])}")
        if value is not None:
            values[field.name] = value
    config = ServerConfig(**values)
    problems = validate(config)
    if problems:
        parser.error("; ".join(problems))
    return config


# The smallest value each numeric setting may take.
MINIMUMS = {
    "max_batch_size": 1, "max_images_per_request": 1, "max_batch_delay_ms": 0, "drift_window": 1,
    "shadow_max_inflight_images": 1, "shadow_drop_queue_images": 0, "shadow_window_images": 1,
    "max_concurrent_explanations": 1, "max_queued_explanations": 0, "explain_intra_op_threads": 0,
}


def validate(config: ServerConfig) -> list[str]:
    problems = [f"--{name.replace('_', '-')} must be >= {least}"
                for name, least in MINIMUMS.items() if getattr(config, name) < least]
    if config.max_queue_size < config.max_batch_size:
        problems.append("--max-queue-size must be >= --max-batch-size")
    if bool(config.tls_cert) != bool(config.tls_key):
        problems.append("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        problems.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    return problems
