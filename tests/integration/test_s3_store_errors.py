"""How the S3 store reports the SDK's refusals: no room is RESOURCE_EXHAUSTED, denied access PERMISSION_DENIED,
anything else UNAVAILABLE; each names the endpoint and the bucket."""

from __future__ import annotations

import time

import pytest
import urllib3
from minio.error import S3Error

from runledger_server.backends.artifacts.minio import S3BlobStore
from runledger_server.domain.errors import Code, DomainError


def _store() -> S3BlobStore:
    # Made without touching the network: the SDK connects on the first call.
    return S3BlobStore(
        endpoint="http://127.0.0.1:9", bucket="models", access_key="k", secret_key="s", region="eu-west-1"
    )


def _s3_error(status: int, code: str) -> S3Error:
    response = urllib3.HTTPResponse(body=b"", status=status)
    return S3Error(response, code, f"{code} happened", "/models/x", "req-1", "host-1", "models", "x")


@pytest.mark.parametrize(
    ("status", "s3_code", "code", "reason"),
    [
        (507, "XMinioStorageFull", Code.RESOURCE_EXHAUSTED, "ARTIFACT_STORE_FULL"),
        (400, "XMinioAdminBucketQuotaExceeded", Code.RESOURCE_EXHAUSTED, "ARTIFACT_STORE_FULL"),
        (403, "AccessDenied", Code.PERMISSION_DENIED, "ARTIFACT_STORE_ACCESS_DENIED"),
        (403, "SignatureDoesNotMatch", Code.PERMISSION_DENIED, "ARTIFACT_STORE_ACCESS_DENIED"),
        (503, "SlowDown", Code.UNAVAILABLE, "ARTIFACT_STORE_UNAVAILABLE"),
    ],
)
def test_sdk_refusals_become_statuses(status: int, s3_code: str, code: Code, reason: str) -> None:
    store = _store()
    err = store.translate(_s3_error(status, s3_code), "storing a blob")
    assert isinstance(err, DomainError)
    assert (err.code, err.reason) == (code, reason)
    assert err.metadata["bucket"] == "models" and err.metadata["endpoint"] == "http://127.0.0.1:9"
    assert "storing a blob" in str(err)


def test_calls_while_the_store_is_unreachable_share_one_probe() -> None:
    """An endpoint that takes connections and never answers: each probe waits out its timeout, so calls must
    not queue behind one another's probes (four calls took 4x the timeout, holding the artifact pool). Calls
    within PROBE_INTERVAL of a failed probe get its answer at once."""
    import socket
    import threading

    from runledger_server.backends.artifacts import minio as s3_backend

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)  # held open, never answered

    threading.Thread(target=accept, daemon=True).start()
    store = S3BlobStore(
        endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}",
        bucket="models",
        access_key="k",
        secret_key="s",
        region="us-east-1",
        connect_timeout=0.3,
        read_timeout=0.3,
        retries=0,
    )
    outcomes: list[str] = []

    def call() -> None:
        try:
            store.size("0" * 64)
            outcomes.append("ok")
        except DomainError as exc:
            outcomes.append(exc.code.value)

    try:
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert outcomes == ["UNAVAILABLE"] * 4
        assert len(accepted) == 1  # one probe answered for all four
        time.sleep(s3_backend.PROBE_INTERVAL + 0.1)
        call()  # the interval is over: probed again
        assert outcomes[-1] == "UNAVAILABLE" and len(accepted) == 2
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
