"""The explain graph of a patch-whitened net: `explain.onnx` beside `model.onnx` (docs/explain.md).

    images uint8 [N, 32, 32, 3], target int32 [N]
      -> probabilities [N, 10], whiten_act, block1, block2, block3 (NHWC feature maps),
         gradient [N, 3, 3, 256]: d logit[target] / d block3

The whitened net's head is global max pooling and one dense layer without bias, scaled by
1/9, so the gradient of a class's logit with respect to the last block's activations is
analytic: the dense weight of each channel for that class, times 1/9, at the channel's spatial
maximum and zero elsewhere (shared equally between tied maxima, as TensorFlow's gradient of a
max does). It is built from plain Keras ops, no autodiff, so tf2onnx converts it and serving
needs no TensorFlow; tests/test_explain_graph.py checks it against tf.GradientTape.

`export_explain_graph` also finds, by value, the tensors of `model.onnx` that hold the same
feature maps, and records them in the card: a quantized copy of the model keeps those tensor
names, so it can still offer feature maps without an explain graph.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

import keras
from keras import layers, ops

from training.models import INPUT_NAME, OUTPUT_NAME, PatchWhitening

EXPLAIN_FILE = "explain.onnx"
METADATA_KEY = "explain"  # explain.onnx's metadata_props entry that describes it (JSON)
TARGET_NAME = "target"
GRADIENT_NAME = "gradient"
FEATURE_LAYERS = ("whiten_act", "block1", "block2", "block3")
DEFAULT_LAYERS = ("block1", "block2")  # the first conv block after its activation, and a deeper one
CAM_LAYER = "block3"  # the last conv block, after its GELU: what Grad-CAM weighs
HEAD_LAYER, SCALE_LAYER = "head", "logits"
METHODS = ("occlusion", "grad_cam")
PARITY_TOLERANCE = 1e-4
MATCH_TOLERANCE = 1e-3  # a model.onnx tensor is a layer's output when it agrees this closely


class ExplainGraphError(RuntimeError):
    pass


def is_explainable(model: keras.Model) -> bool:
    """A whitened net (training.models.whitened_net): every layer the graph taps is there."""
    names = {layer.name for layer in model.layers}
    return {*FEATURE_LAYERS, HEAD_LAYER, SCALE_LAYER} <= names


@keras.saving.register_keras_serializable(package="cifar10")
class MaxPoolLogitGradient(layers.Layer):
    """d (scale * max_hw(A) . W[:, t]) / d A, for activations A [N, H, W, C] and targets t [N]."""

    def __init__(self, kernel, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.kernel = np.asarray(kernel, dtype="float32")  # [C, classes], the head's dense weights
        self.scale = float(scale)

    def call(self, activations, target):
        peak = ops.max(activations, axis=(1, 2), keepdims=True)
        at_peak = ops.cast(ops.equal(activations, peak), activations.dtype)
        share = at_peak / ops.sum(at_peak, axis=(1, 2), keepdims=True)
        weights = ops.take(ops.convert_to_tensor(self.kernel.T * self.scale), target, axis=0)  # [N, C]
        return share * weights[:, None, None, :]


def explain_model(trained: keras.Model) -> keras.Model:
    """The Keras explain graph of a whitened net (same layers, same weights)."""
    if not is_explainable(trained):
        raise ExplainGraphError(f"{trained.name} is not a whitened net: it lacks some of {FEATURE_LAYERS}")
    taps = keras.Model(trained.inputs, [trained.output, *(trained.get_layer(n).output for n in FEATURE_LAYERS)])
    images = keras.Input(shape=(32, 32, 3), dtype="uint8", name=INPUT_NAME)
    target = keras.Input(shape=(), dtype="int32", name=TARGET_NAME)
    probabilities, *features = taps(images)
    kernel = ops.convert_to_numpy(trained.get_layer(HEAD_LAYER).kernel)
    scale = float(trained.get_layer(SCALE_LAYER).scale)
    gradient = MaxPoolLogitGradient(kernel, scale, name=GRADIENT_NAME)(features[FEATURE_LAYERS.index(CAM_LAYER)], target)
    return keras.Model([images, target], [probabilities, *features, gradient], name=f"{trained.name}_explain")


def output_names() -> list[str]:
    return [OUTPUT_NAME, *FEATURE_LAYERS, GRADIENT_NAME]


def cell_geometry(trained: keras.Model, layer_name: str) -> tuple[float, float]:
    """(stride, offset) in input pixels of a layer's cells: cell i is centred at stride*i + offset,
    pixel p spanning [p, p+1). Serving upsamples a CAM on this grid onto the 32x32 image."""
    stride, offset = 1.0, 0.5
    for layer in trained.layers:
        if isinstance(layer, PatchWhitening):  # 'valid' 2x2: cell m spans pixels m, m+1
            offset += 0.5
        elif isinstance(layer, layers.MaxPooling2D):  # cell k: the mean of cells 2k and 2k+1
            offset += stride / 2
            stride *= 2
        elif isinstance(layer, layers.Conv2D) and (layer.padding != "same" or layer.strides != (1, 1)):
            raise ExplainGraphError(f"{layer.name}: only 'same' stride-1 convolutions are traced")
        if layer.name == layer_name:
            return stride, offset
    raise ExplainGraphError(f"no layer {layer_name!r}")


def replace_erfc(onnx_model) -> int:
    """Erfc(x) -> 1 - Erf(x): tf2onnx emits Keras's exact GELU as Erfc, which is no ONNX op
    (onnxruntime: "No Op registered for Erfc"). Returns how many were replaced."""
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    one_name = "explain_graph_one"
    nodes, replaced = [], 0
    for node in graph.node:
        if node.op_type != "Erfc":
            nodes.append(node)
            continue
        erf_out = node.output[0] + "__erf"
        nodes.append(helper.make_node("Erf", [node.input[0]], [erf_out], name=node.name + "__erf"))
        nodes.append(helper.make_node("Sub", [one_name, erf_out], [node.output[0]], name=node.name))
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), one_name))
    return replaced


def rename_outputs(onnx_model, names: list[str]) -> None:
    graph = onnx_model.graph
    if len(graph.output) != len(names):
        raise ExplainGraphError(f"the converted graph has {len(graph.output)} outputs, expected {len(names)}")
    for output, name in zip(graph.output, names):
        old = output.name
        if old == name:
            continue
        for node in graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        output.name = name


def to_explain_onnx(model: keras.Model, opset: int):
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, 32, 32, 3), tf.uint8, name=INPUT_NAME),
            tf.TensorSpec((None,), tf.int32, name=TARGET_NAME))
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    replace_erfc(onnx_model)
    rename_outputs(onnx_model, output_names())
    return onnx_model


def session_of(onnx_model):
    import onnxruntime as ort

    return ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])


def parity_check(keras_model: keras.Model, onnx_model, images: np.ndarray) -> dict:
    """onnxruntime against Keras on every output, for each image's top-1 and another class.

    The gradient is compared at onnxruntime's own activations: where two cells of a channel are
    within rounding of each other, the two runtimes may pick different maxima, and the gradient
    moves from one cell to the other (it is discontinuous there, not wrong)."""
    session = session_of(onnx_model)
    top1 = keras_model.predict([images, np.zeros(len(images), np.int32)], verbose=0)[0].argmax(axis=1)
    worst = 0.0
    for target in (top1, (top1 + 1) % 10):
        target = target.astype(np.int32)
        got = dict(zip(output_names(), session.run(output_names(), {INPUT_NAME: images, TARGET_NAME: target})))
        expected = dict(zip(output_names(), keras_model.predict([images, target], verbose=0)))
        expected[GRADIENT_NAME] = ops.convert_to_numpy(keras_model.get_layer(GRADIENT_NAME)(got[CAM_LAYER], target))
        for name in output_names():
            want, have = expected[name], got[name]
            if want.shape != have.shape:
                raise ExplainGraphError(f"{name}: onnxruntime gives {have.shape}, Keras {want.shape}")
            worst = max(worst, float(np.abs(want - have).max()))
    result = {"images": len(images), "max_abs_diff": worst, "tolerance": PARITY_TOLERANCE}
    if worst >= PARITY_TOLERANCE:
        raise ExplainGraphError(f"{EXPLAIN_FILE}: onnxruntime and Keras disagree: {result}")
    return result


def model_tensors(trained: keras.Model, model_onnx, images: np.ndarray) -> dict[str, tuple[str, str]]:
    """{layer: (the model.onnx tensor with the same values, its layout: NHWC, or NCHW as tf2onnx
    lays convolutions out)}."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model_onnx)
    candidates = [info for info in inferred.graph.value_info
                  if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(info.type.tensor_type.shape.dim) == 4]
    probe = onnx.ModelProto()
    probe.CopyFrom(model_onnx)
    probe.graph.output.extend(candidates)
    values = dict(zip([info.name for info in candidates],
                      session_of(probe).run([info.name for info in candidates], {INPUT_NAME: images})))
    taps = keras.Model(trained.inputs, [trained.get_layer(n).output for n in FEATURE_LAYERS])
    found = {}
    for name, want in zip(FEATURE_LAYERS, taps.predict(images, verbose=0)):
        for tensor, have in values.items():
            for layout, nhwc in (("NHWC", have), ("NCHW", have.transpose(0, 2, 3, 1))):
                if nhwc.shape == want.shape and np.abs(nhwc - want).max() < MATCH_TOLERANCE:
                    found.setdefault(name, (tensor, layout))
    return found


def export_explain_graph(trained: keras.Model, model_onnx, directory: Path, images: np.ndarray,
                         opset: int = 17) -> dict | str:
    """Write directory/explain.onnx (parity-checked) for a whitened net; returns the card's
    `explain` section. Any other network: "none" (serving then offers occlusion only)."""
    if not is_explainable(trained):
        return "none"
    keras_model = explain_model(trained)
    onnx_model = to_explain_onnx(keras_model, opset)
    parity = parity_check(keras_model, onnx_model, images[:32])
    stride, offset = cell_geometry(trained, CAM_LAYER)
    tensors = model_tensors(trained, model_onnx, images[:8])
    description = {
        "methods": list(METHODS),
        "grad_cam_layer": CAM_LAYER,
        "grad_cam_cell": {"stride": stride, "offset": offset},
        "layers": [
            {"name": name, "shape": [int(d) for d in trained.get_layer(name).output.shape[1:]],
             "default": name in DEFAULT_LAYERS}
            for name in FEATURE_LAYERS
        ],
    }
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(description)
    model_bytes = onnx_model.SerializeToString()
    (directory / EXPLAIN_FILE).write_bytes(model_bytes)
    for layer in description["layers"]:
        if layer["name"] in tensors:
            layer["model_tensor"], layer["model_tensor_layout"] = tensors[layer["name"]]
    return {"graph": EXPLAIN_FILE, "sha256": hashlib.sha256(model_bytes).hexdigest(), **description, "parity": parity}
