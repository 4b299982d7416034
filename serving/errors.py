"""Domain errors: what went wrong, in words a client can act on. No gRPC here.

Each carries a short `reason` (a metrics label) and a message for the client. The one place
that maps them to status codes is `serving.status`.
"""

from __future__ import annotations


class ServingError(Exception):
    reason = "internal"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidInput(ServingError):
    """The request itself is malformed (INVALID_ARGUMENT)."""

    reason = "invalid_input"


class ModelNotFound(ServingError):
    """No such model or version (NOT_FOUND)."""

    reason = "model_not_found"


class ModelNotReady(ServingError):
    """The model exists but cannot answer now: loading, failed, or server not ready (UNAVAILABLE)."""

    reason = "model_not_ready"


class Overloaded(ServingError):
    """The bounded queue is full (RESOURCE_EXHAUSTED); retry after `retry_after_ms`."""

    reason = "queue_full"

    def __init__(self, message: str, retry_after_ms: int = 50, reason: str | None = None):
        super().__init__(message, reason)
        self.retry_after_ms = retry_after_ms


class DeadlineExpired(ServingError):
    """The client's deadline passed before inference (DEADLINE_EXCEEDED)."""

    reason = "deadline_exceeded"


class ShuttingDown(ServingError):
    """The server is draining and takes no new work (UNAVAILABLE)."""

    reason = "shutting_down"


class InferenceFailed(ServingError):
    """onnxruntime raised; details go to the log, not to the client (INTERNAL)."""

    reason = "inference_failed"


class NotSupported(ServingError):
    """A protocol operation this server does not offer; the message says what to do instead (UNIMPLEMENTED)."""

    reason = "not_supported"


class ConfigRejected(ServingError):
    """The repository config file on disk was not put in force (FAILED_PRECONDITION); the message
    says why, and that the last good config still routes requests."""

    reason = "config_rejected"


class StartupError(Exception):
    """A setting that cannot work (an unreadable certificate, a tokens file without tokens):
    the server refuses to start and says why in one line, without a traceback."""
