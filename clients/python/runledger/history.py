"""Metric history as numpy arrays, assembled from GetMetricHistory's packed chunks without per-point Python work."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from runledger.v1 import tracking_pb2

_LOGGER = logging.getLogger(__name__)


class MetricHistory(NamedTuple):
    """All points of one key in step order: `steps, values, timestamps_ms = client.metric_history(...)`."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64; NaN and infinities exactly as logged
    timestamps_ms: np.ndarray  # int64


def from_chunks(chunks: Iterable[tracking_pb2.MetricSeries]) -> MetricHistory:
    steps: list[np.ndarray] = []
    values: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    for chunk in chunks:
        if not chunk.steps:
            continue
        # numpy reads protobuf's packed repeated containers directly: no Python object per point.
        steps.append(np.array(chunk.steps, dtype=np.int64))
        values.append(np.array(chunk.values, dtype=np.float64))
        stamps.append(np.array(chunk.timestamps_ms, dtype=np.int64))
    if not steps:
        empty_i = np.empty(0, dtype=np.int64)
        return MetricHistory(empty_i, np.empty(0, dtype=np.float64), empty_i.copy())
    if len(steps) == 1:
        return MetricHistory(steps[0], values[0], stamps[0])
    return MetricHistory(np.concatenate(steps), np.concatenate(values), np.concatenate(stamps))
