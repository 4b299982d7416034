"""Export a trained Keras model to ONNX with tf2onnx, parity-check it, write its model card.

    python -m training.export --run-dir runs/fast --name cifar10 --version 1

Publishes models/<name>/<version>/{model.onnx, model_card.json, report.md,
confusion_matrix.png} atomically (written to a temp dir, then renamed into place). Fails,
publishing nothing, when onnxruntime and Keras disagree on any top-1 or by >= 1e-4.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # tf2onnx needs the TF backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from training import data as cifar  # noqa: E402
from training.card import set_metadata  # noqa: E402
from training import trust  # noqa: E402
from training.evaluate import accuracy_report, predict_outputs, top1_accuracy, write_report  # noqa: E402
from training.explain_graph import export_explain_graph  # noqa: E402
from training.models import (  # noqa: E402
    FEATURES_NAME, INPUT_NAME, MAHALANOBIS, NEGATIVE_NORM, OUTPUT_NAME, PREPROCESSING, UNSURE_SCORE_NAME,
    UnsureScore, count_macs, with_exportable_gelu,
)
from training.train import BEST, STATE  # noqa: E402

OPSET = 17
PARITY_IMAGES = 2000
PARITY_TOLERANCE = 1e-4
DATA_PROVENANCE = (
    "CIFAR-10 (Krizhevsky, 2009), python batches from ../shared/data/cifar-10-batches-py: official labels "
    "for all 60,000 images; pixels bit-exact for test rows 0-1016 and 5,397 training rows, the rest decoded "
    "from JPEG copies (quality 75, mean 5.8 grey levels off). Training used data_batch_1..5 minus a seeded "
    "stratified validation split; test_batch was used once, for this report."
)


class ParityError(RuntimeError):
    pass


def to_onnx(model: keras.Model):
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, 32, 32, 3), tf.uint8, name=INPUT_NAME),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    graph = onnx_model.graph
    for output, wanted in zip(graph.output, output_names(model)):  # stable names, in Keras's order
        old = output.name
        if old != wanted:
            for node in graph.node:
                node.output[:] = [wanted if o == old else o for o in node.output]
                node.input[:] = [wanted if i == old else i for i in node.input]
            output.name = wanted
    return onnx_model


def output_names(model: keras.Model) -> list[str]:
    """The graph's output names: OUTPUT_NAME first, then each extra output's Keras layer name."""
    return [OUTPUT_NAME] + [tensor._keras_history.operation.name for tensor in model.outputs[1:]]


def parity_check(model: keras.Model, session, images: np.ndarray) -> dict:
    """onnxruntime against Keras on `images`: the same top-1 everywhere, probabilities within
    PARITY_TOLERANCE, every other output within PARITY_TOLERANCE of its own scale."""
    keras_outputs = model.predict(images, batch_size=500, verbose=0)
    keras_outputs = keras_outputs if isinstance(keras_outputs, list) else [keras_outputs]
    onnx_outputs = predict_outputs(session, images)
    keras_probs, onnx_probs = keras_outputs[0], onnx_outputs[OUTPUT_NAME]
    max_diff = float(np.abs(keras_probs - onnx_probs).max())
    mismatches = int((keras_probs.argmax(1) != onnx_probs.argmax(1)).sum())
    result = {"images": len(images), "top1_mismatches": mismatches, "max_abs_probability_diff": max_diff,
              "tolerance": PARITY_TOLERANCE}
    relative = {name: float(np.abs(k - onnx_outputs[name]).max() / max(float(np.abs(k).max()), 1e-9))
                for name, k in zip(output_names(model)[1:], keras_outputs[1:])}
    if relative:
        result["max_relative_diff_other_outputs"] = relative
    if mismatches or max_diff >= PARITY_TOLERANCE or any(r >= PARITY_TOLERANCE for r in relative.values()):
        raise ParityError(f"onnxruntime and Keras disagree: {result}")
    return result


def source_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training"], capture_output=True, text=True).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {"keras": keras.__version__, "tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def publish(staging: Path, target: Path) -> None:
    """Rename a complete version directory into place: the server never sees half a version."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


# The unsure score's terms (models.UnsureScore): (layer, pooling, kind, per class). The
# penultimate features' norm (how strongly any class detector fires) and the first two blocks'
# channel means as one Gaussian each (how natural the image's textures look to the network).
# Chosen on the validation split against training/ood.py's development families (bench/NOTES.md):
# at 5% of validation flagged it flagged 99.9% of them, and 90% of the held-out families.
SCORE_LAYERS: tuple[tuple[str, str, str, bool], ...] = (
    ("features", "identity", NEGATIVE_NORM, False),
    ("block1", "mean", MAHALANOBIS, False),
    ("block2", "mean", MAHALANOBIS, False),
)
FIT_IMAGES = 20_000  # training images the feature distance is fitted on (un-augmented)


def has_feature_outputs(trained: keras.Model) -> bool:
    return any(layer.name == FEATURES_NAME for layer in trained.layers)


def score_inputs(trained: keras.Model) -> list:
    """The tensors SCORE_LAYERS names, pooled: what FeatureDistance takes."""
    tensors = []
    for name, pooling, _, _ in SCORE_LAYERS:
        output = trained.get_layer(name).output
        tensors.append(output if pooling == "identity" else keras.ops.mean(output, axis=(1, 2)))
    return tensors


def serving_graph(trained: keras.Model, fitted: list[dict] | None = None) -> keras.Model:
    """What goes into model.onnx: the probabilities first, then (for networks with a
    `features` layer) the features, the logits and the unsure score (models.UnsureScore, with
    `fitted` parameters from training.trust)."""
    if not has_feature_outputs(trained):
        return trained
    score = UnsureScore([(kind, 10 if per_class else 1, int(t.shape[-1])) for t, (_, _, kind, per_class)
                         in zip(score_inputs(trained), SCORE_LAYERS)], name=UNSURE_SCORE_NAME)
    outputs = [trained.output, trained.get_layer(FEATURES_NAME).output, trained.get_layer("logits").output,
               score(score_inputs(trained))]
    graph = keras.Model(trained.input, outputs, name=trained.name)
    if fitted is not None:
        graph.get_layer(UNSURE_SCORE_NAME).set_fitted(fitted)
    return graph


def fit_unsure_score(trained: keras.Model, fit: cifar.Split, validation: cifar.Split,
                     fit_images: int = FIT_IMAGES) -> list[dict]:
    """UnsureScore's parameters: Gaussians of `fit_images` training images' pooled activations,
    every term standardised on the validation split."""
    probe = keras.Model(trained.input, score_inputs(trained))
    chosen = np.random.default_rng(0).choice(len(fit), min(fit_images, len(fit)), replace=False)
    train_features = probe.predict(fit.images[chosen], batch_size=500, verbose=0)
    validation_features = probe.predict(validation.images, batch_size=500, verbose=0)
    return trust.fit_unsure_terms([(kind, per_class) for _, _, kind, per_class in SCORE_LAYERS],
                                  train_features, fit.labels[chosen], validation_features)


def export(run_dir: Path, repository: Path, name: str, version: int, data_dir: Path,
           fit_images: int = FIT_IMAGES) -> dict:
    state = json.loads((run_dir / STATE).read_text())
    recipe = state["recipe"]
    trained = with_exportable_gelu(keras.saving.load_model(run_dir / BEST, compile=False))
    fit, validation = cifar.train_validation_split(cifar.load_train(data_dir), recipe["validation_size"], recipe["seed"])
    fitted = fit_unsure_score(trained, fit, validation, fit_images) if has_feature_outputs(trained) else None
    model = serving_graph(trained, fitted)
    test = cifar.load_test(data_dir)
    onnx_model = to_onnx(model)
    repository.mkdir(parents=True, exist_ok=True)
    (repository / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=repository / name))
    try:
        session = ort_session_from_proto(onnx_model)
        parity = parity_check(model, session, test.images[:PARITY_IMAGES])
        test_outputs = predict_outputs(session, test.images)
        report = accuracy_report(test_outputs[OUTPUT_NAME], test.labels)
        validation_outputs = predict_outputs(session, validation.images)
        validation_accuracy = top1_accuracy(validation_outputs[OUTPUT_NAME], validation.labels)
        trust_blocks = trust.trust_card_blocks(lambda images: predict_outputs(session, images),
                                               validation, validation_outputs, test, test_outputs)
        macs = count_macs(trained)
        history = state.get("parent_history", []) + state.get("history", [])
        train_seconds = state["train_seconds"] + state.get("parent_train_seconds", 0.0)
        weight_averaging = state.get("weight_averaging", {})
        card = {
            "name": name, "version": version, "format": "onnx", "opset": OPSET,
            "architecture": model.name, "class_names": list(cifar.CLASS_NAMES),
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [-1, 32, 32, 3], "layout": "NHWC",
                      "range": "0..255 RGB"},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, 10],
                       "meaning": "softmax probabilities, one per class_names entry, before calibration "
                                  "(the server serves them calibrated: see calibration)"},
            "outputs": output_descriptions(model),
            "preprocessing": PREPROCESSING,
            "test_time_augmentation": "none",
            "test_accuracy": report["test_accuracy"],
            "per_class_accuracy": report["per_class_accuracy"],
            "validation_accuracy": round(validation_accuracy, 4),
            **trust_blocks,
            "training": {
                "recipe": recipe, "backend": state["backend"],
                "epochs": state["epochs_done"] + weight_averaging.get("parent_epochs", 0),
                "best_epoch": state.get("best_epoch"),
                "network_validation_accuracy": round(state.get("best_val_accuracy", 0.0), 4),
                "weight_averaging": weight_averaging or "none",
                "train_seconds": round(train_seconds, 1),
                "train_minutes": round(train_seconds / 60, 1),
                "images_per_second": state.get("images_per_second"),
                # Wall time per epoch: an epoch that shared the cores (or was paused) shows up here,
                # and the median says what an undisturbed epoch takes.
                "epoch_seconds": [entry["seconds"] for entry in history],
                "median_epoch_seconds": median_epoch_seconds(history),
                "median_epoch_x_epochs_seconds": round((median_epoch_seconds(history) or 0) * len(history), 1),
                "train_images": state["train_images"], "validation_images": state["validation_images"],
                "machine": state.get("machine", f"{os.cpu_count()} CPU cores"),
            },
            "data_provenance": DATA_PROVENANCE,
            "parameters": int(trained.count_params()),
            "macs_per_image": macs, "flops_per_image": 2 * macs,
            "parity": parity,
            "source_commit": source_commit(),
            "exported_with": versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        # explain.onnx beside model.onnx for a whitened net (docs/explain.md); "none" for others
        card["explain"] = export_explain_graph(trained, onnx_model, staging, test.images[:64], OPSET)
        set_metadata(onnx_model, card)
        model_bytes = onnx_model.SerializeToString()
        (staging / "model.onnx").write_bytes(model_bytes)
        card["sha256"] = hashlib.sha256(model_bytes).hexdigest()  # beside the file, never inside it
        (staging / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        write_report(report, staging, f"{name} v{version}")
        staging.chmod(0o755)
        publish(staging, repository / name / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


OUTPUT_MEANINGS = {
    OUTPUT_NAME: "softmax probabilities [N, 10], before calibration",
    FEATURES_NAME: "the penultimate activations [N, 256] (global max pooling of the last block)",
    "logits": "the scaled logits [N, 10] the probabilities are the softmax of",
    UNSURE_SCORE_NAME: "[N] how unlike the training images (models.UnsureScore: the features' norm and "
                       "the first blocks' Mahalanobis distances, standardised and summed): higher is less like them",
}


def output_descriptions(model: keras.Model) -> list[dict]:
    return [{"name": name, "meaning": OUTPUT_MEANINGS[name]} for name in output_names(model)]


def median_epoch_seconds(history: list[dict]) -> float | None:
    seconds = sorted(entry["seconds"] for entry in history)
    return seconds[len(seconds) // 2] if seconds else None


def ort_session_from_proto(onnx_model):
    import onnxruntime as ort

    return ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--name", default="cifar10")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--fit-images", type=int, default=FIT_IMAGES,
                        help="training images the unsure score's feature Gaussians are fitted on")
    args = parser.parse_args(argv)
    data_dir = cifar.data_dir_or_exit(args.data_dir, allow_download=True)
    try:
        card = export(args.run_dir, args.repository, args.name, args.version, data_dir, args.fit_images)
    except (cifar.DatasetError, ParityError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: card[k] for k in ("name", "version", "test_accuracy", "parity", "sha256")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
