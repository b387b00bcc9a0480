"""Typed client errors: every refusal from the server arrives as one of these, never as a raw grpc.RpcError."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

_LOGGER = logging.getLogger(__name__)

DOMAIN = "runledger"


class RunledgerError(Exception):
    """A refused or failed call: the gRPC status code, the server's stable reason, its metadata and message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        domain: str = "",
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.domain = domain

    def __str__(self) -> str:
        head = self.code.name + (f" {self.reason}" if self.reason and self.reason != self.code.name else "")
        return f"{head}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields survive pickling (errors crossing process boundaries, e.g. DataLoader workers).
        return (_rebuild, (type(self), self.message, self.code, self.reason, self.metadata, self.domain))

    def again(self) -> RunledgerError:
        """A fresh copy to raise once more (a failure reported on every later call): raising one object again
        and again would grow its traceback, and with it the caller frames it keeps alive, without end."""
        copy = _rebuild(type(self), self.message, self.code, self.reason, dict(self.metadata), self.domain)
        copy.__cause__ = self.__cause__
        return copy


def _rebuild_os_error(
    rebuild: Callable[..., RunledgerError],
    args: tuple[Any, ...],
    errno_: int | None,
    strerror: str | None,
    filename: Any,
) -> RunledgerError:
    err = rebuild(*args)
    err.errno, err.strerror, err.filename = errno_, strerror, filename  # type: ignore[attr-defined]
    return err


def _rebuild(
    cls: type[RunledgerError],
    message: str,
    code: grpc.StatusCode,
    reason: str,
    metadata: dict[str, str],
    domain: str,
) -> RunledgerError:
    return cls(message, code=code, reason=reason, metadata=metadata, domain=domain)


class InvalidArgument(RunledgerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RunledgerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RunledgerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RunledgerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class LocalFileError(FailedPrecondition, OSError):
    """A downloaded artifact could not be saved locally: a full disk, no permission, a name or path the local
    file system refuses. Names the local file and the artifact, and is still the OSError it stands for
    (`errno`, `filename`), so code that handled those keeps working."""

    @classmethod
    def wrap(cls, exc: OSError, artifact_path: str, local: os.PathLike[str] | str) -> LocalFileError:
        err = cls(
            f"could not save artifact {artifact_path!r} to {local}: {exc}",
            reason="LOCAL_FILE_ERROR",
            metadata={
                "path": artifact_path,
                "localPath": str(local),
                "errno": errno.errorcode.get(exc.errno or 0, ""),
            },
        )
        err.errno, err.strerror, err.filename = exc.errno, exc.strerror, exc.filename
        return err

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = super().__reduce__()[:2]
        return (_rebuild_os_error, (rebuild, args, self.errno, self.strerror, self.filename))


class Aborted(RunledgerError):
    code = grpc.StatusCode.ABORTED


class Unavailable(RunledgerError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(RunledgerError):
    """Too much: the server's storage has no room (reasons DATABASE_FULL, ARTIFACT_STORE_FULL), a run's params and
    tags exceed their limit (RUN_METADATA_TOO_LARGE), a history read spans more points than the server reads at
    once (HISTORY_TOO_LARGE; `metric_history` then reads it in parts), or a gRPC limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(RunledgerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RunledgerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DataLoss(RunledgerError):
    code = grpc.StatusCode.DATA_LOSS


class DeadlineExceeded(RunledgerError, TimeoutError):
    """A call or a `flush(timeout=...)` ran out of time; nothing logged was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[RunledgerError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unavailable,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        DataLoss,
        DeadlineExceeded,
    )
}


def error_class(code: grpc.StatusCode) -> type[RunledgerError]:
    return _BY_CODE.get(code, RunledgerError)


def from_rpc_error(err: grpc.RpcError) -> RunledgerError:
    """Turn a failed call into the typed error for its status code, with the google.rpc.ErrorInfo unpacked."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(code)
    reason, metadata, domain = "", {}, ""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, DecodeError):  # trailers disagree with the call's status, or are garbled (a proxy)
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata, domain = info.reason, dict(info.metadata), info.domain
                break
    exc = error_class(code)(message, code=code, reason=reason, metadata=metadata, domain=domain)
    exc.__cause__ = err if isinstance(err, BaseException) else None
    return exc


def is_transient(err: RunledgerError) -> bool:
    """Worth retrying: the server or the connection is (for now) unable, not a refusal of the request itself.

    A status with the server's own ErrorInfo is a deliberate answer; only its UNAVAILABLE (e.g. shutting
    down) and its RESOURCE_EXHAUSTED (storage full: points wait in the client until an operator makes room,
    rather than being dropped) are transient. Without one, the status came from the transport (connection
    reset, server killed mid-call), and the usual transport codes are retried.
    """
    if err.domain == DOMAIN:
        return err.code in _SERVER_TRANSIENT
    return err.code in _TRANSPORT_TRANSIENT


_SERVER_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


_TRANSPORT_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)
