"""Inference cost per image as a ratio to a reference ResNet-20, timed in the same run.

    python -m training.cost models/cifar10/2 [models/cifar10/1 ...] [--write]

The reference is He et al.'s CIFAR ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels,
1x1 projections where the shape changes), untrained: its cost does not depend on its weights.
Each model and the reference run in onnxruntime at batch 64 with 2 intra-op threads, timed
alternately over several rounds so a drifting machine affects both alike; the ratio is
reference images/s over model images/s (2.0: the model costs twice the reference per image).
Absolute images/s depend on the machine; the ratio travels. With --write, the `cost` block goes
into each version's model_card.json (model.onnx is untouched).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from training import data as cifar
from training.card import update_card
from training.evaluate import images_per_second, ort_session

BATCH, THREADS, ROUNDS, SECONDS_PER_TIMING = 64, 2, 5, 3.0
REFERENCE = "ResNet-20 (He et al. 2016: 16/32/64 channels, 3 basic blocks a stage, 1x1 projections), ONNX, untrained"


def reference_onnx(path: Path) -> Path:
    """Build and export the reference once (Keras + tf2onnx, in this process)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from keras import layers

    from training.export import to_onnx
    from training.models import _normalised_input

    def conv_bn(x, filters: int, stride: int = 1, relu: bool = True):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x) if relu else x

    inputs, x = _normalised_input()
    x = conv_bn(x, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage and not block else 1
            shortcut = x if stride == 1 and x.shape[-1] == filters else layers.BatchNormalization()(
                layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x))
            y = conv_bn(conv_bn(x, filters, stride), filters, relu=False)
            x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Activation("softmax", name="probabilities")(layers.Dense(10)(x))
    model = keras.Model(inputs, outputs, name="resnet20_reference")
    path.write_bytes(to_onnx(model).SerializeToString())
    return path


def measure(model_paths: list[Path], reference: Path, batch: np.ndarray, rounds: int = ROUNDS,
            seconds: float = SECONDS_PER_TIMING) -> dict[Path, dict]:
    """Per model: the median over rounds of (reference images/s) / (model images/s), each
    round timing the reference right before or after the model (alternating)."""
    sessions = {path: ort_session(path, THREADS) for path in [reference, *model_paths]}
    results = {}
    for path in model_paths:
        ratios, model_speeds, reference_speeds = [], [], []
        for round_index in range(rounds):
            order = (reference, path) if round_index % 2 == 0 else (path, reference)
            speeds = {p: images_per_second(sessions[p], batch, seconds) for p in order}
            model_speeds.append(speeds[path])
            reference_speeds.append(speeds[reference])
            ratios.append(speeds[reference] / speeds[path])
        results[path] = {
            "ratio_to_reference": round(statistics.median(ratios), 3),
            "ratios_per_round": [round(r, 3) for r in ratios],
            "images_per_second": round(statistics.median(model_speeds), 1),
            "reference_images_per_second": round(statistics.median(reference_speeds), 1),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dirs", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--write", action="store_true", help="write the cost block into each model_card.json")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    images = cifar.read_batch(cifar.data_dir_or_exit(args.data_dir) / cifar.TEST_FILE).images[:BATCH]
    with tempfile.TemporaryDirectory() as tmp:
        reference = reference_onnx(Path(tmp) / "resnet20.onnx")
        results = measure([d / "model.onnx" for d in args.version_dirs], reference, images, args.rounds)
    for version_dir in args.version_dirs:
        block = {
            **results[version_dir / "model.onnx"], "reference": REFERENCE,
            "method": f"onnxruntime CPU, batch {BATCH}, {THREADS} intra-op threads, {args.rounds} alternating rounds "
                      f"of {SECONDS_PER_TIMING:.0f} s each, median; ratio = reference images/s / model images/s",
            "machine": f"{os.cpu_count()} CPU cores",
            "measured": datetime.date.today().isoformat(),
        }
        print(version_dir, json.dumps(block))
        if args.write:
            update_card(version_dir, {"cost": block})
    return 0


if __name__ == "__main__":
    sys.exit(main())
