"""How the S3 store reports the SDK's refusals: no room is RESOURCE_EXHAUSTED, denied access PERMISSION_DENIED,
anything else UNAVAILABLE; each names the endpoint and the bucket."""

from __future__ import annotations

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
