"""The Open Inference Protocol (KServe V2) face: `inference.GRPCInferenceService` protos <->
domain objects, over the same InferenceCore, batcher, queue bound, deadlines, metrics
(protocol="v2"), access log and error mapping as the native Classifier API.

Mapping choices (docs/api.md, "The Open Inference Protocol"):
- model_version "" (or "0"): the model's traffic split (sticky per request id), else the newest
  available version; a number: that version; anything else: a version label ("stable").
  model_name "": the default model.
- Outputs come back as raw_output_contents when the request used raw_input_contents, else as
  typed contents.
- Outputs: `probabilities` (FP32 [N, classes], calibrated: the native API's probabilities),
  `unsure_score` (FP32 [N]) and `unsure` (BOOL [N]) as docs/trust.md describes; a request that
  names no output gets all three (as Triton answers with every output). A request parameter
  `unsure_threshold` (a number) replaces the model's threshold for that request.
- Classification extension: `probabilities` requested with parameter `classification: k` comes
  back as BYTES [N, k] "score:index:label", best first; k above the class count is clamped (as
  Triton does), k < 1 is refused.
- RepositoryModelLoad rescans the repository (as ReloadModels / SIGHUP do), then answers OK if
  the model has an available version (FAILED_PRECONDITION if the repository config file was
  rejected: the last good one stays in force). RepositoryModelUnload is UNIMPLEMENTED: the
  repository is file-based, so a version is unloaded by removing it from disk (or by the version
  policy).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
import numpy as np

from serving.calls import CallObserver, CallRecord
from serving.errors import InvalidInput, ModelNotFound, ModelNotReady, NotSupported, ServingError
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc as pb_grpc
from serving.repository import ModelRepository, Routed, ServedVersion, VersionState, validate_model_name
from serving.repository_config import LABEL_PATTERN
from serving.runtime import OnnxModel
from serving.service import InferenceCore
from serving.status import status_of
from serving.trust import check_threshold
from serving.v2 import tensors
from serving.wire import CorruptMessage, parsed, register

log = logging.getLogger(__name__)
T = TypeVar("T")

PROTOCOL = "v2"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "cifar10-serving"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("classification", "model_repository")
CLASSIFICATION = "classification"
UNSURE_SCORE, UNSURE = "unsure_score", "unsure"  # outputs beside the model's probabilities
UNSURE_THRESHOLD = "unsure_threshold"  # the request parameter that overrides the model's threshold
# Triton's model states, as tritonclient's get_model_repository_index() reports them.
STATE_NAMES = {
    VersionState.AVAILABLE: "READY",
    VersionState.LOADING: "LOADING",
    VersionState.UNLOADING: "UNLOADING",
    VersionState.FAILED: "UNAVAILABLE",
}
# Converting on the event loop would stall every other call: bigger inputs go to a thread.
# Raw UINT8 is zero-copy (np.frombuffer) and always stays inline.
CONVERT_INLINE_MAX_BYTES = 64 * 1024


def parse_version(text: str) -> tuple[int, str]:
    """model_version -> (version, label): "" -> (0, ""), digits -> (number, ""), a label -> (0, label)."""
    if not text:
        return 0, ""
    try:
        return int(text), ""
    except ValueError:
        pass
    if LABEL_PATTERN.match(text):
        return 0, text
    raise InvalidInput(
        f"model version {text[:40]!r} is neither a version number nor a version label (a letter, then letters, "
        "digits, '_', '-', '.'); leave it empty for the model's default routing", reason="bad_version"
    )


def server_version() -> str:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    class_count: int | None = None  # probabilities as classification entries; None: as they are


def output_specs(model: OnnxModel) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every output a ModelInfer answer can carry."""
    return [(model.output.name, tensors.FP32, [-1, model.num_classes]),
            (UNSURE_SCORE, tensors.FP32, [-1]), (UNSURE, tensors.BOOL, [-1])]


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore, repository: ModelRepository, calls: CallObserver,
                 max_images_per_request: int, max_image_pixels: int,
                 reload: Callable[[], Awaitable[None]], ready: Callable[[], bool]):
        self.core, self.repository, self.calls = core, repository, calls
        self.max_images = max_images_per_request
        self.max_pixels = max_image_pixels
        self._reload = reload  # rescans the repository off the event loop
        self._ready = ready  # the server's readiness (gRPC health SERVING)

    def register(self, server: grpc.aio.Server) -> str:
        register(pb_grpc.add_GRPCInferenceServiceServicer_to_server, self, server, self.calls, PROTOCOL)
        return SERVICE_NAME

    async def _unary(self, method: str, context, handler: Callable[[CallRecord], Awaitable], request_id: str = ""):
        call = self.calls.record(method, PROTOCOL, context, request_id)
        return await self.calls.unary(call, context, lambda: handler(call))

    # ---- routing -------------------------------------------------------------------------
    def _resolve(self, call: CallRecord, name: str, version_text: str) -> ServedVersion:
        """The version a metadata/readiness call describes (no split, no shadow)."""
        version, label = parse_version(version_text)
        served = self._while_starting(lambda: self.repository.resolve(name, version, label))
        call.model, call.version = served.name, served.version
        return served

    def _route(self, call: CallRecord, name: str, version_text: str) -> Routed:
        """The version that answers an inference call (by number, label, or the split on its id)."""
        version, label = parse_version(version_text)
        routed = self._while_starting(lambda: self.core.route(name, version, label, call.request_id))
        call.model, call.version = routed.served.name, routed.served.version
        return routed

    def _while_starting(self, find: Callable[[], T]) -> T:
        try:
            return find()
        except ModelNotFound:
            if not self.repository.statuses():  # the first scan has not finished
                raise ModelNotReady("the server is starting: no model is loaded yet; retry") from None
            raise

    @staticmethod
    def _model_of(served: ServedVersion) -> OnnxModel:
        model = served.model
        if model is None:  # released by a reload between routing and now
            raise ModelNotReady(f"model {served.name!r} version {served.version} is being replaced; retry")
        return model

    # ---- health and metadata -------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        async def handler(call: CallRecord) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._unary("ServerLive", context, handler)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        async def handler(call: CallRecord) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self._ready())

        return await self._unary("ServerReady", context, handler)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        async def handler(call: CallRecord) -> pb.ModelReadyResponse:
            try:
                self._resolve(call, request.name, request.version)
            except (ModelNotFound, ModelNotReady):
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._unary("ModelReady", context, handler)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        async def handler(call: CallRecord) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

        return await self._unary("ServerMetadata", context, handler)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        async def handler(call: CallRecord) -> pb.ModelMetadataResponse:
            served = self._resolve(call, request.name, request.version)
            model = self._model_of(served)
            if request.version:
                versions = [str(served.version)]
            else:
                versions = [str(s.version) for s in self.repository.statuses()
                            if s.name == served.name and s.state is VersionState.AVAILABLE]
            return pb.ModelMetadataResponse(
                name=served.name, versions=versions, platform=PLATFORM,
                inputs=[pb.ModelMetadataResponse.TensorMetadata(
                    name=model.input.name, datatype=tensors.UINT8, shape=model.input_shape)],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)
                         for name, datatype, shape in output_specs(model)],
            )

        return await self._unary("ModelMetadata", context, handler)

    # ---- inference -----------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return await self._unary("ModelInfer", context, lambda call: self._infer(request, call), request.id)

    async def _infer(self, request: pb.ModelInferRequest, call: CallRecord) -> pb.ModelInferResponse:
        routed = self._route(call, request.model_name, request.model_version)
        served = routed.served
        model = self._model_of(served)
        tensor = self._input_tensor(request, model)
        outputs = self._requested_outputs(request, model)
        threshold = self._unsure_threshold(request)
        started = time.perf_counter()
        pixels = await self._to_pixels(tensor)
        self.core.observe_decode(time.perf_counter() - started, served.name, served.version)
        call.images = len(pixels)
        outcome = await self.core.infer(pixels, routed, call.deadline)
        # top_k also counts the images by predicted class, so every answer is counted once.
        most = max((o.class_count or 1 for o in outputs), default=1)
        ranked = self.core.top_k(outcome, min(most, outcome.probabilities.shape[1]))
        flags = np.array(self.core.unsure(outcome, threshold), dtype=bool)
        response = pb.ModelInferResponse(
            model_name=outcome.served.name, model_version=str(outcome.served.version), id=request.id,
        )
        raw = len(request.raw_input_contents) > 0
        for output in outputs:
            if output.class_count is not None:
                self._add_classes(response, output.name, ranked, output.class_count, raw)
            elif output.name == UNSURE:
                self._add_tensor(response, output.name, tensors.BOOL, flags, raw)
            elif output.name == UNSURE_SCORE:
                self._add_tensor(response, output.name, tensors.FP32, outcome.unsure_scores, raw)
            else:
                self._add_tensor(response, output.name, tensors.FP32, outcome.probabilities, raw)
        return response

    def _input_tensor(self, request: pb.ModelInferRequest, model: OnnxModel) -> tensors.InputTensor:
        if len(request.inputs) != 1:
            raise InvalidInput(
                f"model {model.name!r} takes 1 input ('{model.input.name}'), the request has {len(request.inputs)}",
                reason="bad_inputs",
            )
        given = request.inputs[0]
        if given.name != model.input.name:
            raise InvalidInput(
                f"unexpected input '{given.name}' for model {model.name!r}: its input is '{model.input.name}'",
                reason="bad_inputs",
            )
        raw = None
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise InvalidInput(
                    f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                    f"{len(request.inputs)} input (one per input, in order)",
                    reason="bad_length",
                )
            if given.HasField("contents"):
                raise InvalidInput(
                    f"input '{given.name}' has both contents and raw_input_contents: send one",
                    reason="bad_inputs",
                )
            raw = request.raw_input_contents[0]
        field = tensors.CONTENTS_FIELD.get(given.datatype)
        values = getattr(given.contents, field) if raw is None and field else None
        return tensors.InputTensor(given.name, given.datatype, tuple(given.shape), raw, values)

    def _requested_outputs(self, request: pb.ModelInferRequest, model: OnnxModel) -> list[RequestedOutput]:
        names = [name for name, _, _ in output_specs(model)]
        if not request.outputs:
            return [RequestedOutput(name) for name in names]
        outputs = []
        for wanted in request.outputs:
            if wanted.name not in names:
                raise InvalidInput(
                    f"unexpected output '{wanted.name}' for model {model.name!r}: its outputs are "
                    + ", ".join(f"'{name}'" for name in names),
                    reason="bad_outputs",
                )
            class_count = None
            if CLASSIFICATION in wanted.parameters:
                if wanted.name != model.output.name:
                    raise InvalidInput(f"output '{wanted.name}': only '{model.output.name}' takes the "
                                       "classification parameter", reason="bad_outputs")
                class_count = self._class_count(wanted.name, wanted.parameters[CLASSIFICATION], model.num_classes)
            outputs.append(RequestedOutput(wanted.name, class_count))
        return outputs

    @staticmethod
    def _unsure_threshold(request: pb.ModelInferRequest) -> float | None:
        if UNSURE_THRESHOLD not in request.parameters:
            return None
        parameter = request.parameters[UNSURE_THRESHOLD]
        kind = parameter.WhichOneof("parameter_choice")
        if kind not in ("double_param", "int64_param", "uint64_param"):
            raise InvalidInput(f"parameter '{UNSURE_THRESHOLD}' must be a number (double_param), got {kind}",
                               reason="bad_unsure_threshold")
        return check_threshold(float(getattr(parameter, kind)))

    @staticmethod
    def _class_count(name: str, parameter: pb.InferParameter, num_classes: int) -> int:
        kind = parameter.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            raise InvalidInput(
                f"output '{name}': parameter 'classification' must be an integer (int64_param), got {kind}",
                reason="bad_top_k",
            )
        count = getattr(parameter, kind)
        if count < 1:
            raise InvalidInput(f"output '{name}': classification count is {count}, expected >= 1", reason="bad_top_k")
        return min(count, num_classes)

    async def _to_pixels(self, tensor: tensors.InputTensor) -> np.ndarray:
        zero_copy = tensor.raw is not None and tensor.datatype == tensors.UINT8
        if zero_copy or tensor.payload_bytes <= CONVERT_INLINE_MAX_BYTES:
            return tensors.to_pixels(tensor, self.max_images, self.max_pixels)
        return await asyncio.get_running_loop().run_in_executor(
            None, tensors.to_pixels, tensor, self.max_images, self.max_pixels
        )

    @staticmethod
    def _add_tensor(response: pb.ModelInferResponse, name: str, datatype: str, values: np.ndarray, raw: bool) -> None:
        output = response.outputs.add(name=name, datatype=datatype, shape=values.shape)
        if raw:
            response.raw_output_contents.append(tensors.raw_bytes(values, datatype))
        elif datatype == tensors.BOOL:
            output.contents.bool_contents.extend(values.tolist())
        else:
            output.contents.fp32_contents.extend(values.ravel().tolist())

    @staticmethod
    def _add_classes(response: pb.ModelInferResponse, name: str, ranked, class_count: int, raw: bool) -> None:
        entries = [tensors.classification_entry(c.probability, c.class_index, c.label)
                   for row in ranked for c in row[:class_count]]
        output = response.outputs.add(name=name, datatype=tensors.BYTES, shape=[len(ranked), class_count])
        if raw:
            response.raw_output_contents.append(tensors.join_bytes(entries))
        else:
            output.contents.bytes_contents.extend(entries)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently and are answered in order; a failed
        request answers with error_message (and its id) and the stream goes on."""
        stream_call = self.calls.record("ModelStreamInfer", PROTOCOL, context)

        async def one(received: pb.ModelInferRequest | CorruptMessage) -> tuple[pb.ModelStreamInferResponse, int]:
            request = pb.ModelInferRequest() if isinstance(received, CorruptMessage) else received
            call = self.calls.record("ModelStreamInfer", PROTOCOL, context, request.id)
            try:
                response = await self._infer(parsed(received), call)
                return pb.ModelStreamInferResponse(infer_response=response), call.images
            except Exception as exc:  # noqa: BLE001 - answered in the stream, never leaked
                code, message, reason = status_of(exc, call.request_id)
                if not isinstance(exc, ServingError):
                    log.exception("stream request %s failed", call.request_id)
                self.calls.count_rejection(reason, PROTOCOL, code)
                failed = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                return pb.ModelStreamInferResponse(error_message=message, infer_response=failed), 0

        async for response in self.calls.ordered_stream(stream_call, request_iterator, one):
            yield response

    # ---- model repository extension -----------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        """Every version the repository knows, with Triton's state names; one repository, so
        repository_name is not used."""
        async def handler(call: CallRecord) -> pb.RepositoryIndexResponse:
            response = pb.RepositoryIndexResponse()
            for served in self.repository.statuses():
                state = STATE_NAMES[served.state]
                if request.ready and state != "READY":
                    continue
                response.models.add(name=served.name, version=str(served.version), state=state, reason=served.error)
            return response

        return await self._unary("RepositoryIndex", context, handler)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context) -> pb.RepositoryModelLoadResponse:
        async def handler(call: CallRecord) -> pb.RepositoryModelLoadResponse:
            if request.parameters:
                raise NotSupported(
                    f"load parameters ({', '.join(sorted(request.parameters))}) are not supported: put the "
                    "version's model.onnx and model_card.json in the model repository, then load"
                )
            validate_model_name(request.model_name)
            await self._reload()
            self.repository.check_config_in_force()
            self._resolve(call, request.model_name, "")
            return pb.RepositoryModelLoadResponse()

        return await self._unary("RepositoryModelLoad", context, handler)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context) -> pb.RepositoryModelUnloadResponse:
        async def handler(call: CallRecord) -> pb.RepositoryModelUnloadResponse:
            raise NotSupported(
                "unloading by RPC is not supported: the model repository is file-based, so remove the "
                "model's directory (or narrow its version policy in repository.json) and call "
                "RepositoryModelLoad, ReloadModels or send SIGHUP to rescan"
            )

        return await self._unary("RepositoryModelUnload", context, handler)
