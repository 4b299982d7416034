"""Top-1 classes of a batch of images over the Open Inference Protocol, through Triton's client.

tests/test_container.py runs it from .venv-triton (where tritonclient lives) against a container:
    .venv-triton/bin/python tests_v2/classify_over_v2.py --target 127.0.0.1:PORT --images images.npy
and reads one JSON object from stdout: {"model_name", "model_version", "top1": [class index, ...]}.
The model's first input takes the uint8 NHWC images; the top-1 is the argmax of its first output.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as triton


def classify(target: str, model: str, images: np.ndarray) -> dict:
    client = triton.InferenceServerClient(target)
    try:
        metadata = client.get_model_metadata(model)
        tensor = triton.InferInput(metadata.inputs[0].name, list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        output = metadata.outputs[0].name
        result = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput(output)],
                              client_timeout=120)
        response = result.get_response()
        return {"model_name": response.model_name, "model_version": response.model_version,
                "top1": result.as_numpy(output).argmax(axis=1).tolist()}
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the gRPC server")
    parser.add_argument("--images", required=True, help=".npy file of uint8 images [N, 32, 32, 3]")
    parser.add_argument("--model", default="cifar10")
    args = parser.parse_args(argv)
    print(json.dumps(classify(args.target, args.model, np.load(args.images))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
