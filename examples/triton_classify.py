"""Classify CIFAR-10 test images through the Open Inference Protocol (KServe V2) with Triton's
own client, knowing nothing of this server but what the protocol reports.

Written from Triton's client documentation only: the model comes from the repository index,
the tensor names and datatype from the model metadata, the labels from the classification
extension ("score:index:label"). Works against Triton, KServe or this server alike.

    pip install "tritonclient[grpc]==2.73.0"   # or use the project's .venv-triton
    python examples/triton_classify.py --url localhost:50051 --data-dir ../shared/data/cifar-10-batches-py
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype


def read_test_images(data_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The official python-pickle CIFAR-10 test batch -> (uint8 NHWC images, labels)."""
    with open(data_dir / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8)[:count].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"][:count])


def pick_model(client: grpcclient.InferenceServerClient, wanted: str | None) -> str:
    ready = [m.name for m in client.get_model_repository_index().models if m.state == "READY"]
    if wanted:
        if wanted not in ready:
            raise SystemExit(f"model {wanted!r} is not READY on the server (ready: {sorted(set(ready))})")
        return wanted
    if not ready:
        raise SystemExit("the server has no READY model")
    return sorted(ready)[0]


def classify(client: grpcclient.InferenceServerClient, model: str, images: np.ndarray, batch_size: int) -> list[int]:
    metadata = client.get_model_metadata(model)
    tensor_in, tensor_out = metadata.inputs[0], metadata.outputs[0]
    dtype = triton_to_np_dtype(tensor_in.datatype)
    predictions: list[int] = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(dtype)
        inputs = [grpcclient.InferInput(tensor_in.name, list(batch.shape), tensor_in.datatype)]
        inputs[0].set_data_from_numpy(batch)
        outputs = [grpcclient.InferRequestedOutput(tensor_out.name, class_count=1)]
        result = client.infer(model, inputs, outputs=outputs)
        # Each row: b"score:index:label" for the best class.
        predictions.extend(int(row[0].decode().split(":")[1]) for row in result.as_numpy(tensor_out.name))
    return predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:50051", help="the server's gRPC address")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/cifar-10-batches-py"))
    parser.add_argument("--count", type=int, default=1000, help="test images to classify (from the first)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="model name (default: the first READY one in the index)")
    parser.add_argument("--json", action="store_true", help="print the model, accuracy and every prediction as JSON")
    args = parser.parse_args(argv)
    images, labels = read_test_images(args.data_dir, args.count)
    with grpcclient.InferenceServerClient(args.url) as client:
        if not client.is_server_ready():
            print(f"server {args.url} is not ready", file=sys.stderr)
            return 1
        model = pick_model(client, args.model)
        predictions = classify(client, model, images, args.batch_size)
    accuracy = float(np.mean(np.array(predictions) == labels))
    if args.json:
        print(json.dumps({"model": model, "images": len(labels), "accuracy": accuracy, "predictions": predictions}))
    else:
        print(f"{model}: {accuracy:.2%} top-1 accuracy on the first {len(labels)} CIFAR-10 test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
