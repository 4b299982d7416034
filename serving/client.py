"""Classify image files or directories with a running server.

    python -m serving.client IMAGE_OR_DIR [...] [--target localhost:50051] [--model NAME] [--top-k 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def image_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca and not args.tls_cert:
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    return grpc.secure_channel(args.target, credentials)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files or directories")
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--version", type=int, default=0, help="model version (0: newest)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, seconds")
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")
    parser.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify the server")
    parser.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", default=None, help="client private key (PEM) for mutual TLS")
    args = parser.parse_args(argv)
    files = image_files(args.paths)
    if not files:
        print("no image files found", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    failures = 0
    with channel_for(args) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for path in files:
            request = pb.ClassifyRequest(
                image=pb.Image(encoded=path.read_bytes()), model_name=args.model, model_version=args.version
            )
            if args.top_k is not None:
                request.top_k = args.top_k
            try:
                response = stub.Classify(request, timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as err:
                failures += 1
                print(f"{path}: {err.code().name}: {err.details()}")
                continue
            ranked = ", ".join(f"{p.label} {p.probability:.3f}" for p in response.predictions)
            print(f"{path}: {ranked}  [{response.model_name} v{response.model_version}]")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
