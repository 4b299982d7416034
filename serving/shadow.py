"""Shadow traffic: a sampled copy of answered requests goes to a candidate version, and the two
answers are compared. No gRPC here.

Off the caller's path and bounded: the copy is handed over after the answer (the core schedules
`offer` on the event loop's next turn), it waits in the shadow version's background lane (run
only when none of that version's own requests wait, on a session of its own that does not
spin-wait for more work once a copy is done), at most `max_inflight_images` images are
out at once, and it is dropped first under load: while the answering version is busy (by
default: running a batch or holding queued requests; with `drop_queue_images` N > 0: holding N
images or more in its queue), or once it has waited longer than `max_age_s`. The comparison runs on the shadow version's background thread, never on the event
loop.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from concurrent.futures import Future

import numpy as np

from serving.batching import DynamicBatcher
from serving.errors import DeadlineExpired, ServingError, ShuttingDown
from serving.metrics import ServingMetrics
from serving.repository import Routed
from serving.repository_config import RepositoryConfig

SHADOW_MAX_AGE_S = 2.0  # a copy older than this is not worth computing: the server is busy
DROP_REASONS = ("budget", "load", "stale", "unavailable", "failed")


class AgreementWindow:
    """The last `size` compared images of one (model, primary, shadow) pair."""

    def __init__(self, size: int):
        self._agreed: deque[bool] = deque(maxlen=size)
        self._shift: deque[float] = deque(maxlen=size)

    def add(self, agreed: list[bool], shift: list[float]) -> tuple[float, float]:
        """Adds images; returns (top-1 agreement, mean confidence shift) over the window."""
        self._agreed.extend(agreed)
        self._shift.extend(shift)
        return sum(self._agreed) / len(self._agreed), sum(self._shift) / len(self._shift)


class ShadowPair:
    """Metrics and window of shadow `shadow` beside primary `primary` of `model`."""

    def __init__(self, metrics: ServingMetrics, model: str, primary: int, shadow: int, window: int):
        # The gauges get their series at the first comparison: a ratio of 0 before any would read as
        # "never agrees".
        self.labels = (model, str(primary), str(shadow))
        self.compared = metrics.shadow_compared.labels(*self.labels)
        self.agreed = metrics.shadow_agreed.labels(*self.labels)
        self.latency = metrics.shadow_latency.labels(model, str(shadow))
        self.dropped = {reason: metrics.shadow_dropped.labels(model, str(shadow), reason) for reason in DROP_REASONS}
        self.window = AgreementWindow(window)
        self.lock = threading.Lock()  # a replaced shadow version's thread may still be finishing
        self.retired = False  # its shadow is no longer configured


class ShadowDispatcher:
    def __init__(self, metrics: ServingMetrics, max_inflight_images: int, drop_queue_images: int, window_images: int,
                 max_age_s: float = SHADOW_MAX_AGE_S):
        self.metrics = metrics
        self.max_inflight_images, self.drop_queue_images = max_inflight_images, drop_queue_images
        self.window_images, self.max_age_s = window_images, max_age_s
        self._pairs: dict[tuple[str, int, int], ShadowPair] = {}
        self._inflight = 0
        self._lock = threading.Lock()

    def offer(self, routed: Routed, images: np.ndarray, probabilities: np.ndarray) -> None:
        """Called after `routed.served` answered `images` with `probabilities`: maybe copy them to the shadow."""
        shadow = routed.shadow
        if shadow is None or (routed.shadow_percent < 100 and random.random() * 100 >= routed.shadow_percent):
            return
        primary = routed.served
        pair = self._pair(primary.name, primary.version, shadow.version)
        count = len(images)
        batcher = shadow.batcher
        if batcher is None:
            pair.dropped["unavailable"].inc(count)
            return
        if self._busy(primary.batcher):
            pair.dropped["load"].inc(count)
            return
        with self._lock:
            if self._inflight + count > self.max_inflight_images:
                budget_full = True
            else:
                budget_full, self._inflight = False, self._inflight + count
        if budget_full:
            pair.dropped["budget"].inc(count)
            return
        started = time.perf_counter()
        try:
            future = batcher.submit(images, time.monotonic() + self.max_age_s, background=True)
        except ServingError:
            self._release(count)
            pair.dropped["unavailable"].inc(count)
            return
        future.add_done_callback(lambda done: self._compare(pair, done, probabilities, started, count))

    def _busy(self, batcher: DynamicBatcher | None) -> bool:
        if batcher is None:
            return False
        if self.drop_queue_images == 0:
            return batcher.busy
        return batcher.queued_images >= self.drop_queue_images

    def _release(self, count: int) -> None:
        with self._lock:
            self._inflight -= count

    def _compare(self, pair: ShadowPair, done: Future, primary_probabilities: np.ndarray, started: float,
                 count: int) -> None:
        """On the shadow's background thread: top-1 agreement and confidence of the two answers."""
        self._release(count)
        error = done.exception()
        if error is not None:
            reason = ("stale" if isinstance(error, DeadlineExpired) else
                      "unavailable" if isinstance(error, ShuttingDown) else "failed")
            pair.dropped[reason].inc(count)
            return
        shadow_probabilities = done.result().probabilities
        pair.latency.observe(time.perf_counter() - started)
        primary_top = primary_probabilities.argmax(axis=1)
        shadow_top = shadow_probabilities.argmax(axis=1)
        rows = np.arange(count)
        agreed = (primary_top == shadow_top).tolist()
        shift = (shadow_probabilities[rows, shadow_top] - primary_probabilities[rows, primary_top]).tolist()
        with pair.lock:
            if pair.retired:
                return
            agreement, mean_shift = pair.window.add(agreed, shift)
            self.metrics.shadow_agreement.labels(*pair.labels).set(agreement)
            self.metrics.shadow_confidence_shift.labels(*pair.labels).set(mean_shift)
            pair.compared.inc(count)
            pair.agreed.inc(sum(agreed))

    def _pair(self, model: str, primary: int, shadow: int) -> ShadowPair:
        key = (model, primary, shadow)
        pair = self._pairs.get(key)
        if pair is None:
            with self._lock:
                pair = self._pairs.get(key)
                if pair is None:
                    pair = self._pairs[key] = ShadowPair(self.metrics, model, primary, shadow, self.window_images)
        return pair

    def configure(self, config: RepositoryConfig) -> None:
        """A config was put in force: pairs whose shadow is no longer configured lose their window and
        gauges (their counters stay: they only grow); a configured shadow's drop counters start at 0."""
        shadows = {name: rollout.shadow.version for name, rollout in config.rollouts().items()
                   if rollout.shadow is not None}
        with self._lock:
            for key in [key for key in self._pairs if shadows.get(key[0]) != key[2]]:
                retired = self._pairs.pop(key)
                with retired.lock:  # a comparison still finishing must not bring the series back
                    retired.retired = True
                    for gauge in (self.metrics.shadow_agreement, self.metrics.shadow_confidence_shift):
                        try:
                            gauge.remove(*retired.labels)
                        except KeyError:
                            pass
        for model, shadow in shadows.items():
            for reason in DROP_REASONS:
                self.metrics.shadow_dropped.labels(model, str(shadow), reason)
            self.metrics.shadow_latency.labels(model, str(shadow))
