"""The one place that maps domain errors to gRPC status codes and messages.

Clients get the domain error's message; anything unexpected becomes INTERNAL with the
request id, and the traceback goes to the log only (no paths or stack frames to clients).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

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
# The back-off hint of RESOURCE_EXHAUSTED: trailing metadata on a failed call, and on a failed
# stream message (which has no metadata of its own) a google.rpc.RetryInfo detail of its Status.
RETRY_AFTER_KEY = "retry-after-ms"


def status_of(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str, str]:
    """(code, client message, reason label) for any exception raised while handling a call."""
    if isinstance(exc, ServingError):
        for kind in type(exc).__mro__:
            if kind in _CODES:
                return _CODES[kind], exc.message, exc.reason
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log", "internal"


def retry_after_ms_of(exc: BaseException | None) -> int | None:
    """How long the caller should wait before retrying, when the error says."""
    return exc.retry_after_ms if isinstance(exc, Overloaded) else None


def rpc_status(code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> status_pb2.Status:
    """A google.rpc.Status for per-message / per-slot errors, with a RetryInfo detail when there is a hint."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if retry_after_ms is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(retry_after_ms)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    return status


def trailing_metadata_of(exc: BaseException | None) -> tuple[tuple[str, str], ...]:
    retry_after_ms = retry_after_ms_of(exc)
    return () if retry_after_ms is None else ((RETRY_AFTER_KEY, str(retry_after_ms)),)
