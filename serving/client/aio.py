"""AsyncClassifier: the asyncio client of the native API (docs/client.md).

    async with AsyncClassifier("localhost:50051") as classifier:
        print((await classifier.classify("cat.png")).label)
        async for result in classifier.classify_many(paths):
            ...
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence, TypeVar

import grpc

from serving.client.connection import MAX_MESSAGE_BYTES, aio_channel_to, channel_credentials, default_target, token_metadata
from serving.client.inputs import ImageLike, image_message
from serving.client.results import Classification, Explanation, RequestError, Result
from serving.client.retry import RETRYABLE, Retry, RetryCallback, RetryPolicy, hint_from_metadata
from serving.client.stream import BulkClassification, StreamSettings
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc

T = TypeVar("T")
EXPLAIN_METHODS = {"occlusion": pb.EXPLAIN_METHOD_OCCLUSION, "grad_cam": pb.EXPLAIN_METHOD_GRAD_CAM}
DEFAULT_MAX_IN_FLIGHT = 64  # the server's window per stream (serving/calls.py STREAM_WINDOW)


class AsyncClassifier:
    """A client of one server, for one model (and version or label).

    target: host:port (default $CIFAR10_TARGET, else localhost:50051). model/version/label: what
    to ask for (default: the server's default model, its traffic split or newest version).
    top_k: predictions per image (default: the server's, 5). unsure_threshold: overrides the
    model's. token: a bearer token. tls_ca / tls_cert / tls_key: PEM files (a CA turns TLS on; a
    certificate and key make it mutual). timeout: seconds to wait for each answer. retry: when
    and how long to retry RESOURCE_EXHAUSTED and UNAVAILABLE; on_retry(Retry) hears of each retry.

    The channel opens on the first call and belongs to that call's event loop (a call from
    another loop opens a new one); `close()` (or `async with`) closes it. One instance serves any
    number of concurrent calls.
    """

    def __init__(self, target: str | None = None, *, model: str = "", version: int = 0, label: str = "",
                 top_k: int | None = None, unsure_threshold: float | None = None, token: str | None = None,
                 tls_ca: str | os.PathLike | None = None, tls_cert: str | os.PathLike | None = None,
                 tls_key: str | os.PathLike | None = None, timeout: float = 10.0,
                 retry: RetryPolicy | None = None, on_retry: RetryCallback | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        if version and label:
            raise ValueError("name a version or a label, not both")
        self.target = target or default_target()
        self.model, self.version, self.label = model, version, label
        self.top_k, self.unsure_threshold = top_k, unsure_threshold
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.max_message_bytes = max_message_bytes
        self._credentials = channel_credentials(tls_ca, tls_cert, tls_key)  # reads the files now: errors early
        self._metadata = token_metadata(token)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ClassifierStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the channel's

    # --- lifecycle -------------------------------------------------------------------------------

    def _connected(self) -> pb_grpc.ClassifierStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:  # a grpc.aio channel works in its own loop only
            self._channel = aio_channel_to(self.target, self._credentials, self.max_message_bytes)
            self._stub, self._loop = pb_grpc.ClassifierStub(self._channel), loop
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            if self._loop is asyncio.get_running_loop():
                await channel.close()

    async def __aenter__(self) -> AsyncClassifier:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # --- requests --------------------------------------------------------------------------------

    def classify_request(self, image: ImageLike, request_id: str = "") -> pb.ClassifyRequest:
        request = pb.ClassifyRequest(image=image_message(image), model_name=self.model, model_version=self.version,
                                     version_label=self.label, request_id=request_id)
        if self.top_k is not None:
            request.top_k = self.top_k
        if self.unsure_threshold is not None:
            request.unsure_threshold = self.unsure_threshold
        return request

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """One unary call, retried by the policy; RequestError once it gives up."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                error = RequestError(exc.code(), exc.details() or "", hint_from_metadata(exc.trailing_metadata()),
                                     attempt)
            if error.code not in RETRYABLE or attempt >= self.retry.max_attempts:
                raise error
            delay = self.retry.delay_s(attempt, error.retry_after_ms)
            if self.on_retry is not None:
                self.on_retry(Retry(error.code, error.message, attempt, delay, error.retry_after_ms))
            await asyncio.sleep(delay)

    # --- the API ---------------------------------------------------------------------------------

    async def classify(self, image: ImageLike, *, request_id: str = "") -> Classification:
        """One image (a path, encoded bytes, an array, a PIL image) with one Classify call.

        Raises RequestError when the server refuses it (after the retries), OSError when a file
        cannot be read, ValueError or TypeError for something that is no image.
        """
        request = self.classify_request(image, request_id)
        stub = self._connected()
        response = await self._with_retries(
            lambda: stub.Classify(request, timeout=self.timeout, metadata=self._metadata))
        return Classification.from_response(response)

    async def classify_many(self, images: Iterable[ImageLike] | AsyncIterable[ImageLike], *,
                            max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> AsyncIterator[Result]:
        """Every image over ClassifyStream, at most `max_in_flight` at a time: one Result per
        image, in input order, each with its classification or its error (serving/client/stream.py).

        `images` is read lazily, as room frees up, and may be endless. If iterating it raises,
        classify_many raises that, dropping the results not yet yielded.
        """
        settings = StreamSettings(self._metadata, self.timeout, self.retry, self.on_retry, self.max_message_bytes,
                                  lambda image: self.classify_request(image).SerializeToString())
        self._connected()
        run = BulkClassification(self._channel, images, max_in_flight, settings)
        async for result in run.results():
            yield result

    async def explain(self, image: ImageLike, *, method: str | None = None, target_class: int | None = None,
                      layers: Sequence[str] = (), feature_maps: bool = True, images: bool = True,
                      patch_size: int = 0, stride: int = 0, request_id: str = "") -> Explanation:
        """What the network saw in one image (docs/explain.md): the predictions, a heatmap for
        `target_class` (default: the top-1) by `method` ("occlusion", the default, or
        "grad_cam"), and the feature maps of `layers` (default: the model's default layers;
        feature_maps=False: none). images=False leaves out the PNGs (raw values only).
        """
        if method is not None and method not in EXPLAIN_METHODS:
            raise ValueError(f"method is one of {', '.join(EXPLAIN_METHODS)}, not {method!r}")
        request = pb.ExplainRequest(
            image=image_message(image), model_name=self.model, model_version=self.version, version_label=self.label,
            method=EXPLAIN_METHODS.get(method, pb.EXPLAIN_METHOD_UNSPECIFIED), layers=list(layers),
            omit_feature_maps=not feature_maps, omit_images=not images,
            occlusion=pb.OcclusionOptions(patch_size=patch_size, stride=stride), request_id=request_id,
        )
        if target_class is not None:
            request.target_class = target_class
        if self.top_k is not None:
            request.top_k = self.top_k
        stub = self._connected()
        response = await self._with_retries(lambda: stub.Explain(request, timeout=self.timeout, metadata=self._metadata))
        return Explanation.from_response(response)
