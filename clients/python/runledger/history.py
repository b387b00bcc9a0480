"""Metric history as numpy arrays, assembled from GetMetricHistory's messages without per-point Python work."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from runledger.wire import SeriesArrays

_LOGGER = logging.getLogger(__name__)


class MetricHistory(NamedTuple):
    """All points of one key in step order: `steps, values, timestamps_ms = client.metric_history(...)`."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64; NaN and infinities exactly as logged
    timestamps_ms: np.ndarray  # int64


def from_chunks(chunks: Iterable[SeriesArrays]) -> MetricHistory:
    """Join decoded GetMetricHistory messages: one copy per array, into fresh writable arrays."""
    parts = [c for c in chunks if c.steps.shape[0]]
    return MetricHistory(
        np.concatenate([c.steps for c in parts]) if parts else np.empty(0, np.int64),
        np.concatenate([c.values for c in parts]) if parts else np.empty(0, np.float64),
        np.concatenate([c.timestamps_ms for c in parts]) if parts else np.empty(0, np.int64),
    )
