"""The client's typed errors: one class per status code, picklable, and which of them a sender retries."""

from __future__ import annotations

import pickle

import grpc
import pytest

from runledger import errors


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.ABORTED, errors.Aborted),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.DATA_LOSS, errors.DataLoss),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.INTERNAL, errors.RunledgerError),
    ],
)
def test_one_class_per_code(code: grpc.StatusCode, cls: type[errors.RunledgerError]) -> None:
    assert errors.error_class(code) is cls
    err = cls("boom", code=code, reason="R", metadata={"k": "v"})
    assert err.code is code and isinstance(err, errors.RunledgerError)


def test_fields_str_and_pickle() -> None:
    err = errors.AlreadyExists(
        "param 'lr' is already 2e-05", reason="PARAM_IMMUTABLE", metadata={"key": "lr"}, domain="runledger"
    )
    assert (err.code, err.reason, err.metadata, err.message) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "PARAM_IMMUTABLE",
        {"key": "lr"},
        "param 'lr' is already 2e-05",
    )
    assert str(err) == "ALREADY_EXISTS PARAM_IMMUTABLE: param 'lr' is already 2e-05"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.AlreadyExists
    assert (back.code, back.reason, back.metadata, back.message, back.domain) == (
        err.code,
        err.reason,
        err.metadata,
        err.message,
        err.domain,
    )


def test_deadline_exceeded_is_a_timeout() -> None:
    err = errors.DeadlineExceeded("flush timed out", reason="FLUSH_TIMEOUT")
    assert isinstance(err, TimeoutError) and err.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(err) == "DEADLINE_EXCEEDED FLUSH_TIMEOUT: flush timed out"


@pytest.mark.parametrize(
    ("code", "domain", "transient"),
    [
        # the transport's own failures: connection refused or reset, server killed mid-call
        (grpc.StatusCode.UNAVAILABLE, "", True),
        (grpc.StatusCode.INTERNAL, "", True),
        (grpc.StatusCode.UNKNOWN, "", True),
        (grpc.StatusCode.CANCELLED, "", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "", False),  # e.g. a message over the size limit: resending won't help
        # the server's deliberate answers
        (grpc.StatusCode.UNAVAILABLE, "runledger", True),  # shutting down
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "runledger", True),  # storage full: kept until there is room
        (grpc.StatusCode.INTERNAL, "runledger", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "runledger", False),
        (grpc.StatusCode.NOT_FOUND, "runledger", False),
        (grpc.StatusCode.PERMISSION_DENIED, "runledger", False),
        (grpc.StatusCode.ABORTED, "runledger", False),
    ],
)
def test_is_transient(code: grpc.StatusCode, domain: str, transient: bool) -> None:
    err = errors.error_class(code)("x", code=code, domain=domain)
    assert errors.is_transient(err) is transient


def test_again_is_a_fresh_copy_with_the_same_fields_and_cause() -> None:
    cause = ValueError("transport")
    err = errors.Unavailable("down", reason="R", metadata={"k": "v"}, domain="runledger")
    err.__cause__ = cause
    copy = err.again()
    assert copy is not err and type(copy) is errors.Unavailable and copy.__cause__ is cause
    assert (copy.message, copy.code, copy.reason, copy.metadata, copy.domain) == (
        err.message,
        err.code,
        err.reason,
        err.metadata,
        err.domain,
    )
    assert copy.__traceback__ is None  # raising it does not extend the original's traceback


def test_a_pickled_local_file_error_is_still_the_os_error_it_stands_for() -> None:
    err = errors.LocalFileError.wrap(FileNotFoundError(2, "No such file or directory", "/no/dir/x"), "ckpt.bin", "/x")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.LocalFileError and isinstance(back, OSError)
    assert (back.errno, back.strerror, back.filename) == (2, "No such file or directory", "/no/dir/x")
    assert (back.reason, back.metadata, back.message) == (err.reason, err.metadata, err.message)
