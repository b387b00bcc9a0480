"""The test relay itself: a failover test relies on it outliving an upstream that is down for a while."""

from __future__ import annotations

import socket

from tests.fixtures.tcp_relay import CuttingRelay


def test_the_relay_keeps_accepting_after_its_upstream_refused_a_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here yet
    with CuttingRelay(("127.0.0.1", port)) as relay:
        host, relay_port = relay.endpoint.split(":")
        with socket.create_connection((host, int(relay_port)), timeout=10) as refused:
            assert refused.recv(1) == b""  # the upstream is down: the relay ends this connection
        with (
            socket.create_server(("127.0.0.1", port)) as upstream,  # the upstream is back
            socket.create_connection((host, int(relay_port)), timeout=10) as client,
        ):
            served, _ = upstream.accept()
            with served:
                client.sendall(b"ping")
                assert served.recv(4) == b"ping"
                served.sendall(b"pong")
                assert client.recv(4) == b"pong"
        assert relay.accepted == 1
