"""`python -m serving.healthcheck [--target host:port] [--service NAME]`: a grpc.health.v1 probe.

Exits 0 only when the server answers SERVING; 1 for anything else (NOT_SERVING, unknown
service, unreachable, timeout). 1 and never 2, because Docker's HEALTHCHECK reserves 2.
The default target is 127.0.0.1 on $CIFAR10_PORT, so the image's HEALTHCHECK follows the
port the server was configured with. A server with TLS (or bearer tokens on health) needs
the probe's own settings: --tls-ca/--tls-cert/--tls-key/--token, or in a container the
$CIFAR10_PROBE_TLS_CA, $CIFAR10_PROBE_TLS_CERT, $CIFAR10_PROBE_TLS_KEY, $CIFAR10_PROBE_TOKEN
variables, so the image's HEALTHCHECK line stays as it is.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client.connection import add_connection_arguments, channel_to, token_metadata
from serving.config import ServerConfig, env_name

HEALTHY = 0
UNHEALTHY = 1
PROBE_ENV_PREFIX = "CIFAR10_PROBE_"


def default_target(environ: dict[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return f"127.0.0.1:{environ.get(env_name('port'), ServerConfig.port)}"


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.healthcheck",
        description="grpc.health.v1 check: exit 0 only when the server is SERVING, else 1.",
    )
    parser.add_argument("--target", default=None,
                        help=f"host:port of the gRPC server (default 127.0.0.1:${env_name('port')}, else :50051)")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="give up after this many seconds")
    add_connection_arguments(parser, environ, PROBE_ENV_PREFIX)
    return parser


def check(target: str, service: str = "", timeout_s: float = 3.0, tls_ca: str | None = None,
          tls_cert: str | None = None, tls_key: str | None = None, token: str | None = None) -> tuple[bool, str]:
    """(healthy, what was seen) for one Health/Check call."""
    with channel_to(target, tls_ca, tls_cert, tls_key) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                               metadata=token_metadata(token))
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = args.target or default_target()
    healthy, seen = check(target, args.service, args.timeout_s, args.tls_ca, args.tls_cert, args.tls_key, args.token)
    print(f"{target} service={args.service!r}: {seen}")
    return HEALTHY if healthy else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
