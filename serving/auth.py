"""Optional bearer-token authentication: a grpc.aio server interceptor.

Clients send `authorization: Bearer <token>` metadata. Tokens come from a file (one per line;
blank lines and `#` comments ignored) and/or a comma-separated list (CIFAR10_AUTH_TOKENS).
No token configured means authentication is off.

What is open without a token: the gRPC health service, so that load balancers and Kubernetes
probes work without secrets (`--auth-health` closes it too). Reflection follows the API: it
describes every method, so it needs a token whenever the API does (grpcurl sends one with
`-H 'authorization: Bearer ...'`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from serving.errors import StartupError
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
SCHEME = "bearer"
HEALTH_SERVICE = "grpc.health.v1.Health"
REJECTION_REASON = "unauthenticated"
OTHER_PROTOCOL = "grpc"  # rejections on services that are no API face (reflection, health)


class AuthConfigError(StartupError):
    """Authentication was asked for but cannot be set up (unreadable file, no token)."""


def load_tokens(tokens_file: str = "", inline_tokens: str = "") -> list[str]:
    """Every configured token; empty when authentication is off. Fails closed on a bad file."""
    tokens = [t.strip() for t in inline_tokens.split(",") if t.strip()]
    if tokens_file:
        try:
            lines = Path(tokens_file).read_text().splitlines()
        except OSError as exc:
            raise AuthConfigError(f"--auth-tokens-file {tokens_file}: {exc.strerror or exc}") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise AuthConfigError(f"--auth-tokens-file {tokens_file} holds no token: refusing to start without auth")
        tokens.extend(from_file)
    return tokens


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of the token's length.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _deny(message: str) -> Callable[..., Awaitable[None]]:
    async def deny(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when it carries a configured token (or targets an open service)."""

    def __init__(self, tokens: list[str], metrics: ServingMetrics, protocols: dict[str, str],
                 require_on_health: bool = False):
        if not tokens:
            raise AuthConfigError("bearer-token authentication needs at least one token")
        self._digests = [_digest(t) for t in tokens]
        self._metrics = metrics
        self._protocols = protocols  # full service name -> protocol label of the rejection metric
        self._open_services = frozenset() if require_on_health else frozenset({HEALTH_SERVICE})

    def _token_is_valid(self, metadata) -> tuple[bool, str]:
        """(valid, why not) from the call's metadata."""
        values = [value for key, value in (metadata or ()) if key == AUTH_HEADER]
        if not values:
            return False, "missing credentials: send metadata 'authorization: Bearer <token>'"
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != SCHEME or not token.strip():
            return False, "malformed credentials: expected metadata 'authorization: Bearer <token>'"
        presented = _digest(token.strip())
        matched = False
        for known in self._digests:  # no early exit: the time does not say which token was close
            matched |= hmac.compare_digest(presented, known)
        return (True, "") if matched else (False, "invalid bearer token")

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if service in self._open_services:
            return await continuation(handler_call_details)
        valid, why = self._token_is_valid(handler_call_details.invocation_metadata)
        if valid:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without auth
            return None
        self._metrics.rejections.labels(REJECTION_REASON, self._protocols.get(service, OTHER_PROTOCOL)).inc()
        log.debug("refused %s: %s", handler_call_details.method, why)
        return _rejecting_handler(handler, why)


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` whose only act is UNAUTHENTICATED."""
    deny = _deny(message)
    codecs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **codecs)
    return grpc.unary_unary_rpc_method_handler(deny, **codecs)
