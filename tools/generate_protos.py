"""Generate the gRPC stubs of protos/ into a `serving.proto` package: the one recipe for all.

    python tools/generate_protos.py serving/proto

`make proto`, both images' `stubs` stage and the build hook of `pip install .` (setup.py) run
it; it needs grpcio-tools (the compiler) and googleapis-common-protos (google/rpc/status.proto).
protoc writes `from cifar10.classifier.v1 import classifier_pb2`; inside our package that must
be `from serving.proto.cifar10...`, so our own packages are rewritten (google.* stays).
Standard library only besides those two: setup.py imports it inside pip's build environment.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
OWN_PACKAGES = ("cifar10", "inference")


def fix_imports(out_dir: Path) -> None:
    """Make the generated modules import each other as `serving.proto.*`, and every folder a package."""
    pattern = re.compile(rf"^(from|import) ({'|'.join(OWN_PACKAGES)})([. ])", re.MULTILINE)
    for path in out_dir.rglob("*.py*"):
        text = path.read_text()
        path.write_text(pattern.sub(r"\1 serving.proto.\2\3", text))
    for directory in [out_dir, *[d for d in out_dir.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Messages, type stubs (.pyi) and gRPC stubs of every .proto under proto_root into out_dir."""
    import google.rpc
    from grpc_tools import protoc

    sources = sorted(proto_root.rglob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    googleapis = Path(google.rpc.__path__[0]).parent.parent  # holds google/rpc/status.proto
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto, as `python -m grpc_tools.protoc` adds
    argv = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{googleapis}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(str(source) for source in sources)]
    if protoc.main(argv) != 0:
        raise SystemExit(f"protoc failed on {', '.join(map(str, sources))}")
    fix_imports(out_dir)
    return sources


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/generate_protos.py OUT_DIR", file=sys.stderr)
        return 2
    generate(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
