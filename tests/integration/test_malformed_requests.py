"""Bytes that are not a valid request message, on every service: INVALID_ARGUMENT naming `request`, with the
ErrorInfo every other refusal carries (gRPC's own answer to a failing decoder is UNKNOWN without details)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tests.support import refusal

TRUNCATED = b"\x0a\x50abc"  # field 1 claims 80 bytes, 3 follow
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1, a string, is not UTF-8

UNARY = [
    "/runledger.v1.TrackingService/GetRun",
    "/runledger.v1.TrackingService/CreateExperiment",
    "/runledger.v1.TrackingService/SearchRuns",
    "/runledger.v1.RegistryService/CreateModelVersion",
    "/runledger.v1.RegistryService/SetAlias",
    "/runledger.v1.RegistryService/GetModelVersionByAlias",
    "/runledger.v1.ArtifactService/ListArtifacts",
]


def _raw(channel: grpc.Channel, kind: str, method: str) -> Callable[..., Any]:
    return getattr(channel, kind)(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def _invalid_request(call: Callable[[], Any]) -> None:
    r = refusal(call)
    assert (r.code, r.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, "request"), r
    assert "not a valid message" in r.message


@pytest.mark.parametrize("data", [TRUNCATED, BAD_UTF8], ids=["truncated", "bad-utf8"])
def test_malformed_bytes_are_invalid_argument_on_every_kind_of_method(channel: grpc.Channel, data: bytes) -> None:
    for method in UNARY:
        _invalid_request(lambda m=method: _raw(channel, "unary_unary", m)(data, timeout=10))  # type: ignore[misc]
    history = _raw(channel, "unary_stream", "/runledger.v1.TrackingService/GetMetricHistory")
    _invalid_request(lambda: list(history(data, timeout=10)))
    watch = _raw(channel, "unary_stream", "/runledger.v1.RegistryService/WatchAlias")
    _invalid_request(lambda: next(iter(watch(data, timeout=10))))
    upload = _raw(channel, "stream_unary", "/runledger.v1.ArtifactService/UploadArtifact")
    _invalid_request(lambda: upload(iter([data]), timeout=10))
