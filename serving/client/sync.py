"""Classifier: the blocking client, the same calls as AsyncClassifier (docs/client.md).

    with Classifier("localhost:50051") as classifier:
        print(classifier.classify("cat.png").label)
        for result in classifier.classify_many(paths):
            ...

It runs an AsyncClassifier on an event loop of its own, in a daemon thread, so the bulk path,
the retries and the ordering are one implementation for both, and it works where a loop
already runs in the calling thread (a notebook). The iterable given to classify_many is read
on that thread.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, Iterable, Iterator, Sequence, TypeVar

from serving.client.aio import DEFAULT_MAX_IN_FLIGHT, AsyncClassifier
from serving.client.inputs import ImageLike
from serving.client.results import Classification, Explanation, Result

T = TypeVar("T")


class Classifier:
    """A client of one server, for one model; takes AsyncClassifier's arguments."""

    def __init__(self, target: str | None = None, **options: Any):
        self._client = AsyncClassifier(target, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cifar10-classifier", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return self._client.target

    def _wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("this Classifier is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._wait(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def classify(self, image: ImageLike, *, request_id: str = "") -> Classification:
        """See AsyncClassifier.classify."""
        return self._wait(self._client.classify(image, request_id=request_id))

    def classify_many(self, images: Iterable[ImageLike], *,
                      max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> Iterator[Result]:
        """See AsyncClassifier.classify_many: one Result per image, in input order."""
        results = self._client.classify_many(images, max_in_flight=max_in_flight)

        async def next_result() -> Result:
            return await anext(results)

        try:
            while True:
                try:
                    yield self._wait(next_result())
                except StopAsyncIteration:
                    return
        finally:
            self._discard(results)

    def _discard(self, results) -> None:
        """Ends a classify_many left early (its stream is cancelled), from any thread, even the loop's
        own (where a garbage-collected generator may be closed)."""
        if self._loop.is_closed():
            return
        if threading.current_thread() is self._thread:
            self._loop.create_task(results.aclose())
            return

        async def close() -> None:
            await results.aclose()

        self._wait(close())

    def explain(self, image: ImageLike, *, method: str | None = None, target_class: int | None = None,
                layers: Sequence[str] = (), feature_maps: bool = True, images: bool = True,
                patch_size: int = 0, stride: int = 0, request_id: str = "") -> Explanation:
        """See AsyncClassifier.explain."""
        return self._wait(self._client.explain(
            image, method=method, target_class=target_class, layers=layers, feature_maps=feature_maps, images=images,
            patch_size=patch_size, stride=stride, request_id=request_id))
