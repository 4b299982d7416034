"""Explanations of one image: a saliency heatmap for one class, and feature maps. No gRPC here.

Methods (docs/explain.md):
- occlusion: each patch of the image in turn is covered with the image's mean colour; a
  pixel's saliency is the mean fall of the target's log-probability over the patches that
  cover it. Forward passes of model.onnx only (one batch), so every version has it.
- grad_cam: Grad-CAM on the last convolution block, from the explain graph exported beside
  the model (explain.onnx: activations and the target logit's gradient, training/explain_graph.py).

Feature maps come from explain.onnx when the version has one. Otherwise intermediate tensors
of model.onnx are made graph outputs (the `onnx` package, when the version's explainer is
built): the tensors the card's `explain` section names (a quantized copy keeps them), else the
output of every ReLU of the network that sees every image, named relu1, relu2... in graph order.

Each version's explainer has its own onnxruntime sessions, built on first use; explanations
run on their own worker threads behind their own bounded queue (ExplanationService), so a
burst of them never sits in a batcher queue ahead of Classify.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable
from weakref import WeakKeyDictionary

import numpy as np

from serving import explain_render
from serving.errors import DeadlineExpired, InferenceFailed, InvalidInput, ModelNotReady, NotSupported, Overloaded, ServingError
from serving.metrics import ServingMetrics
from serving.repository import Routed, ServedVersion
from serving.runtime import MODEL_FILE, OnnxModel, RuntimeOptions, create_session
from serving.service import InferenceCore, InferenceOutcome

log = logging.getLogger(__name__)

OCCLUSION, GRAD_CAM = "occlusion", "grad_cam"
EXPLAIN_FILE = "explain.onnx"
EXPLAIN_METADATA_KEY = "explain"  # explain.onnx's description of itself (training/explain_graph.py)
TARGET_INPUT, GRADIENT_OUTPUT = "target", "gradient"
SIZE = 32
DEFAULT_PATCH = 8  # with the default stride (4): 7 x 7 = 49 occluded images + the image itself
MAX_OCCLUSION_PASSES = 256  # occluded images per explanation (patch 4 stride 2 is 225)
OCCLUSION_CHUNK = 64  # images per onnxruntime run, which bounds the session's memory arena
LOG_FLOOR = 1e-12  # probabilities below this count as this in the log-probability drop
DEEP_LAYER_MIN_SIDE = 8  # the default deeper layer is the deepest with at least 8x8 cells
DEQUANTIZED = "_DequantizeLinear_Output"  # onnxruntime's QDQ quantizer's name for x's int8 round trip


@dataclass(frozen=True)
class Layer:
    """A layer whose feature maps can be returned."""

    name: str
    shape: tuple[int, int, int]  # [height, width, channels]
    default: bool
    tensor: str  # the graph output that holds it (in explain.onnx, or model.onnx made to output it)
    description: str = ""
    # [C, H, W] in the graph (ONNX convolutions); None: whichever order the output's shape shows
    channels_first: bool | None = None


@dataclass(frozen=True)
class CamGeometry:
    """Grad-CAM's layer and where its cells sit: cell i is centred at stride * i + offset pixels."""

    layer: str
    stride: float
    offset: float


@dataclass(frozen=True)
class ExplainOptions:
    """What a caller asked for; 0 / empty / None mean the defaults."""

    method: str = ""
    target_class: int | None = None
    layers: tuple[str, ...] = ()
    feature_maps: bool = True
    images: bool = True  # render the PNGs
    occlusion_patch: int = 0
    occlusion_stride: int = 0


@dataclass(frozen=True)
class ExplainPlan:
    """Options checked against what the version offers, defaults filled in."""

    method: str
    layers: tuple[Layer, ...]
    patch: int
    stride: int
    images: bool


@dataclass
class FeatureMap:
    layer: Layer
    values: np.ndarray  # float32 [height, width, channels]
    png: bytes = b""


@dataclass
class Explanation:
    method: str
    target_class: int
    heatmap: np.ndarray  # float32 [32, 32] in [0, 1]
    heatmap_png: bytes
    feature_maps: list[FeatureMap]
    forward_passes: int
    queue_wait_s: float = 0.0
    compute_s: float = 0.0


@dataclass
class ExplainResult:
    outcome: InferenceOutcome  # the prediction, exactly as Classify would answer it
    explanation: Explanation


# ---- the methods (pure numpy) -----------------------------------------------------------------

def normalised(heat: np.ndarray) -> np.ndarray:
    """Negative saliency (covering it raised the score) to 0, the maximum to 1; all 0 when nothing is positive."""
    top = float(np.max(heat))
    if not np.isfinite(top) or top <= 0:
        return np.zeros(heat.shape, np.float32)
    return (np.clip(heat, 0, None) / top).astype(np.float32)


def occlusion_corners(patch: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the patches: every stride, and flush with the far edges."""
    last = SIZE - patch
    positions = list(range(0, last + 1, stride))
    if positions[-1] != last:
        positions.append(last)
    return [(y, x) for y in positions for x in positions]


def occluded_images(pixels: np.ndarray, corners: list[tuple[int, int]], patch: int) -> np.ndarray:
    """One copy of the image per corner, with that patch covered by the image's mean colour."""
    fill = np.rint(pixels.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    batch = np.repeat(pixels[None], len(corners), axis=0)
    for index, (y, x) in enumerate(corners):
        batch[index, y:y + patch, x:x + patch] = fill
    return batch


def occlusion_heatmap(baseline: float, occluded: np.ndarray, corners: list[tuple[int, int]], patch: int) -> np.ndarray:
    """Per pixel, the mean fall of log p(target) over the patches covering it, normalised."""
    drops = np.log(max(baseline, LOG_FLOOR)) - np.log(np.maximum(occluded, LOG_FLOOR))
    total = np.zeros((SIZE, SIZE), np.float64)
    covered = np.zeros((SIZE, SIZE), np.float64)
    for drop, (y, x) in zip(drops, corners):
        total[y:y + patch, x:x + patch] += drop
        covered[y:y + patch, x:x + patch] += 1
    return normalised(total / covered)


def upsample_cells(cells: np.ndarray, stride: float, offset: float) -> np.ndarray:
    """[h, w] cell values -> [32, 32], bilinear between cell centres (clamped at the edges)."""
    def axis(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        where = np.clip((np.arange(SIZE) + 0.5 - offset) / stride, 0, count - 1)
        low = np.floor(where).astype(np.intp)
        return low, np.minimum(low + 1, count - 1), where - low

    y0, y1, fy = axis(cells.shape[0])
    x0, x1, fx = axis(cells.shape[1])
    rows = cells[y0] * (1 - fy)[:, None] + cells[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def grad_cam(activations: np.ndarray, gradient: np.ndarray, geometry: CamGeometry) -> np.ndarray:
    """Grad-CAM (Selvaraju et al.): channel weights = the gradient's spatial mean; the map is
    ReLU(sum of the weighted activations), upsampled onto the image and normalised."""
    weights = gradient.mean(axis=(0, 1))
    cam = np.maximum(activations @ weights, 0.0)
    return normalised(upsample_cells(cam, geometry.stride, geometry.offset))


def to_hwc(values: np.ndarray, layer: Layer) -> np.ndarray:
    """One image's feature maps as [H, W, C] (ONNX convolutions lay them out channels first)."""
    height, width, channels = layer.shape
    if values.shape == layer.shape and not layer.channels_first:
        return np.ascontiguousarray(values, dtype=np.float32)
    if values.shape == (channels, height, width) and layer.channels_first is not False:
        return np.ascontiguousarray(values.transpose(1, 2, 0), dtype=np.float32)
    raise InferenceFailed(f"layer {layer.name}: a feature map has shape {list(values.shape)}, expected {list(layer.shape)}")


# ---- what a version's graphs offer ------------------------------------------------------------

class ExplainGraphInvalid(Exception):
    pass


def _with_defaults(layers: list[Layer]) -> list[Layer]:
    """No layer marked default: the first, and the deepest with at least 8x8 cells."""
    if not layers or any(layer.default for layer in layers):
        return layers
    deep = [i for i, layer in enumerate(layers) if min(layer.shape[:2]) >= DEEP_LAYER_MIN_SIDE]
    chosen = {0, deep[-1] if deep else len(layers) - 1}
    return [replace(layer, default=i in chosen) for i, layer in enumerate(layers)]


def declared_layers(section: dict, produced: set[str]) -> list[Layer]:
    """The layers the card's `explain` section maps to model.onnx tensors (training/explain_graph.py).
    A quantized copy has each as its dequantized round trip, and onnxruntime's optimizer may have
    dropped the ':0' of a name."""
    layers = []
    for entry in section.get("layers", []) if isinstance(section, dict) else []:
        tensor = entry.get("model_tensor") if isinstance(entry, dict) else None
        if not tensor:
            continue
        bare = tensor.rsplit(":", 1)[0] if tensor.rsplit(":", 1)[-1].isdigit() else tensor
        found = next((t for t in (tensor + DEQUANTIZED, tensor, bare + DEQUANTIZED, bare) if t in produced), None)
        if found is None:
            log.warning("layer %r: tensor %r is not in the graph; not offered", entry.get("name"), tensor)
            continue
        # A renamed tensor may have been moved across a transpose too: its layout is then read from its shape.
        layout = entry.get("model_tensor_layout") if found in (tensor, tensor + DEQUANTIZED) else None
        layers.append(Layer(str(entry["name"]), tuple(int(d) for d in entry["shape"]), bool(entry.get("default")),
                            found, f"ONNX tensor {found}", channels_first=None if layout is None else layout == "NCHW"))
    return layers


def discovered_relus(model, produced: set[str]) -> list[Layer]:
    """Every ReLU output of the network that sees every image (its batch dimension is the input's:
    an ensemble's gated members see a subset), in graph order. A QDQ-quantized graph has each
    ReLU folded into its convolution, which keeps the ReLU's output name."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {info.name: info.type.tensor_type.shape.dim
              for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    batch = shapes[model.graph.input[0].name][0]
    layers = []
    for node in inferred.graph.node:
        tensor = node.output[0] if node.output else ""
        if not (node.op_type == "Relu" or (node.op_type == "Conv" and tensor.endswith("/Relu:0"))):
            continue
        dims = shapes.get(tensor)
        if dims is None or len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
            continue
        if (dims[0].dim_param, dims[0].dim_value) != (batch.dim_param, batch.dim_value):
            continue
        channels, height, width = (int(d.dim_value) for d in dims[1:])  # ONNX convolutions are NCHW
        name = f"relu{len(layers) + 1}"
        fetched = tensor + DEQUANTIZED if tensor + DEQUANTIZED in produced else tensor
        layers.append(Layer(name, (height, width, channels), False, fetched, f"ReLU output (ONNX tensor {fetched})",
                            channels_first=True))
    return _with_defaults(layers)


def with_outputs(model, tensors: list[str]) -> bytes:
    """model.onnx with these intermediate tensors as extra graph outputs."""
    from onnx import TensorProto, helper

    existing = {output.name for output in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in existing
    )
    return model.SerializeToString()


def card_section(model: OnnxModel) -> dict:
    section = model.card.raw.get("explain")
    return section if isinstance(section, dict) else {}


class ModelExplainer:
    """What one model version can explain, and the onnxruntime sessions that do it.

    Built off the event loop (it parses the graphs); the sessions are created by the first
    explanation. `explain` runs on an explain worker thread."""

    def __init__(self, model: OnnxModel, runtime: RuntimeOptions):
        import onnx

        self.name, self.version, self.num_classes = model.name, model.version, model.num_classes
        self._runtime = runtime
        self._model_output = model.output.name
        self._input = model.input.name
        model_bytes = self._read(model.directory / MODEL_FILE, model.sha256)
        section = card_section(model)
        self.grad_cam: CamGeometry | None = None
        self._explain_bytes: bytes | None = None
        graph_path = model.directory / EXPLAIN_FILE
        if graph_path.exists():
            try:
                self._explain_bytes, self.layers, self.grad_cam = self._read_explain_graph(graph_path, section)
            except (ExplainGraphInvalid, OSError, ValueError, KeyError, TypeError) as exc:
                log.error("%s v%d: %s not used (occlusion only): %s", self.name, self.version, EXPLAIN_FILE, exc)
        self._feature_bytes: bytes | None = None
        if self._explain_bytes is None:
            proto = onnx.load_from_string(model_bytes)
            produced = {output for node in proto.graph.node for output in node.output}
            self.layers = _with_defaults(declared_layers(section, produced)) or discovered_relus(proto, produced)
            if self.layers:
                self._feature_bytes = with_outputs(proto, [layer.tensor for layer in self.layers])
        self._model_bytes: bytes | None = model_bytes
        self.methods: tuple[str, ...] = (OCCLUSION, GRAD_CAM) if self.grad_cam else (OCCLUSION,)
        self._lock = threading.Lock()
        self._plain = self._features = None

    @staticmethod
    def _read(path, sha256: str | None) -> bytes:
        data = path.read_bytes()
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise ModelNotReady(f"{path.name} changed on disk since this version was loaded; retry after the reload")
        return data

    def _read_explain_graph(self, path, section: dict) -> tuple[bytes, list[Layer], CamGeometry]:
        import onnx

        data = self._read(path, None)
        if section.get("sha256") and hashlib.sha256(data).hexdigest() != section["sha256"]:
            raise ExplainGraphInvalid("its sha256 does not match the model card's")
        proto = onnx.load_from_string(data)
        meta = {entry.key: entry.value for entry in proto.metadata_props}
        if EXPLAIN_METADATA_KEY not in meta:
            raise ExplainGraphInvalid(f"no {EXPLAIN_METADATA_KEY!r} metadata")
        description = json.loads(meta[EXPLAIN_METADATA_KEY])
        outputs = {output.name for output in proto.graph.output}
        inputs = {graph_input.name for graph_input in proto.graph.input}
        layers = [Layer(entry["name"], tuple(int(d) for d in entry["shape"]), bool(entry.get("default")), entry["name"],
                        entry.get("description", ""), channels_first=False) for entry in description["layers"]]
        cell = description["grad_cam_cell"]
        geometry = CamGeometry(description["grad_cam_layer"], float(cell["stride"]), float(cell["offset"]))
        missing = {self._model_output, GRADIENT_OUTPUT, geometry.layer, *(layer.tensor for layer in layers)} - outputs
        if missing or {self._input, TARGET_INPUT} - inputs:
            raise ExplainGraphInvalid(f"its inputs are {sorted(inputs)} and it lacks the outputs {sorted(missing)}")
        return data, _with_defaults(layers), geometry

    # ---- checking a request (event loop) ------------------------------------------------------

    def plan(self, options: ExplainOptions) -> ExplainPlan:
        method = options.method or self.methods[0]
        if method not in self.methods:
            raise InvalidInput(
                f"{self.name} v{self.version} does not offer {method} explanations (it offers: {', '.join(self.methods)})",
                reason="bad_explain_method",
            )
        if options.target_class is not None and not 0 <= options.target_class < self.num_classes:
            raise InvalidInput(f"target_class is {options.target_class}, expected 0..{self.num_classes - 1} "
                               "(or unset for the top-1 class)", reason="bad_target_class")
        by_name = {layer.name: layer for layer in self.layers}
        unknown = [name for name in options.layers if name not in by_name]
        if unknown:
            raise InvalidInput(f"no layer {unknown[0]!r} in {self.name} v{self.version} (layers: "
                               f"{', '.join(by_name) or 'none'})", reason="bad_layer")
        if not options.feature_maps:
            layers: tuple[Layer, ...] = ()
        elif options.layers:
            layers = tuple(dict.fromkeys(by_name[name] for name in options.layers))
        else:
            layers = tuple(layer for layer in self.layers if layer.default)
        patch = options.occlusion_patch or DEFAULT_PATCH
        stride = options.occlusion_stride or max(1, patch // 2)
        if not 1 <= patch <= SIZE:
            raise InvalidInput(f"occlusion patch_size is {patch}, expected 1..{SIZE}", reason="bad_occlusion")
        if not 1 <= stride <= patch:
            raise InvalidInput(f"occlusion stride is {stride}, expected 1..patch_size ({patch}): a larger one "
                               "leaves pixels no patch covers", reason="bad_occlusion")
        passes = len(occlusion_corners(patch, stride))
        if method == OCCLUSION and passes > MAX_OCCLUSION_PASSES:
            raise InvalidInput(f"occlusion patch_size {patch} with stride {stride} needs {passes} forward passes, "
                               f"over the limit of {MAX_OCCLUSION_PASSES}: use a larger stride", reason="bad_occlusion")
        return ExplainPlan(method, layers, patch, stride, options.images)

    # ---- explaining (an explain worker thread) ------------------------------------------------

    def _sessions(self):
        with self._lock:
            if self._plain is None:
                # No spin-waiting: an explanation is one large run, and spinning threads would
                # take cycles from the sessions that serve Classify.
                options = replace(self._runtime, intra_op_spinning=False)
                plain = create_session(self._model_bytes, options)
                features = self._explain_bytes or self._feature_bytes
                self._features = create_session(features, options, EXPLAIN_FILE if self._explain_bytes else MODEL_FILE) \
                    if features else None
                self._plain = plain
                self._model_bytes = self._feature_bytes = self._explain_bytes = None
            return self._plain, self._features

    def explain(self, pixels: np.ndarray, plan: ExplainPlan, target: int) -> Explanation:
        try:
            return self._explain(pixels, plan, target)
        except ServingError:
            raise
        except Exception as exc:  # noqa: BLE001 - details to the log, INTERNAL to the client
            log.exception("explanation failed in %s v%d", self.name, self.version)
            raise InferenceFailed("the explanation failed inside the model runtime; see the server log") from exc

    def _explain_feeds(self, session, pixels: np.ndarray, target: int) -> dict[str, np.ndarray]:
        """explain.onnx's inputs: the image and the class whose logit's gradient it computes."""
        kinds = {graph_input.name: graph_input.type for graph_input in session.get_inputs()}
        dtype = np.int64 if kinds[TARGET_INPUT] == "tensor(int64)" else np.int32
        return {self._input: pixels[None], TARGET_INPUT: np.array([target], dtype)}

    def _explain(self, pixels: np.ndarray, plan: ExplainPlan, target: int) -> Explanation:
        plain, features = self._sessions()
        fetched: dict[str, np.ndarray] = {}
        if plan.method == GRAD_CAM:
            geometry = self.grad_cam
            names = list(dict.fromkeys([geometry.layer, GRADIENT_OUTPUT, *(layer.tensor for layer in plan.layers)]))
            values = features.run(names, self._explain_feeds(features, pixels, target))
            fetched = {name: value[0] for name, value in zip(names, values)}
            heatmap = grad_cam(fetched[geometry.layer], fetched[GRADIENT_OUTPUT], geometry)
            passes = 1
        else:
            corners = occlusion_corners(plan.patch, plan.stride)
            batch = np.concatenate([pixels[None], occluded_images(pixels, corners, plan.patch)])
            probabilities = np.concatenate([
                plain.run([self._model_output], {self._input: batch[i:i + OCCLUSION_CHUNK]})[0]
                for i in range(0, len(batch), OCCLUSION_CHUNK)
            ])
            heatmap = occlusion_heatmap(float(probabilities[0, target]), probabilities[1:, target], corners, plan.patch)
            passes = len(batch)
            if plan.layers:
                names = [layer.tensor for layer in plan.layers]
                feeds = self._explain_feeds(features, pixels, target) if self.grad_cam else {self._input: pixels[None]}
                fetched = dict(zip(names, (value[0] for value in features.run(names, feeds))))
                passes += 1
        maps = []
        for layer in plan.layers:
            values = to_hwc(fetched[layer.tensor], layer)
            maps.append(FeatureMap(layer, values, explain_render.feature_grid_png(values) if plan.images else b""))
        overlay = explain_render.overlay_png(pixels, heatmap) if plan.images else b""
        return Explanation(plan.method, target, heatmap, overlay, maps, passes)


# ---- the queue ------------------------------------------------------------------------------

class ExplanationService:
    """Explanations for every API face: an explainer per served version, built on first use,
    and a bounded queue in front of `workers` threads. A full queue refuses at once
    (RESOURCE_EXHAUSTED); a request whose deadline passed while it waited is not computed."""

    def __init__(self, core: InferenceCore, metrics: ServingMetrics, runtime: RuntimeOptions,
                 enabled: bool = True, workers: int = 1, max_waiting: int = 8):
        self.core, self.metrics, self.runtime = core, metrics, runtime
        self.enabled, self.workers, self.max_waiting = enabled, workers, max_waiting
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="explain") if enabled else None
        # Dies with its ServedVersion: an unloaded version's explain sessions are freed with it.
        self._explainers: WeakKeyDictionary[ServedVersion, ModelExplainer] = WeakKeyDictionary()
        self._build_lock = threading.Lock()
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + running
        self._running = 0

    async def explainer(self, served: ServedVersion) -> ModelExplainer | None:
        """The version's explainer (None with --explain=false); the first call per version parses
        its graphs on a thread."""
        if not self.enabled:
            return None
        found = self._explainers.get(served)
        if found is not None:
            return found
        return await asyncio.get_running_loop().run_in_executor(None, self._explainer_of, served)

    def _explainer_of(self, served: ServedVersion) -> ModelExplainer:
        with self._build_lock:
            found = self._explainers.get(served)
            if found is None:
                if served.model is None:
                    raise ModelNotReady(f"model {served.name} v{served.version} is no longer loaded; retry")
                try:
                    found = ModelExplainer(served.model, self.runtime)
                except OSError as exc:  # its directory went away: a reload will follow
                    raise ModelNotReady(f"model {served.name} v{served.version} files are unreadable: "
                                        f"{exc.strerror or exc}; retry") from None
                except ServingError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a graph the onnx package cannot read or infer
                    log.exception("%s v%d cannot explain", served.name, served.version)
                    raise InferenceFailed(f"model {served.name} v{served.version} cannot explain; see the server log") from exc
                self._explainers[served] = found
                log.info("%s v%d explains with %s; layers %s", served.name, served.version,
                         ", ".join(found.methods), ", ".join(layer.name for layer in found.layers) or "none")
            return found

    async def explain(self, routed: Routed, pixels: np.ndarray, options: ExplainOptions,
                      deadline: float | None) -> ExplainResult:
        served = routed.served
        explainer = await self.explainer(served)
        if explainer is None:
            raise NotSupported("explanations are off on this server (--explain=false)")
        plan = explainer.plan(options)
        outcome = await self.core.infer(pixels[None], routed, deadline)
        target = options.target_class if options.target_class is not None else int(np.argmax(outcome.probabilities[0]))
        future = self._submit(lambda: explainer.explain(pixels, plan, target), deadline)
        explanation: Explanation = await asyncio.wrap_future(future)
        version, phases = str(served.version), self.metrics.phase_latency
        self.metrics.child(phases, "explain_wait", served.name, version).observe(explanation.queue_wait_s)
        self.metrics.child(phases, "explain", served.name, version).observe(explanation.compute_s)
        return ExplainResult(outcome, explanation)

    def _submit(self, job: Callable[[], Explanation], deadline: float | None) -> Future:
        with self._lock:
            waiting = self._admitted - self._running
            if self._admitted >= self.workers + self.max_waiting:
                raise Overloaded(
                    f"the explanation queue is full ({waiting} waiting, --max-queued-explanations "
                    f"{self.max_waiting}); retry after a short back-off",
                    retry_after_ms=200, reason="explain_queue_full",
                )
            self._admitted += 1
        future = self._pool.submit(self._run, job, deadline, time.monotonic())
        future.add_done_callback(self._finished)
        self._publish_depth()
        return future

    def _run(self, job: Callable[[], Explanation], deadline: float | None, enqueued: float) -> Explanation:
        with self._lock:
            self._running += 1
        self._publish_depth()
        try:
            started = time.monotonic()
            if deadline is not None and deadline <= started:
                raise DeadlineExpired("the request's deadline passed while it waited for an explanation worker; "
                                      "it was not computed")
            explanation = job()
            explanation.queue_wait_s, explanation.compute_s = started - enqueued, time.monotonic() - started
            return explanation
        finally:
            with self._lock:
                self._running -= 1

    def _finished(self, future: Future) -> None:
        """Every admitted request ends here once: computed, failed, or cancelled while waiting."""
        with self._lock:
            self._admitted -= 1
        self._publish_depth()

    def _publish_depth(self) -> None:
        with self._lock:
            waiting = self._admitted - self._running
        self.metrics.explain_queue_depth.set(max(waiting, 0))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
