"""Typed refusals of the domain; transport/errors.py alone turns them into gRPC statuses."""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Code(enum.Enum):
    """The gRPC status a refusal maps to (named here so the domain stays free of grpc)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    DATA_LOSS = "DATA_LOSS"
    UNAVAILABLE = "UNAVAILABLE"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"


class DomainError(Exception):
    """A refusal: status code, stable UPPER_SNAKE reason, message naming the field, metadata."""

    code: Code = Code.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        meta = dict(metadata or {})
        if field is not None:
            meta.setdefault("field", field)
        self.metadata: dict[str, str] = meta


class InvalidArgument(DomainError):
    code = Code.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    code = Code.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = Code.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = Code.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    code = Code.ABORTED
    default_reason = "ABORTED"


class DataLoss(DomainError):
    code = Code.DATA_LOSS
    default_reason = "DIGEST_MISMATCH"


class Unavailable(DomainError):
    code = Code.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class ResourceExhausted(DomainError):
    """A limit was reached: storage has no room (a full disk, a quota), or a query ran out of its budget.
    Retrying helps only once an operator makes room, or with a narrower request."""

    code = Code.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class PermissionDenied(DomainError):
    code = Code.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"
