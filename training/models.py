"""Keras 3 model presets. Backend-neutral: TensorFlow here, JAX on a GPU machine.

Every model takes uint8 NHWC pixels and normalises itself, and ends in a softmax, so the
exported ONNX graph needs nothing model-specific on the serving side.
"""

from __future__ import annotations

import keras
from keras import layers, ops

# Per-channel CIFAR-10 training-set statistics, in 0..255 units.
CIFAR10_MEAN = (125.31, 122.95, 113.87)
CIFAR10_STD = (62.99, 62.09, 66.70)
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
PREPROCESSING = (
    "inside the graph: uint8 NHWC RGB 0..255 -> float32, minus per-channel mean "
    f"{list(CIFAR10_MEAN)}, divided by per-channel std {list(CIFAR10_STD)}"
)


def _normalised_input() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name=INPUT_NAME)
    x = layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)  # a cast that exports cleanly
    x = layers.Normalization(
        mean=list(CIFAR10_MEAN), variance=[s * s for s in CIFAR10_STD], name="normalise"
    )(x)
    return inputs, x


def simple_cnn() -> keras.Model:
    """The classic tutorial CNN: conv-ReLU-pool stacks and dense layers."""
    inputs, x = _normalised_input()
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(10, activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="simple_cnn")


def _conv_bn(x, filters: int, pool: bool = False):
    x = layers.Conv2D(
        filters, 3, padding="same", use_bias=False,
        kernel_initializer="he_normal",
    )(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
    x = layers.ReLU()(x)
    if pool:
        x = layers.MaxPooling2D()(x)
    return x


def resnet9(width: int = 32) -> keras.Model:
    """The DAWNBench ResNet-9 (prep, 3 stages, 2 residual blocks); width=64 is full width."""
    inputs, x = _normalised_input()
    x = _conv_bn(x, width)
    x = _conv_bn(x, width * 2, pool=True)
    r = _conv_bn(x, width * 2)
    r = _conv_bn(r, width * 2)
    x = layers.Add()([x, r])
    x = _conv_bn(x, width * 4, pool=True)
    x = _conv_bn(x, width * 8, pool=True)
    r = _conv_bn(x, width * 8)
    r = _conv_bn(r, width * 8)
    x = layers.Add()([x, r])
    x = layers.GlobalMaxPooling2D()(x)
    # Page's ResNet-9 scales logits by 1/8: it keeps the softmax from saturating early.
    x = layers.Dense(10, use_bias=False)(x)
    x = layers.Rescaling(0.125)(x)
    outputs = layers.Activation("softmax", dtype="float32", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=f"resnet9_w{width}")


class MirrorAverage(layers.Layer):
    """Test-time augmentation: the wrapped model's probabilities averaged over each image and
    its left-right mirror image (the flip the model was trained with).

    Both halves go through the model as one batch of 2N, so onnxruntime runs one larger batch
    instead of two calls; the cost is twice the compute per image.
    """

    def __init__(self, model: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, images):
        both = ops.concatenate([images, ops.flip(images, axis=2)], axis=0)
        plain, mirrored = ops.split(self.model(both), 2, axis=0)
        return (plain + mirrored) * 0.5


def with_mirror_averaging(model: keras.Model) -> keras.Model:
    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name=INPUT_NAME)
    outputs = MirrorAverage(model, dtype="float32", name=OUTPUT_NAME)(inputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_mirror_averaged")


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates per image of the conv and dense layers (what dominates)."""
    macs = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            macs += h * w * kh * kw * c_in * c_out
        elif isinstance(layer, layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return int(macs)
