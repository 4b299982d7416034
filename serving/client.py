"""Classify image files or directories with a running server.

    python -m serving.client IMAGE_OR_DIR [...] [--target localhost:50051] [--model NAME] [--label stable] [--top-k 3]
    python -m serving.client explain IMAGE --output OVERLAY.png   (serving/explain_cli.py)
"""

from __future__ import annotations

import argparse
import os
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


def channel_to(target: str, tls_ca: str | None = None, tls_cert: str | None = None,
               tls_key: str | None = None) -> grpc.Channel:
    """Plaintext unless a CA or a client certificate is given; TLS (mutual with a certificate) otherwise."""
    if not tls_ca and not tls_cert:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )
    return grpc.secure_channel(target, credentials)


def add_connection_arguments(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None,
                             env_prefix: str = "") -> None:
    """--token and the TLS flags; with env_prefix, each defaults to $<env_prefix>TOKEN, ...TLS_CA and so on."""
    environ = {} if not env_prefix else (os.environ if environ is None else environ)
    flags = [("token", "bearer token, if the server requires one"),
             ("tls_ca", "CA certificate (PEM) to verify the server; turns TLS on"),
             ("tls_cert", "client certificate (PEM) for mutual TLS"),
             ("tls_key", "client private key (PEM) for mutual TLS")]
    for name, help_text in flags:
        env = f"{env_prefix}{name.upper()}"
        parser.add_argument(f"--{name.replace('_', '-')}", default=environ.get(env) or None,
                            help=f"{help_text} (default ${env})" if env_prefix else help_text)


def add_call_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    """Where to send a call and what it names: server, model, version, top-k, deadline, connection."""
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--version", type=int, default=0,
                        help="model version (0: the model's traffic split if it has one, else the newest)")
    parser.add_argument("--label", default="", help="version label, e.g. stable (instead of --version)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=timeout, help="per-request deadline, seconds")
    add_connection_arguments(parser)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["explain"]:  # a subcommand; anything else is a path to classify (./explain for a file)
        from serving import explain_cli

        return explain_cli.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files or directories")
    add_call_arguments(parser, timeout=10.0)
    args = parser.parse_args(argv)
    files = image_files(args.paths)
    if not files:
        print("no image files found", file=sys.stderr)
        return 2
    metadata = token_metadata(args.token)
    failures = 0
    with channel_to(args.target, args.tls_ca, args.tls_cert, args.tls_key) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for path in files:
            request = pb.ClassifyRequest(
                image=pb.Image(encoded=path.read_bytes()), model_name=args.model, model_version=args.version,
                version_label=args.label,
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
            label = f" {response.version_label}" if response.version_label else ""
            print(f"{path}: {ranked}  [{response.model_name} v{response.model_version}{label}]")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
