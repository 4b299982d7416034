"""The one place that maps domain errors to gRPC status codes and messages.

Clients get the domain error's message; anything unexpected becomes INTERNAL with the
request id, and the traceback goes to the log only (no paths or stack frames to clients).
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from serving.errors import (
    ConfigRejected, DeadlineExpired, InferenceFailed, InvalidInput, ModelNotFound, ModelNotReady, NotSupported,
    Overloaded, ServingError, ShuttingDown,
)

_CODES: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    NotSupported: grpc.StatusCode.UNIMPLEMENTED,
    ConfigRejected: grpc.StatusCode.FAILED_PRECONDITION,
}
RETRY_AFTER_KEY = "retry-after-ms"


def status_of(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str, str]:
    """(code, client message, reason label) for any exception raised while handling a call."""
    if isinstance(exc, ServingError):
        for kind in type(exc).__mro__:
            if kind in _CODES:
                return _CODES[kind], exc.message, exc.reason
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log", "internal"


def rpc_status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    """A google.rpc.Status for per-message / per-slot errors."""
    return status_pb2.Status(code=code.value[0], message=message)


def trailing_metadata_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    if isinstance(exc, Overloaded):
        return ((RETRY_AFTER_KEY, str(exc.retry_after_ms)),)
    return ()
