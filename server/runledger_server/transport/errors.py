"""The one place that turns domain refusals into gRPC statuses with google.rpc error details (AIP-193)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from runledger_server.domain.errors import Code, DomainError

_LOGGER = logging.getLogger(__name__)

DOMAIN = "runledger"

F = TypeVar("F", bound=Callable[..., Any])


# A status travels in the trailers, which gRPC caps at 8 KiB by default: a refusal that echoed a long input (a
# 5,000-character ID) would reach the client as RESOURCE_EXHAUSTED without its reason or field. The message goes
# there twice (percent-encoded, and inside the details), so it is clipped by its UTF-8 size.
MAX_MESSAGE_BYTES = 480
# The metadata together (keys and values): left whole when they fit, else the longest values are clipped first.
MAX_METADATA_BYTES = 3000


def clip(text: str, limit: int) -> str:
    """`text` within `limit` UTF-8 bytes, cut at a character boundary and marked as cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 40].decode(errors="ignore") + f"... ({len(text)} characters in all)"


def fit_metadata(metadata: dict[str, str], budget: int) -> dict[str, str]:
    """The metadata within `budget` UTF-8 bytes: unchanged when it fits (lists such as suiteFingerprints stay
    whole), else each value gets an equal share of what the shorter ones leave, shortest first."""
    size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
    if size <= budget:
        return dict(metadata)
    fitted: dict[str, str] = {}
    left, pending = budget, sorted(metadata.items(), key=lambda kv: len(kv[1].encode()))
    for i, (key, value) in enumerate(pending):
        share = left // (len(pending) - i) - len(key.encode())
        fitted[key] = clip(value, max(share, 80))
        left -= len(key.encode()) + len(fitted[key].encode())
    return {k: fitted[k] for k in metadata}


def to_status(err: DomainError) -> grpc.Status:
    message = clip(err.message, MAX_MESSAGE_BYTES)
    metadata = fit_metadata(err.metadata, MAX_METADATA_BYTES)
    details = [error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata)]
    if err.code is Code.INVALID_ARGUMENT and err.field:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field=err.field, description=message)]
            )
        )
    if err.code is Code.FAILED_PRECONDITION:
        details.append(
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=err.reason, subject=err.field or "", description=message
                    )
                ]
            )
        )
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=getattr(code_pb2, err.code.value), message=message, details=packed)
    return rpc_status.to_status(status)


def internal_status() -> grpc.Status:
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the server log")
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))
    status.details.append(info)
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


def status_for(exc: BaseException, method: str) -> grpc.Status:
    """A refusal's own status; anything unexpected is logged once and becomes a bare INTERNAL."""
    if isinstance(exc, DomainError):
        return to_status(exc)
    _LOGGER.exception("unexpected error in %s", method)
    return internal_status()


def handle_errors(fn: F) -> F:
    """Wrap an async servicer method (unary or streaming) so refusals become proper statuses."""
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if isinstance(request, DomainError):
                    raise request
                async for item in fn(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:
                await abort(context, status_for(exc, name))

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, DomainError):  # malformed bytes, refused by the decoder (registration.py)
                raise request
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, status_for(exc, name))

    return wrapper  # type: ignore[return-value]
