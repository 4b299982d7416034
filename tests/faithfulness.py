"""The deletion test of an explanation method, through a running server (docs/explain.md).

For each image: Explain it (the target is the top-1 class), cover the 20% most salient pixels
of its heatmap with the image's mean colour, and classify it again: how far did the target's
probability fall? The same for two controls: the 20% most salient pixels of *another* image's
heatmap (a mismatched explanation with the same spatial statistics), and a scattered random
20% of the pixels. tests/test_explain.py asserts on it; for other models and methods:

    python -m tests.faithfulness --target localhost:50051 [--model cifar10] [--method grad_cam]
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
import numpy as np

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc
from training import data as cifar

DELETED_FRACTION = 0.20
SEED = 24
CLASSIFY_CHUNK = 128


def raw(pixels: np.ndarray) -> pb.Image:
    return pb.Image(raw=pb.RawPixels(data=pixels.tobytes(), height=32, width=32, channels=3))


def most_salient(heatmap: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the `count` highest values; ties (zeros, mostly) broken at random, not by position."""
    return np.lexsort((rng.random(heatmap.size), -heatmap))[:count]


def deleted(pixels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The image with these pixels (row-major indices) set to its mean colour."""
    fill = np.rint(pixels.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    flat = pixels.reshape(-1, 3).copy()
    flat[indices] = fill
    return flat.reshape(pixels.shape)


def probabilities(stub, images: list[np.ndarray], model: str) -> np.ndarray:
    rows = []
    for start in range(0, len(images), CLASSIFY_CHUNK):
        reply = stub.ClassifyBatch(pb.ClassifyBatchRequest(
            images=[raw(p) for p in images[start:start + CLASSIFY_CHUNK]], model_name=model, top_k=10), timeout=60)
        for result in reply.results:
            row = np.zeros(10)
            for prediction in result.predictions:
                row[prediction.class_index] = prediction.probability
            rows.append(row)
    return np.array(rows)


def deletion_test(stub, images: np.ndarray, method: int = pb.EXPLAIN_METHOD_UNSPECIFIED, model: str = "") -> dict:
    """Mean drop of the target's probability: the method, the mismatched control, the random control."""
    rng = np.random.default_rng(SEED)
    count = round(DELETED_FRACTION * 32 * 32)
    heatmaps, targets = [], []
    for pixels in images:
        reply = stub.Explain(pb.ExplainRequest(image=raw(pixels), model_name=model, method=method,
                                               omit_feature_maps=True, omit_images=True), timeout=60)
        heatmaps.append(np.array(reply.heatmap, dtype=np.float32))
        targets.append(reply.target_class)
    n = len(images)
    variants = {
        "original": [p for p in images],
        "method": [deleted(p, most_salient(heatmaps[i], count, rng)) for i, p in enumerate(images)],
        # Another image's heatmap: i + 1 wraps around, so every image gets one that is not its own.
        "mismatched": [deleted(p, most_salient(heatmaps[(i + 1) % n], count, rng)) for i, p in enumerate(images)],
        "random": [deleted(p, rng.choice(32 * 32, count, replace=False)) for p in images],
    }
    everything = probabilities(stub, [p for group in variants.values() for p in group], model)
    target_probability = {
        name: everything[k * n:(k + 1) * n][np.arange(n), targets] for k, name in enumerate(variants)
    }
    drops = {name: float(np.mean(target_probability["original"] - target_probability[name]))
             for name in ("method", "mismatched", "random")}
    return {"images": n, "deleted_pixels": count, "mean_drop": drops,
            "margin_over_mismatched": drops["method"] - drops["mismatched"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--model", default="")
    parser.add_argument("--method", choices=["occlusion", "grad_cam"], default=None)
    parser.add_argument("--images", type=int, default=100, help="the first N test images")
    args = parser.parse_args(argv)
    images = cifar.read_batch(cifar.default_data_dir() / cifar.TEST_FILE).images[:args.images]
    method = {"occlusion": pb.EXPLAIN_METHOD_OCCLUSION, "grad_cam": pb.EXPLAIN_METHOD_GRAD_CAM}.get(
        args.method, pb.EXPLAIN_METHOD_UNSPECIFIED)
    with grpc.insecure_channel(args.target) as channel:
        result = deletion_test(pb_grpc.ClassifierStub(channel), images, method, args.model)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
