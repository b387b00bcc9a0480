"""runledger's Python client: `Client` connects, `Run` logs metrics in the background, errors are typed."""

from __future__ import annotations

import logging

from runledger._retry import RetryPolicy
from runledger.client import Client
from runledger.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LocalFileError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RunledgerError,
    Unauthenticated,
    Unavailable,
)
from runledger.history import MetricHistory
from runledger.registry import AliasWatch, PromotionRefused, Registry, StaleRevision
from runledger.run import Run

__version__ = "0.1.0"

_LOGGER = logging.getLogger(__name__)
_LOGGER.addHandler(logging.NullHandler())

__all__ = [
    "Aborted",
    "AliasWatch",
    "AlreadyExists",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "LocalFileError",
    "MetricHistory",
    "NotFound",
    "PermissionDenied",
    "PromotionRefused",
    "Registry",
    "ResourceExhausted",
    "RetryPolicy",
    "Run",
    "RunledgerError",
    "StaleRevision",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]
