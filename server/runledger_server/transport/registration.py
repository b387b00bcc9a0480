"""Registering servicers with request decoding that refuses malformed bytes as INVALID_ARGUMENT.

gRPC answers a request deserializer that raises with UNKNOWN and no ErrorInfo. Every method's deserializer is
wrapped instead: malformed bytes (truncated, invalid UTF-8 in a string field) become an InvalidArgument that
the handler raises (`handle_errors`), or that a streaming handler meets among the messages it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from runledger_server.domain.errors import InvalidArgument

Handlers = dict[str, Any]


class _HandlerCapture:
    """Stands in for a server to receive the generated method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: Handlers = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Handlers) -> None:
        self.service, self.handlers = service, dict(handlers)


def register(
    add_generated: Callable[[Any, Any], None],
    servicer: Any,
    server: Any,
    adjust: Callable[[Handlers], None] | None = None,
) -> None:
    """Like the generated `add_XServicer_to_server(servicer, server)`, with checked request decoding;
    `adjust` may then replace handlers' (de)serializers further."""
    captured = _HandlerCapture()
    add_generated(servicer, captured)
    handlers = {
        name: h._replace(request_deserializer=checked(name, h.request_deserializer))
        for name, h in captured.handlers.items()
    }
    if adjust is not None:
        adjust(handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
    server.add_registered_method_handlers(captured.service, handlers)


def checked(method: str, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """`deserialize`, returning the refusal instead of raising on malformed bytes."""
    if deserialize is None:
        return lambda data: data

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, UnicodeDecodeError, ...
            return InvalidArgument(f"the {method} request is not a valid message: {exc}", field="request")

    return decode


def pass_serialized(handlers: Handlers, method: str) -> None:
    """Let `method` yield messages already serialized (history pieces, download chunks): they go to the wire as
    they are, and messages still go through SerializeToString."""
    handlers[method] = handlers[method]._replace(response_serializer=_bytes_or_message)


def _bytes_or_message(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()
