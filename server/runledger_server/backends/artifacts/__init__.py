"""Artifact blob stores: a local directory (the embedded default) or S3/MinIO, chosen by the settings."""

from __future__ import annotations

import logging
from pathlib import Path

from runledger_server.backends.artifacts.local import LocalBlobStore
from runledger_server.backends.artifacts.minio import S3BlobStore, parse_location
from runledger_server.config import Settings

_LOGGER = logging.getLogger(__name__)

__all__ = ["LocalBlobStore", "S3BlobStore", "from_settings"]


def from_settings(settings: Settings) -> LocalBlobStore | S3BlobStore:
    """`s3://bucket/prefix` selects S3 (the bucket is created if missing); anything else is a directory."""
    location = settings.artifact_location
    if not location.startswith("s3://"):
        return LocalBlobStore(Path(location))
    bucket, prefix = parse_location(location)
    s3 = settings.s3
    store = S3BlobStore(
        endpoint=s3.endpoint or "s3.amazonaws.com",
        bucket=bucket,
        prefix=prefix,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=s3.secure or not s3.endpoint,
        region=s3.region,
        session_token=s3.session_token,
    )
    store.try_ensure_bucket()
    return store
