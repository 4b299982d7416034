"""int8 variant of an exported model: onnxruntime static quantization (QDQ), calibrated on
training images, published under its own model name with its own card.

    python -m training.quantize --source models/cifar10/1 --name cifar10-int8 --version 1

U8S8 (uint8 activations, int8 per-channel weights) with reduce_range: on CPUs without VNNI
(this machine) S8S8 QDQ runs slower than fp32, U8S8 with 7-bit weights runs faster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from training import data as cifar
from training import trust
from training.card import quantized_explain_section, set_metadata
from training.evaluate import accuracy_report, images_per_second, ort_session, predict_outputs, top1_accuracy, write_report
from training.models import OUTPUT_NAME, UNSURE_SCORE_NAME

CALIBRATION_IMAGES = 1024
CALIBRATION_SEED = 7


class TrainingImages(CalibrationDataReader):
    """Seeded random training images (never test images), fed in batches of 64."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 64):
        self.batches = iter([{input_name: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def quantize(source: Path, repository: Path, name: str, version: int, data_dir: Path, threads: int = 2) -> dict:
    fp32_card = json.loads((source / "model_card.json").read_text())
    train = cifar.load_train(data_dir)
    rng = np.random.default_rng(CALIBRATION_SEED)
    calibration = train.images[rng.choice(len(train), CALIBRATION_IMAGES, replace=False)]
    test = cifar.load_test(data_dir)
    (repository / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=repository / name))
    try:
        prepared = staging / "prepared.onnx"
        quant_pre_process(str(source / "model.onnx"), str(prepared), skip_symbolic_shape=True)
        input_name = ort_session(prepared).get_inputs()[0].name
        # The unsure score's distance arithmetic stays in float: int8 would blur the distances
        # that decide the flag, and it is a sliver of the compute.
        kept_in_float = [node.name for node in onnx.load(prepared).graph.node if UNSURE_SCORE_NAME in node.name]
        quantize_static(
            str(prepared), str(staging / "model.onnx"), TrainingImages(input_name, calibration),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=True, reduce_range=True, nodes_to_exclude=kept_in_float,
        )
        prepared.unlink()
        quantized = staging / "model.onnx"
        session = ort_session(quantized)
        test_outputs = predict_outputs(session, test.images)
        report = accuracy_report(test_outputs[OUTPUT_NAME], test.labels)
        recipe = fp32_card["training"]["recipe"]
        _, validation = cifar.train_validation_split(train, recipe["validation_size"], recipe["seed"])
        validation_outputs = predict_outputs(session, validation.images)
        validation_accuracy = top1_accuracy(validation_outputs[OUTPUT_NAME], validation.labels)
        # Calibration, threshold and drift reference refitted on this file's own outputs.
        trust_blocks = trust.trust_card_blocks(lambda images: predict_outputs(session, images),
                                               validation, validation_outputs, test, test_outputs)
        batch = test.images[:64]
        fp32_speed = images_per_second(ort_session(source / "model.onnx", threads), batch)
        int8_speed = images_per_second(ort_session(quantized, threads), batch)
        card = {
            # The fp32 graph's parity, file hash and cost do not describe this file; its trust blocks are refitted below.
            **{k: v for k, v in fp32_card.items() if k not in ("parity", "sha256", "cost", "added_after_export")},
            "name": name, "version": version,
            "explain": quantized_explain_section(fp32_card.get("explain")),
            "test_accuracy": report["test_accuracy"],
            "validation_accuracy": round(validation_accuracy, 4),
            "per_class_accuracy": report["per_class_accuracy"],
            **trust_blocks,
            "quantization": {
                "method": "onnxruntime quantize_static, QDQ, U8S8 (uint8 activations, int8 per-channel weights), reduce_range",
                "calibration": f"{CALIBRATION_IMAGES} random training images (seed {CALIBRATION_SEED}), MinMax",
                "source_model": f"{fp32_card['name']} v{fp32_card['version']}",
                "source_sha256": fp32_card.get("sha256"),
                "fp32_test_accuracy": fp32_card["test_accuracy"],
                "accuracy_drop_points": round(100 * (fp32_card["test_accuracy"]["all_10000"] - report["test_accuracy"]["all_10000"]), 2),
                "cpu_speedup_batch64": round(int8_speed / fp32_speed, 3),
                "images_per_second_batch64": {"fp32": round(fp32_speed, 1), "int8": round(int8_speed, 1),
                                              "intra_op_threads": threads},
            },
        }
        onnx_model = onnx.load(quantized)
        set_metadata(onnx_model, card)  # the int8 accuracies and method, not the fp32 card's
        model_bytes = onnx_model.SerializeToString()
        quantized.write_bytes(model_bytes)
        card["sha256"] = hashlib.sha256(model_bytes).hexdigest()
        (staging / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        write_report(report, staging, f"{name} v{version}")
        staging.chmod(0o755)
        target = repository / name / str(version)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("models/cifar10/1"))
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--name", default="cifar10-int8")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for the speed comparison")
    args = parser.parse_args(argv)
    data_dir = cifar.data_dir_or_exit(args.data_dir)
    card = quantize(args.source, args.repository, args.name, args.version, data_dir, args.threads)
    print(json.dumps({"test_accuracy": card["test_accuracy"], "quantization": card["quantization"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
