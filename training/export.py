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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # tf2onnx needs the TF backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from training import data as cifar  # noqa: E402
from training.card import set_metadata  # noqa: E402
from training.evaluate import accuracy_report, predict, top1_accuracy, write_report  # noqa: E402
from training.explain_graph import export_explain_graph, replace_erfc  # noqa: E402
from training.models import INPUT_NAME, OUTPUT_NAME, PREPROCESSING, count_macs, with_test_time_averaging  # noqa: E402
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
    replace_erfc(onnx_model)  # Keras's exact GELU comes out as Erfc, which onnxruntime lacks
    graph = onnx_model.graph
    old_output = graph.output[0].name
    if old_output != OUTPUT_NAME:  # give the output a stable name
        for node in graph.node:
            node.output[:] = [OUTPUT_NAME if o == old_output else o for o in node.output]
        graph.output[0].name = OUTPUT_NAME
    return onnx_model


def parity_check(model: keras.Model, session, images: np.ndarray) -> dict:
    keras_probs = model.predict(images, batch_size=500, verbose=0)
    onnx_probs = predict(session, images)
    max_diff = float(np.abs(keras_probs - onnx_probs).max())
    mismatches = int((keras_probs.argmax(1) != onnx_probs.argmax(1)).sum())
    result = {"images": len(images), "top1_mismatches": mismatches, "max_abs_probability_diff": max_diff,
              "tolerance": PARITY_TOLERANCE}
    if mismatches or max_diff >= PARITY_TOLERANCE:
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


@dataclass(frozen=True)
class TestTimeAveraging:
    """What goes into the graph besides the trained network (models.TestTimeAverage)."""

    mirror: bool = False  # also the mirror image of each image
    partners: tuple[Path, ...] = ()  # run directories of more networks (an ensemble)
    below: float | None = None  # only for images on which the trained network's top probability is below

    def __post_init__(self):
        if self.below is not None and not (self.mirror or self.partners):
            raise ValueError("--average-below needs --mirror-average or --ensemble-with: there is nothing to average")

    @property
    def active(self) -> bool:
        return self.mirror or bool(self.partners)

    def describe(self) -> str:
        if not self.active:
            return "none"
        views = ["the image"] + (["its left-right mirror image"] if self.mirror else [])
        text = f"probabilities averaged over {' and '.join(views)}"
        if self.partners:
            text += f", by this network and {len(self.partners)} more (an ensemble: {', '.join(p.name for p in self.partners)})"
        if self.below is not None:
            text += f"; only for the images on which this network alone has a top probability below {self.below}"
        return text


def export(run_dir: Path, repository: Path, name: str, version: int, data_dir: Path,
           averaging: TestTimeAveraging = TestTimeAveraging()) -> dict:
    state = json.loads((run_dir / STATE).read_text())
    trained = keras.saving.load_model(run_dir / BEST, compile=False)
    partners = tuple(keras.saving.load_model(partner / BEST, compile=False) for partner in averaging.partners)
    model = with_test_time_averaging(trained, partners, averaging.mirror, averaging.below) \
        if averaging.active else trained
    test = cifar.load_test(data_dir)
    onnx_model = to_onnx(model)
    repository.mkdir(parents=True, exist_ok=True)
    (repository / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=repository / name))
    try:
        session = ort_session_from_proto(onnx_model)
        parity = parity_check(model, session, test.images[:PARITY_IMAGES])
        report = accuracy_report(predict(session, test.images), test.labels)
        validation = validation_split(data_dir, state["recipe"])
        validation_accuracy = top1_accuracy(predict(session, validation.images), validation.labels)
        # The share of images that get the extra views: all, none, or (gated) those the trained
        # network alone is unsure of, counted on the test set; MACs follow.
        extra_fraction = float(averaging.active) if averaging.below is None else float(
            (predict(ort_session_from_proto(to_onnx(trained)), test.images).max(axis=1) < averaging.below).mean())
        views = 2 if averaging.mirror else 1
        trained_macs = count_macs(trained)
        extra_macs = trained_macs * (views - 1) + sum(count_macs(p) * views for p in partners)
        macs = round(trained_macs + extra_fraction * extra_macs)
        recipe = state["recipe"]
        # A weight-averaging run (training/average.py) continues a parent run: count both.
        weight_averaging = state.get("weight_averaging", {})
        history = state.get("parent_history", []) + state.get("history", [])
        train_seconds = state["train_seconds"] + state.get("parent_train_seconds", 0.0)
        card = {
            "name": name, "version": version, "format": "onnx", "opset": OPSET,
            "architecture": model.name, "class_names": list(cifar.CLASS_NAMES),
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [-1, 32, 32, 3], "layout": "NHWC",
                      "range": "0..255 RGB"},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, 10],
                       "meaning": "softmax probabilities, one per class_names entry"},
            "preprocessing": PREPROCESSING,
            "test_time_augmentation": averaging.describe(),
            "averaged_fraction": round(extra_fraction, 4),
            "ensemble": [partner_summary(path) for path in averaging.partners],
            "test_accuracy": report["test_accuracy"],
            "per_class_accuracy": report["per_class_accuracy"],
            # The exported graph (test-time averaging included) on the run's validation split.
            "validation_accuracy": round(validation_accuracy, 4),
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
                "train_images": state["train_images"], "validation_images": state["validation_images"],
                "machine": state.get("machine", f"{os.cpu_count()} CPU cores"),
            },
            "data_provenance": DATA_PROVENANCE,
            "parameters": int(trained.count_params()) + sum(int(p.count_params()) for p in partners),
            "macs_per_image": macs, "flops_per_image": 2 * macs,  # averaged over the test set when gated
            "parity": parity,
            "source_commit": source_commit(),
            "exported_with": versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        # explain.onnx beside model.onnx for a whitened net served as trained (docs/explain.md)
        card["explain"] = "none" if averaging.active else export_explain_graph(trained, onnx_model, staging, test.images[:64], OPSET)
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


def validation_split(data_dir: Path, recipe: dict) -> cifar.Split:
    _, validation = cifar.train_validation_split(cifar.load_train(data_dir), recipe["validation_size"], recipe["seed"])
    return validation


def partner_summary(run_dir: Path) -> dict:
    state = json.loads((run_dir / STATE).read_text())
    return {"run": run_dir.name, "recipe": state["recipe"]["name"],
            "validation_accuracy": round(state.get("best_val_accuracy", 0.0), 4),
            "train_seconds": round(state["train_seconds"] + state.get("parent_train_seconds", 0.0), 1)}


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
    parser.add_argument("--mirror-average", action="store_true",
                        help="put test-time augmentation in the graph: average the probabilities of each "
                             "image and its mirror image (twice the compute per image)")
    parser.add_argument("--ensemble-with", type=Path, action="append", default=[], metavar="RUN_DIR",
                        help="average in the probabilities of another run's network (repeatable)")
    parser.add_argument("--average-below", type=float, default=None, metavar="P",
                        help="the mirror / ensemble views only for the images on which the network alone has "
                             "a top probability below P (choose P on the validation split)")
    args = parser.parse_args(argv)
    data_dir = cifar.data_dir_or_exit(args.data_dir, allow_download=True)
    try:
        averaging = TestTimeAveraging(args.mirror_average, tuple(args.ensemble_with), args.average_below)
        card = export(args.run_dir, args.repository, args.name, args.version, data_dir, averaging)
    except (cifar.DatasetError, ParityError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: card[k] for k in ("name", "version", "test_accuracy", "parity", "sha256")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
