"""Keepalive: the server accepts a client's pings on an idle connection (no calls) instead of closing it.

gRPC's default server policy answers pings more frequent than every 5 minutes on a connection without calls with
GOAWAY ("too_many_pings"), which would drop a trainer's connection between runs; runledger clients ping every 20 s
so that a silent network partition is noticed.
"""

from __future__ import annotations

import threading
import time

import grpc

from runledger.v1 import tracking_service_pb2 as pb, tracking_service_pb2_grpc
from runledger_server.embedded import EmbeddedServer

FREQUENT_PINGS = [
    ("grpc.keepalive_time_ms", 200),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def test_an_idle_connection_that_pings_is_kept_open(server: EmbeddedServer) -> None:
    with grpc.insecure_channel(server.address, options=FREQUENT_PINGS) as channel:
        stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        stub.ListExperiments(pb.ListExperimentsRequest())  # connected; from here on no call is active
        states: list[grpc.ChannelConnectivity] = []
        lock = threading.Lock()

        def record(state: grpc.ChannelConnectivity) -> None:
            with lock:
                states.append(state)

        channel.subscribe(record, try_to_connect=False)
        time.sleep(3)  # ~15 pings on a connection without calls
        stub.ListExperiments(pb.ListExperimentsRequest())
        channel.unsubscribe(record)
    with lock:
        # A GOAWAY would have taken the channel out of READY (to IDLE, then CONNECTING again).
        assert states and set(states) == {grpc.ChannelConnectivity.READY}, states
