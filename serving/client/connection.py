"""Where a client connects and how: the target, TLS, the bearer token, and their flags.

Shared by the client API (serving/client/aio.py), its CLIs and `python -m serving.healthcheck`;
imports nothing but grpc, so the health probe in the server image stays as light as it was.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "CIFAR10_TARGET"  # the client's default target, for the CLI and the API alike
# Images are small, but an Explain answer with every layer's feature maps is not.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the server's default --max-message-bytes


def default_target(environ: dict[str, str] | None = None) -> str:
    """$CIFAR10_TARGET, else localhost:50051."""
    return (os.environ if environ is None else environ).get(TARGET_ENV) or DEFAULT_TARGET


def channel_credentials(tls_ca: str | os.PathLike | None = None, tls_cert: str | os.PathLike | None = None,
                        tls_key: str | os.PathLike | None = None) -> grpc.ChannelCredentials | None:
    """None (plaintext) unless a CA or a client certificate is given; TLS (mutual with a certificate) otherwise."""
    if not tls_ca and not tls_cert:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def channel_to(target: str, tls_ca: str | None = None, tls_cert: str | None = None,
               tls_key: str | None = None) -> grpc.Channel:
    """A blocking channel: plaintext, TLS with a CA, or mutual TLS with a client certificate."""
    credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    if credentials is None:
        return grpc.insecure_channel(target, options=channel_options())
    return grpc.secure_channel(target, credentials, options=channel_options())


def aio_channel_to(target: str, credentials: grpc.ChannelCredentials | None,
                   max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """The asyncio twin of channel_to; it belongs to the event loop that is running when it is made."""
    options = channel_options(max_message_bytes)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def add_connection_arguments(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None,
                             env_prefix: str = "") -> None:
    """--token and the TLS flags; with env_prefix, each defaults to $<env_prefix>TOKEN, ...TLS_CA and so on."""
    environ = {} if not env_prefix else (os.environ if environ is None else environ)
    flags = [("token", "bearer token, if the server requires one"),
             ("tls_ca", "CA certificate (PEM) to verify the server; turns TLS on"),
             ("tls_cert", "client certificate (PEM) for mutual TLS"),
             ("tls_key", "client private key (PEM) for mutual TLS")]
    for name, help_text in flags:
        env = f"{env_prefix}{name.upper()}"
        parser.add_argument(f"--{name.replace('_', '-')}", default=environ.get(env) or None,
                            help=f"{help_text} (default ${env})" if env_prefix else help_text)


def add_call_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    """Where to send a call and what it names: server, model, version, top-k, deadline, connection."""
    parser.add_argument("--target", default=default_target(),
                        help=f"host:port of the server (default ${TARGET_ENV}, else {DEFAULT_TARGET})")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--version", type=int, default=0,
                        help="model version (0: the model's traffic split if it has one, else the newest)")
    parser.add_argument("--label", default="", help="version label, e.g. stable (instead of --version)")
    parser.add_argument("--top-k", type=int, default=None, help="predictions per image (default: the server's, 5)")
    parser.add_argument("--timeout", type=float, default=timeout,
                        help=f"seconds to wait for an answer (default {timeout:g})")
    add_connection_arguments(parser)
