"""Request bytes that are not a valid protobuf message: INVALID_ARGUMENT, counted like any bad input.

grpc deserialises a request before any handler runs, and answers a DecodeError with UNKNOWN
("Unexpected <class 'DecodeError'>"), a logged traceback, no metric and, in a stream, the end
of the whole stream. So every method of our API faces is registered with a deserializer that
turns undecodable bytes into a `CorruptMessage` instead: a unary call answers it with
INVALID_ARGUMENT through the CallObserver (metrics, access log), and a stream answers it
in-band like any other bad message and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import grpc
from google.protobuf.message import DecodeError

from serving.calls import CallObserver
from serving.errors import InvalidInput

M = TypeVar("M")


@dataclass(frozen=True)
class CorruptMessage:
    """Stands where a request message would be when its bytes did not parse."""

    message_type: str
    detail: str

    def error(self) -> InvalidInput:
        return InvalidInput(f"the request is not a valid {self.message_type} message: {self.detail}",
                            reason="corrupt_message")


def parsed(request: M | CorruptMessage) -> M:
    """The message itself, or the InvalidInput a corrupt one stands for."""
    if isinstance(request, CorruptMessage):
        raise request.error()
    return request


def tolerant_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_class = getattr(deserialize, "__self__", None)
    message_type = message_class.DESCRIPTOR.full_name if message_class is not None else "request"

    def deserialize_or_mark(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return CorruptMessage(message_type, str(exc) or "undecodable bytes")

    return deserialize_or_mark


class TolerantRegistrar:
    """Takes the server's place in a generated `add_*Servicer_to_server(servicer, server)` call.

    The generated function registers one dictionary of method handlers twice (generic and
    registered); both registrations here get the tolerant versions.
    """

    def __init__(self, server: grpc.aio.Server, calls: CallObserver, protocol: str):
        self._server, self._calls, self._protocol = server, calls, protocol
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        """Ignored: the same handlers arrive, as a dictionary, in add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        tolerant = {name: self._tolerant(name, handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, tolerant),))
        self._server.add_registered_method_handlers(service, tolerant)
        self.registered.append(service)

    def _tolerant(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        handler = handler._replace(request_deserializer=tolerant_deserializer(handler.request_deserializer))
        if handler.unary_unary is None:
            return handler  # streams answer a CorruptMessage in-band, message by message
        behaviour = handler.unary_unary
        calls, protocol = self._calls, self._protocol

        async def refuse_corrupt(request, context):
            if isinstance(request, CorruptMessage):
                async def fail():
                    raise request.error()

                return await calls.unary(calls.record(method, protocol, context), context, fail)
            return await behaviour(request, context)

        return handler._replace(unary_unary=refuse_corrupt)


def register(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server,
             calls: CallObserver, protocol: str) -> None:
    registrar = TolerantRegistrar(server, calls, protocol)
    add_to_server(servicer, registrar)
    if not registrar.registered:  # a grpcio whose generated code registers differently
        raise RuntimeError(f"{add_to_server.__name__} registered no method handlers")
