"""Wiring: build the stores, services and servicers for a Settings. The only module that knows the
concrete backends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runledger.v1 import (
    artifact_service_pb2,
    registry_service_pb2,
    registry_service_pb2_grpc,
    tracking_service_pb2,
)
from runledger_server.backends import artifacts as artifact_backends
from runledger_server.backends.artifacts.allocator import keep_transfer_buffers
from runledger_server.backends.sql import migrate
from runledger_server.backends.sql.artifact_index_store import SqlArtifactIndex
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.registry_store import SqlRegistryStore
from runledger_server.backends.sql.tracking_store import SqlTrackingStore
from runledger_server.config import Settings
from runledger_server.services.alias_watch import AliasWatchHub
from runledger_server.services.artifacts import ArtifactService
from runledger_server.services.metric_ingest import MetricIngest
from runledger_server.services.registry import RegistryService
from runledger_server.services.tracking import TrackingService
from runledger_server.transport import registration, tracking_servicer
from runledger_server.transport.artifact_servicer import ArtifactServicer, add_to_server as add_artifact_service
from runledger_server.transport.ingest_budget import POINT_BYTES, PointBudget
from runledger_server.transport.registry_servicer import RegistryServicer
from runledger_server.transport.tracking_servicer import TrackingServicer

_LOGGER = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Keepalive: the server pings idle connections so that a client gone silently (a partitioned or frozen trainer)
# releases its streams within about a minute and a half, and it accepts the client's own pings (runledger clients
# ping every 20 s; gRPC's default would answer pings more frequent than every 5 minutes with GOAWAY).
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)
SERVICE_NAMES = (
    tracking_service_pb2.DESCRIPTOR.services_by_name["TrackingService"].full_name,
    artifact_service_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name,
    registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
)


def own_process() -> None:
    """Process-wide tuning for a process that is the server (`runledger serve`); an embedded server, a guest
    in someone else's process, does not do it. Today: keep the allocator's transfer buffers (see allocator)."""
    keep_transfer_buffers()


@dataclass
class Server:
    """A built server: start it, stop it gracefully (acknowledged writes are finished first)."""

    grpc_server: grpc.aio.Server
    port: int
    settings: Settings
    _closers: list[Callable[[], object]] = field(default_factory=list)
    _drainers: list[Callable[[], Awaitable[object]]] = field(default_factory=list)  # awaited before the closers
    _stream_enders: list[Callable[[], object]] = field(default_factory=list)  # called as the stop begins
    _health: Any = None  # grpc_health's asyncio HealthServicer (untyped in its stubs)
    ingest_budget: PointBudget | None = None  # metric points received and not yet committed (for monitoring)

    async def start(self) -> None:
        await self.grpc_server.start()
        if self._health is not None:
            for name in ("", *SERVICE_NAMES):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        try:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            grace = self.settings.grace_seconds if grace is None else grace
            stopping = asyncio.ensure_future(self.grpc_server.stop(grace))
            await asyncio.sleep(0)  # new calls are refused from here on
            for end in self._stream_enders:  # streams that would otherwise last the whole grace period
                end()
            await stopping
            for drain in self._drainers:
                await drain()
        finally:  # whatever failed above, the database, the commit thread and the pools are closed
            for close in reversed(self._closers):
                close()

    async def cut_short(self) -> None:
        """End the grace period of a `stop()` under way now: the calls still running are cancelled (their clients
        see UNAVAILABLE and retry elsewhere); `stop()` then finishes as usual, acknowledged writes included."""
        await self.grpc_server.stop(0)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def build_server(settings: Settings) -> tuple[Server, int]:
    """Create (but do not start) the server; the port is the bound one (0 picks a free port).

    A failure at any step (the port taken, the database refused) closes what the steps before it opened (the
    database, the commit thread, the worker pools): a server that cannot start leaves nothing running.
    """
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            *KEEPALIVE_OPTIONS,
        ]
    )
    closers: list[Callable[[], object]] = []
    try:
        db = Database(settings.database_url)
        closers.append(db.dispose)
        migrate.upgrade(db)
        executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="runledger-worker")
        closers.append(lambda: executor.shutdown(wait=True))
        tracking_store = SqlTrackingStore(
            db, settings.metric_cache_mib << 20, query_budget=float(settings.search_budget_seconds)
        )
        ingest = MetricIngest(tracking_store)
        closers.append(ingest.close)
        tracking = TrackingService(tracking_store, ingest, settings.history_max_points)

        budget = PointBudget(max(1, (settings.ingest_buffer_mib << 20) // POINT_BYTES))
        tracking_grpc = TrackingServicer(tracking, executor, budget)
        tracking_servicer.add_to_server(tracking_grpc, grpc_server)
        # Transfers get their own pool: a long upload waiting on the artifact store must not starve tracking calls.
        artifact_executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="runledger-artifacts")
        closers.append(lambda: artifact_executor.shutdown(wait=True))
        artifacts = ArtifactService(SqlArtifactIndex(db), artifact_backends.from_settings(settings))
        registry = RegistryService(SqlRegistryStore(db), tracking_store, artifacts)
        alias_watch = AliasWatchHub(registry.alias_revisions, executor)
        closers.append(alias_watch.close)
        registry.on_alias_change(alias_watch.notify)
        artifact_servicer = ArtifactServicer(artifacts, artifact_executor)
        add_artifact_service(artifact_servicer, grpc_server)
        registration.register(
            registry_service_pb2_grpc.add_RegistryServiceServicer_to_server,
            RegistryServicer(registry, alias_watch, executor),
            grpc_server,
        )
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), grpc_server)
        # Last: a server that is never started keeps its bound port until it is garbage-collected.
        port = _bind(grpc_server, settings.host, settings.port)
    except BaseException:
        for close in reversed(closers):
            try:
                close()
            except Exception:  # the original failure is the one to report
                _LOGGER.exception("closing after a failed start")
        raise
    server = Server(grpc_server, port, settings, _health=health_servicer, ingest_budget=budget)
    server._closers += closers  # closed in reverse: the database last, after the pools and threads that use it
    server._drainers.append(artifact_servicer.drain)
    server._stream_enders.append(alias_watch.shut_down)
    server._stream_enders.append(tracking_grpc.shut_down)
    _LOGGER.info(
        "runledger serving on %s:%d (metadata: %s, artifacts: %s, metric cache: %d MiB)",
        settings.host,
        port,
        db.url.render_as_string(hide_password=True),
        settings.artifact_location,
        settings.metric_cache_mib,
    )
    return server, port


def _bind(grpc_server: grpc.aio.Server, host: str, port: int) -> int:
    """The bound port; OSError naming the address when it cannot be had (grpc raises RuntimeError for it)."""
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"  # IPv6: ::1
    try:
        bound = grpc_server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return int(bound)
