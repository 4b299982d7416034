"""The inference core shared by every API face: route, batch, post-process, shadow. No gRPC here.

Both the native Classifier API and the Open Inference Protocol call `InferenceCore.route` then
`InferenceCore.infer`, so they share the routing (labels, traffic split, shadow), the batcher,
queue bound, deadlines and metrics.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from serving.batching import BatchResult
from serving.errors import InvalidInput, ShuttingDown
from serving.metrics import ServingMetrics
from serving.repository import ModelRepository, Routed, ServedVersion
from serving.shadow import ShadowDispatcher

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Classification:
    class_index: int
    label: str
    probability: float


@dataclass
class InferenceOutcome:
    served: ServedVersion
    result: BatchResult
    label: str = ""  # the version label that chose `served`, if one did

    @property
    def probabilities(self) -> np.ndarray:
        """[k, classes], calibrated (serving/trust.py): what callers get as the probability."""
        return self.result.rows[0]

    @property
    def unsure_scores(self) -> np.ndarray:
        """[k]: higher is less like the training data; compared with the threshold."""
        return self.result.rows[1]

    @property
    def class_names(self) -> list[str]:
        return self.served.model.class_names if self.served.model else []


class InferenceCore:
    def __init__(self, repository: ModelRepository, metrics: ServingMetrics, shadows: ShadowDispatcher | None = None):
        self.repository, self.metrics, self.shadows = repository, metrics, shadows  # None: no shadow traffic
        if shadows is not None:
            repository.add_config_listener(shadows.configure)

    def route(self, model_name: str, model_version: int, version_label: str, request_id: str) -> Routed:
        """The version that answers a request, by number, by label, or (neither) by the model's traffic
        split, sticky per request id; with the shadow that gets a copy. Every API face's entry point."""
        routed = self.repository.route(model_name, model_version, version_label, request_id)
        served = routed.served
        self.metrics.child(self.metrics.routed, served.name, str(served.version), routed.how).inc()
        return routed

    async def infer(self, images: np.ndarray, routed: Routed, deadline: float | None) -> InferenceOutcome:
        """uint8 [k, 32, 32, 3] -> probabilities, through the routed version's dynamic batcher.

        A version swapped out between routing and queueing (hot reload, relabel) refuses the
        submit; the request is then routed again as it asked (same label, same request id), so a
        reload never fails a request. Once answered, a sampled copy may go to the shadow.
        """
        for attempt in range(3):
            if attempt:
                request = routed.request
                routed = self.repository.route(request.model, request.version, request.label, request.request_id)
            served = routed.served
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
        result: BatchResult = await asyncio.wrap_future(future)
        version, phases = str(served.version), self.metrics.phase_latency
        self.metrics.child(phases, "queue_wait", served.name, version).observe(result.queue_wait_s)
        self.metrics.child(phases, "inference", served.name, version).observe(result.inference_s)
        if routed.shadow is not None and self.shadows is not None:
            # On the loop's next turn, once this answer is on its way to its caller.
            asyncio.get_running_loop().call_soon(self.shadows.offer, routed, images, result.probabilities)
        return InferenceOutcome(served, result, routed.label)

    def observe_decode(self, seconds: float, served_name: str, version: int | str) -> None:
        self.metrics.child(self.metrics.phase_latency, "decode", served_name, str(version)).observe(seconds)

    def top_k(self, outcome: InferenceOutcome, k: int) -> list[list[Classification]]:
        """Per image, the k most probable classes, highest first (ties: lower class index first);
        counts images by top-1 class.

        Python lists, not np.argsort: this runs on the event loop, and numpy lets go of the GIL
        around every sort, however small, so each call would hand the GIL to a waiting thread
        (the batcher, gRPC's poller) and stall the loop until it came back (bench/NOTES.md).
        """
        started = time.perf_counter()
        names = outcome.class_names
        results = []
        counter = self.metrics.images
        version = str(outcome.served.version)
        for row in outcome.probabilities.tolist():
            indices = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]  # a stable sort
            results.append([Classification(i, names[i], row[i]) for i in indices])
            self.metrics.child(counter, outcome.served.name, version, names[indices[0]]).inc()
        self.metrics.child(self.metrics.phase_latency, "postprocess", outcome.served.name, version).observe(
            time.perf_counter() - started
        )
        return results

    def unsure(self, outcome: InferenceOutcome, threshold: float | None = None) -> list[bool]:
        """Per image, whether its score is above `threshold` (None: the model's, from its card);
        counts the unsure answers."""
        limit = outcome.served.trust.unsure.threshold if threshold is None else threshold
        flags = [score > limit for score in outcome.unsure_scores.tolist()]
        flagged = sum(flags)
        if flagged:
            self.metrics.child(self.metrics.unsure, outcome.served.name, str(outcome.served.version)).inc(flagged)
        return flags


def check_top_k(top_k: int | None, num_classes: int) -> int:
    """Unset means the default; explicit values must lie in 1..classes."""
    if top_k is None:
        return min(DEFAULT_TOP_K, num_classes)
    if not 1 <= top_k <= num_classes:
        raise InvalidInput(f"top_k is {top_k}, expected 1..{num_classes} (or unset for {DEFAULT_TOP_K})", reason="bad_top_k")
    return top_k
