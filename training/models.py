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


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates per image of the conv and dense layers (what dominates)."""
    macs = 0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, PatchWhitening)):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel.shape[:2]
            c_in = layer.input.shape[-1]
            macs += h * w * kh * kw * c_in * c_out
        elif isinstance(layer, layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return int(macs)


# ---- the patch-whitened net (airbench94's shape, Jordan 2024, re-derived in Keras) ----------------

WHITENING_PATCH = 2  # 2x2 patches of 3 channels: a 12-dimensional patch space
WHITENING_EPSILON = 5e-4  # added to each eigenvalue: the near-empty directions are not blown up


def whitening_kernel(normalised_images, epsilon: float = WHITENING_EPSILON):
    """Conv kernel (2, 2, 3, 24) that whitens 2x2 patches: one filter per eigenvector of the
    patch covariance, scaled by 1/sqrt(eigenvalue), and its negative (so a following GELU keeps
    both signs). `normalised_images`: float NHWC, already minus the mean and over the std."""
    import numpy as np

    x = np.asarray(normalised_images, dtype=np.float64)
    n, h, w, c = x.shape
    p = WHITENING_PATCH
    patches = np.stack([x[:, i:h - p + 1 + i, j:w - p + 1 + j, :] for i in range(p) for j in range(p)], axis=3)
    patches = patches.reshape(-1, p * p * c)  # (row, column, channel) order, as a Keras kernel is laid out
    covariance = np.cov(patches, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = eigenvectors / np.sqrt(eigenvalues + epsilon)  # one column per direction
    filters = np.concatenate([filters, -filters], axis=1)
    return filters.reshape(p, p, c, 2 * p * p * c).astype("float32")


@keras.saving.register_keras_serializable(package="cifar10")
class PatchWhitening(layers.Layer):
    """A 2x2 'valid' convolution whose kernel is fixed (set from training statistics with
    `set_kernel`, never trained) and whose bias is trainable (the optimizer may freeze it)."""

    def __init__(self, filters: int = 24, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(shape=(WHITENING_PATCH, WHITENING_PATCH, channels, self.filters),
                                      initializer="zeros", trainable=False, name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", trainable=True, name="bias")

    def set_kernel(self, kernel) -> None:
        self.kernel.assign(kernel)

    def call(self, x):
        return ops.conv(x, self.kernel, strides=1, padding="valid") + self.bias

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        shrink = WHITENING_PATCH - 1
        return (n, None if h is None else h - shrink, None if w is None else w - shrink, self.filters)

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="cifar10")
class PartialIdentity(keras.initializers.Initializer):
    """A 3x3 conv kernel whose first min(in, out) filters pass their input channel through
    unchanged (a Dirac delta), the rest drawn fan-in uniform in +-1/sqrt(fan_in). A deep stack
    of such convolutions starts close to the identity, so early gradients reach every layer."""

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        import numpy as np

        height, width, channels_in, channels_out = shape
        random = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform", seed=self.seed)(shape, dtype)
        identity = np.zeros(shape, dtype="float32")
        passed = min(channels_in, channels_out)
        identity[height // 2, width // 2, np.arange(passed), np.arange(passed)] = 1.0
        is_identity = np.zeros(shape, dtype=bool)
        is_identity[..., :passed] = True
        return ops.where(is_identity, ops.convert_to_tensor(identity, dtype=dtype), random)

    def get_config(self) -> dict:
        return {"seed": self.seed}


FEATURES_NAME = "features"  # the pooled penultimate activations: what trust scores are computed on


@keras.saving.register_keras_serializable(package="cifar10")
def gelu(x):
    """The exact GELU, x * Phi(x), written with erf: TensorFlow's own builds it from erfc, which
    ONNX has no operator for, so tf2onnx could not export it."""
    return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


def with_exportable_gelu(model: keras.Model) -> keras.Model:
    """Point every Activation("gelu") layer at `gelu` (the same function, exportable): for
    checkpoints saved before the network used it."""
    for layer in model.layers:
        if isinstance(layer, layers.Activation) and getattr(layer.activation, "__name__", "") == "gelu":
            layer.activation = gelu
    return model


def _whitened_block(x, filters: int, index: int, norm_momentum: float):
    """conv - pool - BN - GELU - conv - BN - GELU; BN without a learned scale (GELU after it
    makes a scale redundant with the next conv). `norm_momentum`: Keras's, i.e. the share of the
    running statistics kept at each step (airbench94's short runs use 0.6, fast-moving)."""
    def norm(name: str):
        return layers.BatchNormalization(momentum=norm_momentum, epsilon=1e-12, scale=False, name=name)

    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity(),
                      name=f"block{index}_conv1")(x)
    x = layers.MaxPooling2D(name=f"block{index}_pool")(x)
    x = norm(f"block{index}_norm1")(x)
    x = layers.Activation(gelu, name=f"block{index}_act1")(x)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity(),
                      name=f"block{index}_conv2")(x)
    x = norm(f"block{index}_norm2")(x)
    return layers.Activation(gelu, name=f"block{index}")(x)


def whitened_net(widths: tuple[int, int, int] = (64, 256, 256), logit_scale: float = 1 / 9,
                 norm_momentum: float = 0.6) -> keras.Model:
    """airbench94's network shape: frozen 2x2 patch whitening, three conv blocks, global max
    pooling, one dense layer without bias, logits scaled down. Call `PatchWhitening.set_kernel`
    (training.train does) before training: the kernel starts at zero."""
    inputs, x = _normalised_input()
    x = PatchWhitening(2 * WHITENING_PATCH * WHITENING_PATCH * 3, name="whiten")(x)
    x = layers.Activation(gelu, name="whiten_act")(x)
    for index, filters in enumerate(widths, start=1):
        x = _whitened_block(x, filters, index, norm_momentum)
    x = layers.GlobalMaxPooling2D(name=FEATURES_NAME)(x)
    x = layers.Dense(10, use_bias=False, kernel_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"),
                     name="head")(x)
    x = layers.Rescaling(logit_scale, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="whitened_net_" + "_".join(map(str, widths)))


# ---- the unsure score in the graph (training/trust.py fits it; serving reads it as an output) ----

UNSURE_SCORE_NAME = "unsure_score"


MAHALANOBIS, NEGATIVE_NORM = "mahalanobis", "negative_norm"


@keras.saving.register_keras_serializable(package="cifar10")
class UnsureScore(layers.Layer):
    """How unlike the training images an image is, as one number (higher: less like them).

    Each input is a pooled activation vector f with a kind:
    - "mahalanobis": log min over the fitted centres c of ||(f - c) W||^2, with W W^T the
      inverse of the training images' covariance (a Mahalanobis distance: the early blocks'
      channel means, i.e. how natural the image's textures and colours look to the network);
    - "negative_norm": -||f|| (the penultimate features: images of no class the network knows
      light up few of its detectors).
    Each term is standardised with its mean and standard deviation on the validation images, and
    the score is their sum. training/trust.py fits the parameters (`set_fitted`).
    """

    def __init__(self, terms: list[tuple[str, int, int]], **kwargs):
        super().__init__(**kwargs)
        self.terms = [tuple(t) for t in terms]  # (kind, centres, dimensions) per input

    def build(self, input_shape):
        self.centres, self.whitening, self.standardise = [], [], []
        for index, (kind, count, dims) in enumerate(self.terms):
            if kind == MAHALANOBIS:
                self.centres.append(self.add_weight(shape=(count, dims), initializer="zeros", trainable=False,
                                                    name=f"centres_{index}"))
                self.whitening.append(self.add_weight(shape=(dims, dims), initializer="zeros", trainable=False,
                                                      name=f"whitening_{index}"))
            elif kind != NEGATIVE_NORM:
                raise ValueError(f"unknown unsure-score term {kind!r}")
            self.standardise.append(self.add_weight(shape=(2,), initializer="zeros", trainable=False,
                                                    name=f"standardise_{index}"))

    def set_fitted(self, fitted: list[dict]) -> None:
        """Per input: {"standardise": (mean, std)} and, for mahalanobis, "centres" and "whitening"."""
        mahalanobis = iter(zip(self.centres, self.whitening))
        for (kind, _, _), term, standardise in zip(self.terms, fitted, self.standardise):
            standardise.assign(term["standardise"])
            if kind == MAHALANOBIS:
                centres, whitening = next(mahalanobis)
                centres.assign(term["centres"])
                whitening.assign(term["whitening"])

    def call(self, features):
        mahalanobis = iter(zip(self.centres, self.whitening))
        total = 0.0
        for (kind, _, _), f, standardise in zip(self.terms, features, self.standardise):
            if kind == MAHALANOBIS:
                centres, whitening = next(mahalanobis)
                # ||(f - c) W||^2 = ||f W||^2 - 2 (f W).(c W) + ||c W||^2, for every centre at once.
                fw, cw = ops.matmul(f, whitening), ops.matmul(centres, whitening)
                squared = (ops.sum(fw * fw, axis=1, keepdims=True) - 2.0 * ops.matmul(fw, ops.transpose(cw))
                           + ops.sum(cw * cw, axis=1)[None, :])
                value = ops.log(ops.maximum(ops.min(squared, axis=1), 1e-12))
            else:
                value = -ops.sqrt(ops.sum(f * f, axis=1))
            total = total + (value - standardise[0]) / standardise[1]
        return total

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0],)

    def get_config(self) -> dict:
        return {**super().get_config(), "terms": [list(t) for t in self.terms]}
