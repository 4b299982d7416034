"""Evaluate any ONNX classifier on the CIFAR-10 test set through onnxruntime (no TensorFlow).

    python -m training.evaluate models/cifar10/1/model.onnx [--report-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from training import data as cifar


def ort_session(model_path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def predict(session, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: images[i:i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    )


def predict_outputs(session, images: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Every output of the graph, by name, for `images` (run in batches)."""
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {name: images[i:i + batch_size]}) for i in range(0, len(images), batch_size)]
    return {output: np.concatenate([part[k] for part in parts]) for k, output in enumerate(names)}


def images_per_second(session, batch: np.ndarray, seconds: float = 3.0) -> float:
    """Throughput of `session` on `batch` (output 0 only), after one untimed run."""
    name, first_output = session.get_inputs()[0].name, [session.get_outputs()[0].name]
    session.run(first_output, {name: batch})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(first_output, {name: batch})
        runs += 1
    return runs * len(batch) / (time.perf_counter() - started)


def top1_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def accuracy_report(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Both test accuracies (all rows, bit-exact rows), per-class accuracy, confusion matrix."""
    predicted = probabilities.argmax(axis=1)
    correct = predicted == labels
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    exact = slice(0, cifar.BIT_EXACT_TEST_ROWS)
    return {
        "test_accuracy": {
            "all_10000": round(float(correct.mean()), 4),
            "bit_exact_0_1016": round(float(correct[exact].mean()), 4),
        },
        "per_class_accuracy": {
            name: round(float(correct[labels == c].mean()), 4) for c, name in enumerate(cifar.CLASS_NAMES)
        },
        "confusion_matrix": confusion.tolist(),
    }


def write_report(report: dict, out_dir: Path, title: str) -> None:
    """confusion_matrix.png and report.md (per-class table) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.array(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(10), cifar.CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(10), cifar.CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(10):
        for j in range(10):
            ax.text(j, i, confusion[i, j], ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    acc = report["test_accuracy"]
    ax.set_title(f"{title}: {acc['all_10000']:.2%} (all), {acc['bit_exact_0_1016']:.2%} (rows 0-1016)")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    lines = [
        f"# {title}", "",
        f"Test accuracy: **{acc['all_10000']:.2%}** on all 10,000 test images; "
        f"**{acc['bit_exact_0_1016']:.2%}** on the bit-exact rows 0-1016.", "",
        "| class | accuracy |", "|---|---|",
        *[f"| {name} | {value:.2%} |" for name, value in report["per_class_accuracy"].items()],
        "", "![confusion matrix](confusion_matrix.png)", "",
    ]
    (out_dir / "report.md").write_text("\n".join(lines))


def evaluate(model_path: Path, data_dir: Path) -> dict:
    test = cifar.load_test(data_dir)
    session = ort_session(model_path)
    started = time.perf_counter()
    probabilities = predict(session, test.images)
    report = accuracy_report(probabilities, test.labels)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--report-dir", type=Path, default=None, help="write confusion_matrix.png + report.md here")
    args = parser.parse_args(argv)
    data_dir = cifar.data_dir_or_exit(args.data_dir)
    report = evaluate(args.model, data_dir)
    if args.report_dir:
        write_report(report, args.report_dir, args.model.name)
    print(json.dumps({k: v for k, v in report.items() if k != "confusion_matrix"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
