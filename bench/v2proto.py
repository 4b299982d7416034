"""Message classes of the Open Inference (KServe V2) gRPC protocol, package `inference`.

Preferred: the stubs `make proto` generates from protos/inference/grpc_service.proto (our own
V2 endpoint's API). Until that file exists, the descriptor MLServer ships in its package
(mlserver/grpc/dataplane_pb2.py, same package and messages) is loaded into a private pool;
it is read as data (the serialized FileDescriptorProto), never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "inference.GRPCInferenceService"
MESSAGES = (
    "ModelInferRequest", "ModelInferResponse", "ModelMetadataRequest", "ModelMetadataResponse",
    "ModelReadyRequest", "ModelReadyResponse", "ServerReadyRequest", "ServerReadyResponse",
)


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def _from_generated() -> SimpleNamespace | None:
    try:
        from serving.proto.inference import grpc_service_pb2 as v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    return SimpleNamespace(source="protos/inference/grpc_service.proto", **{m: getattr(v2, m) for m in MESSAGES})


def _serialized_descriptor(module_path: Path) -> bytes:
    """The bytes literal passed to AddSerializedFile(...) in a generated *_pb2.py."""
    tree = ast.parse(module_path.read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"
                and node.args and isinstance(node.args[0], ast.Constant)):
            return node.args[0].value
    raise RuntimeError(f"no serialized descriptor in {module_path}")


def _from_mlserver(mlserver_venv: Path) -> SimpleNamespace:
    candidates = sorted(mlserver_venv.glob("lib/python3*/site-packages/mlserver/grpc/dataplane_pb2.py"))
    if not candidates:
        raise RuntimeError(
            f"no V2 protocol definition: protos/inference/grpc_service.proto is absent and MLServer is not "
            f"installed in {mlserver_venv} (make bench-venvs)"
        )
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(_serialized_descriptor(candidates[0]))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    classes = {m: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{m}")) for m in MESSAGES}
    return SimpleNamespace(source=f"MLServer's {candidates[0].name}", **classes)


def load(mlserver_venv: Path) -> SimpleNamespace:
    return _from_generated() or _from_mlserver(mlserver_venv)
