"""The inference core shared by every API face: route, batch, post-process. No gRPC here.

Both the native Classifier API and the Open Inference Protocol call `InferenceCore.infer`,
so they share the batcher, queue bound, deadlines and metrics.

A lone request (no other call in `infer` now or in the last LONE_QUIET_S) on an idle batcher
runs at once on the event loop's thread: at concurrency 1 the two thread hand-offs of the queue
are ~0.1 ms of a ~1.8 ms answer (bench/NOTES.md). The quiet window is what keeps this from
serialising a loaded server: while the loop computes, it cannot see calls arriving, so after
computing it yields once, and the calls that arrived meanwhile find this one still active,
which marks the server as busy for the next LONE_QUIET_S. A call that leaves while others
are still inside marks it too, since one batch may take longer than the window.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from serving.batching import BatchResult
from serving.errors import InvalidInput, ShuttingDown
from serving.metrics import ServingMetrics
from serving.repository import ModelRepository, ServedVersion

DEFAULT_TOP_K = 5
LONE_QUIET_S = 0.05


@dataclass(frozen=True)
class Classification:
    class_index: int
    label: str
    probability: float


@dataclass
class InferenceOutcome:
    served: ServedVersion
    probabilities: np.ndarray  # [k, classes]
    result: BatchResult

    @property
    def class_names(self) -> list[str]:
        return self.served.model.class_names if self.served.model else []


class InferenceCore:
    def __init__(self, repository: ModelRepository, metrics: ServingMetrics, lone_requests_inline: bool = True):
        self.repository, self.metrics = repository, metrics
        self.lone_requests_inline = lone_requests_inline
        self._active = 0  # calls inside infer() now (all models: they share one event loop)
        self._last_overlap = float("-inf")  # time.monotonic() when two calls were last in infer() at once

    async def infer(self, images: np.ndarray, model_name: str, model_version: int,
                    deadline: float | None) -> InferenceOutcome:
        """uint8 [k, 32, 32, 3] -> probabilities: at once if the request is lone, else batched."""
        now = time.monotonic()
        if self._active:
            self._last_overlap = now
        self._active += 1
        try:
            if self.lone_requests_inline and len(images) == 1 and now - self._last_overlap > LONE_QUIET_S:
                served = self.repository.resolve(model_name, model_version)
                result = served.batcher.run_now(images, deadline) if served.batcher else None
                if result is not None:
                    await asyncio.sleep(0)  # calls that arrived while the loop computed now see this one
                    return self._outcome(served, result)
            return await self._batched(images, model_name, model_version, deadline)
        finally:
            if self._active > 1:  # leaving while others wait counts too: one batch may outlast the window
                self._last_overlap = time.monotonic()
            self._active -= 1

    async def _batched(self, images: np.ndarray, model_name: str, model_version: int,
                       deadline: float | None) -> InferenceOutcome:
        """Through the version's dynamic batcher.

        A version swapped out between routing and queueing (hot reload) refuses the submit;
        the request is then routed again, so a reload never fails a request.
        """
        for attempt in range(3):
            served = self.repository.resolve(model_name, model_version)
            batcher = served.batcher
            if batcher is None:
                continue
            try:
                future = batcher.submit(images, deadline)
                break
            except ShuttingDown:
                if attempt == 2:
                    raise
        else:
            raise ShuttingDown("the model version is being replaced; retry")
        return self._outcome(served, await asyncio.wrap_future(future))

    def _outcome(self, served: ServedVersion, result: BatchResult) -> InferenceOutcome:
        version = str(served.version)
        self.metrics.phase_latency.labels("queue_wait", served.name, version).observe(result.queue_wait_s)
        self.metrics.phase_latency.labels("inference", served.name, version).observe(result.inference_s)
        return InferenceOutcome(served, result.probabilities, result)

    def observe_decode(self, seconds: float, served_name: str, version: int | str) -> None:
        self.metrics.phase_latency.labels("decode", served_name, str(version)).observe(seconds)

    def top_k(self, outcome: InferenceOutcome, k: int) -> list[list[Classification]]:
        """Per image, the k most probable classes, highest first; counts images by top-1 class."""
        started = time.perf_counter()
        names = outcome.class_names
        order = np.argsort(-outcome.probabilities, axis=1, kind="stable")[:, :k]
        results = []
        counter = self.metrics.images
        version = str(outcome.served.version)
        for row, indices in zip(outcome.probabilities, order):
            results.append([Classification(int(i), names[i], float(row[i])) for i in indices])
            counter.labels(outcome.served.name, version, names[indices[0]]).inc()
        self.metrics.phase_latency.labels("postprocess", outcome.served.name, version).observe(
            time.perf_counter() - started
        )
        return results


def check_top_k(top_k: int | None, num_classes: int) -> int:
    """Unset means the default; explicit values must lie in 1..classes."""
    if top_k is None:
        return min(DEFAULT_TOP_K, num_classes)
    if not 1 <= top_k <= num_classes:
        raise InvalidInput(f"top_k is {top_k}, expected 1..{num_classes} (or unset for {DEFAULT_TOP_K})", reason="bad_top_k")
    return top_k
