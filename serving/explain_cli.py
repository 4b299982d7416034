"""Explain one image with a running server: the heatmap overlay and the feature-map grids.

    python -m serving.client explain cat.png --output cat-explained.png [--method grad_cam]

Writes the overlay to --output and each layer's feature maps beside it
(cat-explained-<layer>.png); prints the predictions and what was explained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from serving.client import add_call_arguments, channel_to, token_metadata
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc

METHODS = {"occlusion": pb.EXPLAIN_METHOD_OCCLUSION, "grad_cam": pb.EXPLAIN_METHOD_GRAD_CAM}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.client explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="PNG, JPEG, BMP or GIF file")
    parser.add_argument("--output", type=Path, default=None,
                        help="the overlay PNG (default: <image>-explained.png beside the image)")
    parser.add_argument("--method", choices=sorted(METHODS), default=None,
                        help="default: the model's default (occlusion)")
    parser.add_argument("--class", dest="target_class", type=int, default=None,
                        help="class index to explain (default: the top-1 prediction)")
    parser.add_argument("--layer", dest="layers", action="append", default=[],
                        help="feature maps of this layer (repeatable; default: the model's default layers)")
    parser.add_argument("--patch", type=int, default=0, help="occlusion patch side in pixels (default 8)")
    parser.add_argument("--stride", type=int, default=0, help="occlusion stride in pixels (default: half the patch)")
    add_call_arguments(parser, timeout=30.0)
    return parser.parse_args(argv)


def request_of(args: argparse.Namespace) -> pb.ExplainRequest:
    request = pb.ExplainRequest(
        image=pb.Image(encoded=args.image.read_bytes()), model_name=args.model, model_version=args.version,
        method=METHODS.get(args.method, pb.EXPLAIN_METHOD_UNSPECIFIED), layers=args.layers,
        occlusion=pb.OcclusionOptions(patch_size=args.patch, stride=args.stride),
    )
    if args.target_class is not None:
        request.target_class = args.target_class
    if args.top_k is not None:
        request.top_k = args.top_k
    return request


def write_outputs(response: pb.ExplainResponse, output: Path) -> list[Path]:
    """The overlay at `output`, each layer's grid beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(response.heatmap_png)
    written = [output]
    for feature_map in response.feature_maps:
        path = output.with_name(f"{output.stem}-{feature_map.layer}{output.suffix or '.png'}")
        path.write_bytes(feature_map.png)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = args.output or args.image.with_name(f"{args.image.stem}-explained.png")
    try:
        request = request_of(args)
    except OSError as exc:
        print(f"{args.image}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with channel_to(args.target, args.tls_ca, args.tls_cert, args.tls_key) as channel:
        try:
            response = pb_grpc.ClassifierStub(channel).Explain(request, timeout=args.timeout,
                                                               metadata=token_metadata(args.token))
        except grpc.RpcError as err:
            print(f"{args.image}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    ranked = ", ".join(f"{p.label} {p.probability:.3f}" for p in response.predictions)
    method = pb.ExplainMethod.Name(response.method).removeprefix("EXPLAIN_METHOD_").lower()
    print(f"{args.image}: {ranked}  [{response.model_name} v{response.model_version}]")
    print(f"explained {response.target_label} (class {response.target_class}) by {method}, "
          f"{response.forward_passes} forward passes")
    for path in write_outputs(response, output):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
