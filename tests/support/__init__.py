"""Helpers for tests: reading google.rpc error details off a failed call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class Refusal:
    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    domain: str


def refusal(call: Callable[[], Any]) -> Refusal:
    """Run a call that must fail; return its status code, message and ErrorInfo."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return refusal_of(info.value)


def outcome(call: Callable[[], Any]) -> str:
    """Run a call that may fail: "OK", or its status code and ErrorInfo reason (for comparing raced calls)."""
    try:
        call()
    except grpc.RpcError as err:
        r = refusal_of(err)
        return f"{r.code.name} {r.reason}"
    return "OK"


def refusal_of(err: grpc.RpcError) -> Refusal:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status details on {err}"
    reason, meta, domain = "", {}, ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            ei = error_details_pb2.ErrorInfo()
            detail.Unpack(ei)
            reason, meta, domain = ei.reason, dict(ei.metadata), ei.domain
    return Refusal(err.code(), err.details() or "", reason, meta, domain)  # type: ignore[attr-defined]
