"""The native `cifar10.classifier.v1.Classifier` API: protos <-> domain objects, nothing more."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

import numpy as np

from serving import images as imaging
from serving.calls import CallObserver, CallRecord
from serving.errors import InvalidInput, NotSupported, ServingError
from serving.explain import GRAD_CAM, OCCLUSION, ExplainOptions, ExplanationService, ModelExplainer
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.repository import ModelRepository, Routed, VersionState
from serving.repository_config import RepositoryConfig
from serving.service import Classification, InferenceCore, check_top_k
from serving.trust import check_threshold
from serving.status import retry_after_ms_of, rpc_status, status_of
from serving.wire import CorruptMessage, parsed

log = logging.getLogger(__name__)
PROTOCOL = "native"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
# Decoding a large file on the event loop would stall every other call: big ones go to a thread.
DECODE_INLINE_MAX_BYTES = 64 * 1024
EXPLAIN_METHODS = {pb.EXPLAIN_METHOD_OCCLUSION: OCCLUSION, pb.EXPLAIN_METHOD_GRAD_CAM: GRAD_CAM}
EXPLAIN_METHOD_ENUMS = {name: value for value, name in EXPLAIN_METHODS.items()}


def image_to_array(image: pb.Image, max_pixels: int) -> np.ndarray:
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return imaging.decode_encoded(image.encoded, max_pixels)
    if kind == "raw":
        raw = image.raw
        return imaging.from_raw_pixels(raw.data, raw.height, raw.width, raw.channels, max_pixels)
    if kind == "tensor":
        tensor = image.tensor
        layout = "NCHW" if tensor.layout == pb.LAYOUT_NCHW else "NHWC"
        return imaging.from_float_tensor(tensor.data, list(tensor.shape), layout, max_pixels)
    raise InvalidInput("image is empty: set one of encoded, raw or tensor", reason="missing_image")


def predictions_pb(classes: list[Classification]) -> list[pb.Prediction]:
    return [pb.Prediction(label=c.label, class_index=c.class_index, probability=c.probability) for c in classes]


def rollout_pb(name: str, config: RepositoryConfig) -> pb.ModelRollout:
    rollout = config.rollout_for(name)
    policy = config.models[name].policy if name in config.models else None
    message = pb.ModelRollout(model_name=name, version_policy=str(policy) if policy else "", labels=rollout.labels)
    for share in rollout.traffic:
        message.traffic.add(version=share.version, label=share.label, percent=share.percent)
    if rollout.shadow is not None:
        shadow = rollout.shadow
        message.shadow.CopyFrom(pb.ShadowTraffic(version=shadow.version, label=shadow.label, percent=shadow.percent))
    return message


def explain_options(request: pb.ExplainRequest) -> ExplainOptions:
    method = request.method
    if method != pb.EXPLAIN_METHOD_UNSPECIFIED and method not in EXPLAIN_METHODS:
        raise InvalidInput(f"method {method} is not an ExplainMethod (occlusion: {pb.EXPLAIN_METHOD_OCCLUSION}, "
                           f"grad_cam: {pb.EXPLAIN_METHOD_GRAD_CAM})", reason="bad_explain_method")
    return ExplainOptions(
        method=EXPLAIN_METHODS.get(method, ""),
        target_class=request.target_class if request.HasField("target_class") else None,
        layers=tuple(request.layers), feature_maps=not request.omit_feature_maps, images=not request.omit_images,
        occlusion_patch=request.occlusion.patch_size, occlusion_stride=request.occlusion.stride,
    )


def explain_metadata(explainer: ModelExplainer | None) -> dict:
    """ModelMetadata's explain fields."""
    if explainer is None:
        return {}
    return {
        "explain_methods": [EXPLAIN_METHOD_ENUMS[method] for method in explainer.methods],
        "explainable_layers": [
            pb.ExplainableLayer(name=layer.name, shape=layer.shape, is_default=layer.default, description=layer.description)
            for layer in explainer.layers
        ],
    }


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, core: InferenceCore, repository: ModelRepository, calls: CallObserver,
                 max_images_per_request: int, max_image_pixels: int, reload,
                 explanations: ExplanationService | None = None):
        self.core, self.repository, self.calls = core, repository, calls
        self.explanations = explanations
        self.max_images = max_images_per_request
        self.max_pixels = max_image_pixels
        self._reload = reload  # async () -> None: rescans the repository off the event loop

    async def _decode(self, image: pb.Image) -> np.ndarray:
        if image.WhichOneof("data") == "encoded" and len(image.encoded) > DECODE_INLINE_MAX_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, image_to_array, image, self.max_pixels)
        return image_to_array(image, self.max_pixels)

    def _route(self, call: CallRecord, model_name: str, model_version: int, version_label: str) -> Routed:
        """The version that answers this call (by number, label, or the traffic split on its request id)."""
        routed = self.core.route(model_name, model_version, version_label, call.request_id)
        call.model, call.version = routed.served.name, routed.served.version
        return routed

    async def _classify(self, request: pb.ClassifyRequest, call: CallRecord) -> pb.ClassifyResponse:
        routed = self._route(call, request.model_name, request.model_version, request.version_label)
        served = routed.served
        top_k = check_top_k(request.top_k if request.HasField("top_k") else None, served.model.num_classes)
        threshold = check_threshold(request.unsure_threshold if request.HasField("unsure_threshold") else None)
        started = time.perf_counter()
        pixels = await self._decode(request.image)
        self.core.observe_decode(time.perf_counter() - started, served.name, served.version)
        call.images = 1
        outcome = await self.core.infer(pixels[None], routed, call.deadline)
        (classes,) = self.core.top_k(outcome, top_k)
        (unsure,) = self.core.unsure(outcome, threshold)
        return pb.ClassifyResponse(
            predictions=predictions_pb(classes), model_name=outcome.served.name,
            model_version=outcome.served.version, request_id=call.request_id, version_label=outcome.label,
            unsure=unsure, unsure_score=float(outcome.unsure_scores[0]),
        )

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        call = self.calls.record("Classify", PROTOCOL, context, request.request_id)
        return await self.calls.unary(call, context, lambda: self._classify(request, call))

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest, context) -> pb.ClassifyBatchResponse:
        call = self.calls.record("ClassifyBatch", PROTOCOL, context, request.request_id)
        return await self.calls.unary(call, context, lambda: self._classify_batch(request, call))

    async def _classify_batch(self, request: pb.ClassifyBatchRequest, call: CallRecord) -> pb.ClassifyBatchResponse:
        count = len(request.images)
        if count == 0:
            raise InvalidInput("images is empty: send at least one image", reason="empty_batch")
        if count > self.max_images:
            raise InvalidInput(
                f"{count} images in one request, over the limit of {self.max_images} (--max-images-per-request)",
                reason="batch_too_large",
            )
        routed = self._route(call, request.model_name, request.model_version, request.version_label)
        served = routed.served
        top_k = check_top_k(request.top_k if request.HasField("top_k") else None, served.model.num_classes)
        threshold = check_threshold(request.unsure_threshold if request.HasField("unsure_threshold") else None)
        results = [pb.ImageResult() for _ in range(count)]
        good_slots, arrays = [], []
        started = time.perf_counter()
        for slot, image in enumerate(request.images):
            try:
                arrays.append(await self._decode(image))
                good_slots.append(slot)
            except ServingError as exc:  # this slot only; the others are still classified
                code, message, reason = status_of(exc)
                results[slot].error.CopyFrom(rpc_status(code, f"image {slot}: {message}"))
                self.calls.count_rejection(reason, PROTOCOL, code)
        self.core.observe_decode(time.perf_counter() - started, served.name, served.version)
        call.images = len(arrays)
        model_name, model_version, label = served.name, served.version, routed.label
        if arrays:
            outcome = await self.core.infer(np.stack(arrays), routed, call.deadline)
            flags, scores = self.core.unsure(outcome, threshold), outcome.unsure_scores.tolist()
            for slot, classes, unsure, score in zip(good_slots, self.core.top_k(outcome, top_k), flags, scores):
                results[slot].predictions.extend(predictions_pb(classes))
                results[slot].unsure, results[slot].unsure_score = unsure, score
            model_name, model_version, label = outcome.served.name, outcome.served.version, outcome.label
        return pb.ClassifyBatchResponse(
            results=results, model_name=model_name, model_version=model_version, request_id=call.request_id,
            version_label=label,
        )

    async def ClassifyStream(self, request_iterator, context) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Messages are classified concurrently and answered in order; a bad one answers in-band."""
        stream_call = self.calls.record("ClassifyStream", PROTOCOL, context)

        async def one(request: pb.ClassifyRequest | CorruptMessage) -> tuple[pb.ClassifyStreamResponse, int]:
            request_id = "" if isinstance(request, CorruptMessage) else request.request_id
            call = self.calls.record("ClassifyStream", PROTOCOL, context, request_id)
            try:
                response = await self._classify(parsed(request), call)
                return pb.ClassifyStreamResponse(response=response, request_id=call.request_id), 1
            except Exception as exc:  # noqa: BLE001 - one bad message must not end the stream
                code, message, reason = status_of(exc, call.request_id)
                if reason == "internal":
                    log.exception("stream message %s failed", call.request_id)
                self.calls.count_rejection(reason, PROTOCOL, code)
                return pb.ClassifyStreamResponse(error=rpc_status(code, message, retry_after_ms_of(exc)),
                                                 request_id=call.request_id), 0

        async for response in self.calls.ordered_stream(stream_call, request_iterator, one):
            yield response

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        call = self.calls.record("Explain", PROTOCOL, context, request.request_id)
        return await self.calls.unary(call, context, lambda: self._explain(request, call))

    async def _explain(self, request: pb.ExplainRequest, call: CallRecord) -> pb.ExplainResponse:
        if self.explanations is None:
            raise NotSupported("this server does not explain")
        routed = self._route(call, request.model_name, request.model_version, request.version_label)
        served = routed.served
        top_k = check_top_k(request.top_k if request.HasField("top_k") else None, served.model.num_classes)
        options = explain_options(request)
        started = time.perf_counter()
        pixels = await self._decode(request.image)
        self.core.observe_decode(time.perf_counter() - started, served.name, served.version)
        call.images = 1
        result = await self.explanations.explain(routed, pixels, options, call.deadline)
        explanation = result.explanation
        call.extra = {"explain_method": explanation.method, "target_class": explanation.target_class}
        (classes,) = self.core.top_k(result.outcome, top_k)
        return pb.ExplainResponse(
            predictions=predictions_pb(classes), target_class=explanation.target_class,
            target_label=result.outcome.class_names[explanation.target_class],
            method=EXPLAIN_METHOD_ENUMS[explanation.method],
            heatmap=explanation.heatmap.ravel().tolist(), heatmap_png=explanation.heatmap_png,
            feature_maps=[
                pb.FeatureMap(layer=fm.layer.name, shape=fm.values.shape, values=fm.values.ravel().tolist(), png=fm.png)
                for fm in explanation.feature_maps
            ],
            forward_passes=explanation.forward_passes, model_name=result.outcome.served.name,
            model_version=result.outcome.served.version, request_id=call.request_id,
        )

    async def GetModelMetadata(self, request: pb.GetModelMetadataRequest, context) -> pb.ModelMetadata:
        call = self.calls.record("GetModelMetadata", PROTOCOL, context)
        return await self.calls.unary(call, context, lambda: self._metadata(request, call))

    async def _metadata(self, request: pb.GetModelMetadataRequest, call: CallRecord) -> pb.ModelMetadata:
        served = self.repository.resolve(request.model_name, request.model_version)
        call.model, call.version = served.name, served.version
        model = served.model
        config = self.repository.config
        card = model.card
        return pb.ModelMetadata(
            name=served.name, version=served.version, state=served.state.value,
            class_names=model.class_names,
            input=pb.TensorSpec(name=model.input.name, datatype="uint8", shape=model.input_shape, layout="NHWC"),
            output=pb.TensorSpec(name=model.output.name, datatype="float32", shape=[-1, model.num_classes]),
            preprocessing=imaging.SERVER_PREPROCESSING, model_preprocessing=card.preprocessing,
            execution_providers=model.providers, sha256=model.sha256,
            test_accuracy=card.test_accuracy, test_accuracy_bit_exact=card.test_accuracy_bit_exact,
            model_card_json=json.dumps(card.raw, sort_keys=True),
            max_batch_size=served.batcher.max_batch_size if served.batcher else 0,
            is_default=served.name == self.repository.default_model,
            version_labels=config.rollout_for(served.name).labels_of(served.version),
            rollout=rollout_pb(served.name, config),
            unsure_score=served.trust.unsure.score, unsure_threshold=served.trust.unsure.threshold,
            calibration=served.trust.calibration.method,
            **explain_metadata(await self.explanations.explainer(served) if self.explanations else None),
        )

    def _list(self) -> pb.ListModelsResponse:
        config = self.repository.config
        response = pb.ListModelsResponse(default_model=self.repository.default_model,
                                         config_error=self.repository.config_error)
        for served in self.repository.statuses():
            model = served.model
            rollout = config.rollout_for(served.name)
            response.models.append(pb.ModelVersionStatus(
                name=served.name, version=served.version, state=served.state.value, error=served.error,
                execution_providers=model.providers if model else [],
                is_default_model=served.name == self.repository.default_model,
                test_accuracy=model.card.test_accuracy if model else 0.0,
                version_labels=rollout.labels_of(served.version),
                traffic_percent=rollout.traffic_percent(served.version),
            ))
        response.rollouts.extend(rollout_pb(name, config) for name in config.rollouts())
        return response

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        call = self.calls.record("ListModels", PROTOCOL, context)

        async def handler():
            return self._list()

        return await self.calls.unary(call, context, handler)

    async def ReloadModels(self, request: pb.ReloadModelsRequest, context) -> pb.ListModelsResponse:
        call = self.calls.record("ReloadModels", PROTOCOL, context)

        async def handler():
            await self._reload()
            self.repository.check_config_in_force()
            return self._list()

        return await self.calls.unary(call, context, handler)


assert VersionState.AVAILABLE.value == pb.AVAILABLE and VersionState.FAILED.value == pb.FAILED
