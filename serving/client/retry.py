"""When the client tries again, and how long it waits first.

RESOURCE_EXHAUSTED (the server's queue is full) and UNAVAILABLE (not ready, shutting down,
unreachable) are retried; everything else is final. The wait is exponential back-off with
jitter, and never shorter than the server's hint: `retry-after-ms` trailing metadata on a
failed call, a google.rpc.RetryInfo detail on a failed ClassifyStream message (serving/status.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import grpc
from google.rpc import error_details_pb2, status_pb2

from serving.status import RETRY_AFTER_KEY

RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # calls per request, the first included (1: never retry)
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each back-off is scaled by a random factor in [1 - jitter, 1 + jitter]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def delay_s(self, failed_attempts: int, retry_after_ms: int | None = None) -> float:
        """Seconds to wait after `failed_attempts` failures in a row: the back-off, or the hint if longer."""
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (failed_attempts - 1))
        backoff *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return max(backoff, (retry_after_ms or 0) / 1000)


@dataclass(frozen=True)
class Retry:
    """One decision to try again, as `on_retry` callbacks receive it."""

    code: grpc.StatusCode
    message: str
    attempt: int  # the attempt that failed (1: the first)
    delay_s: float  # the wait before the next one
    retry_after_ms: int | None  # the server's hint, when it gave one
    images: int = 1  # images that go again (a failed stream resends every unanswered one)


RetryCallback = Callable[[Retry], None]


def hint_from_metadata(metadata) -> int | None:
    """retry-after-ms from a failed call's trailing metadata."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def hint_from_status(status: status_pb2.Status) -> int | None:
    """The RetryInfo detail of a failed stream message's status, in milliseconds."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToMilliseconds()
    return None
