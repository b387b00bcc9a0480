"""Shared fixtures: a real runledger server on a free loopback port, and stubs talking to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from runledger.v1 import (
    artifact_service_pb2_grpc,
    registry_service_pb2_grpc,
    tracking_service_pb2_grpc,
)
from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.s3"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")


@pytest.fixture
def server(settings: Settings) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(settings) as srv:
        yield srv


@pytest.fixture
def channel(server: EmbeddedServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def tracking(channel: grpc.Channel) -> tracking_service_pb2_grpc.TrackingServiceStub:
    return tracking_service_pb2_grpc.TrackingServiceStub(channel)


@pytest.fixture
def artifacts(channel: grpc.Channel) -> artifact_service_pb2_grpc.ArtifactServiceStub:
    return artifact_service_pb2_grpc.ArtifactServiceStub(channel)


@pytest.fixture
def registry(channel: grpc.Channel) -> registry_service_pb2_grpc.RegistryServiceStub:
    return registry_service_pb2_grpc.RegistryServiceStub(channel)
