"""Conversions between protobuf messages and domain entities shared by the servicers."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from runledger import wire
from runledger.v1 import common_pb2, tracking_pb2
from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.metrics import Series
from runledger_server.domain.sweeps import Direction
from runledger_server.store import entities


def timestamp(us: int | None) -> Timestamp | None:
    if us is None:
        return None
    ts = Timestamp()
    ts.FromMicroseconds(us)
    return ts


def micros(ts: Timestamp, present: bool, field: str) -> int | None:
    if not present:
        return None
    try:
        return ts.ToMicroseconds()
    except ValueError as exc:  # seconds outside years 1-9999, or nanos outside [0, 1e9)
        raise InvalidArgument(f"{field} is not a valid timestamp: {exc}", field=field) from None


def lineage_from_proto(msg: common_pb2.Lineage) -> Lineage:
    return Lineage(
        data_version=msg.data_version if msg.HasField("data_version") else None,
        code_commit=msg.code_commit if msg.HasField("code_commit") else None,
        config=msg.config if msg.HasField("config") else None,
        base_model=msg.base_model if msg.HasField("base_model") else None,
        seed=msg.seed if msg.HasField("seed") else None,
    )


def lineage_to_proto(lineage: Lineage) -> common_pb2.Lineage:
    msg = common_pb2.Lineage()
    for name in ("data_version", "code_commit", "config", "base_model", "seed"):
        value = getattr(lineage, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def direction_from_proto(value: int, field: str = "direction") -> Direction | None:
    if value == common_pb2.DIRECTION_MAXIMIZE:
        return Direction.MAXIMIZE
    if value == common_pb2.DIRECTION_MINIMIZE:
        return Direction.MINIMIZE
    if value == common_pb2.DIRECTION_UNSPECIFIED:
        return None
    raise InvalidArgument(f"{field} has an unknown value {value}", field=field)


def direction_to_proto(direction: Direction) -> common_pb2.Direction.ValueType:
    return common_pb2.DIRECTION_MAXIMIZE if direction is Direction.MAXIMIZE else common_pb2.DIRECTION_MINIMIZE


def series_from_wire(s: wire.SeriesArrays) -> Series:
    """A series decoded by `wire.decode_metrics_batch` (read-only views of the request bytes)."""
    return Series(key=s.key, steps=s.steps, values=s.values, timestamps_ms=s.timestamps_ms)


def experiment_to_proto(e: entities.Experiment) -> tracking_pb2.Experiment:
    return tracking_pb2.Experiment(
        name=f"experiments/{e.experiment_id}",
        experiment_id=e.experiment_id,
        display_name=e.display_name,
        description=e.description,
        tags=e.tags,
        create_time=timestamp(e.create_time_us),
    )


def run_to_proto(r: entities.Run) -> tracking_pb2.Run:
    return tracking_pb2.Run(
        name=f"runs/{r.run_id}",
        run_id=r.run_id,
        experiment=f"experiments/{r.experiment_id}",
        display_name=r.display_name,
        status=tracking_pb2.RunStatus.Value(f"RUN_STATUS_{r.status}"),
        params=r.params,
        tags=r.tags,
        lineage=lineage_to_proto(r.lineage),
        lineage_fingerprint=r.lineage_fingerprint or "",
        missing_lineage_fields=r.lineage.missing_fields(),
        latest_metrics={
            k: tracking_pb2.LatestMetric(step=m.step, value=m.value, timestamp_ms=m.timestamp_ms)
            for k, m in r.latest_metrics.items()
        },
        create_time=timestamp(r.create_time_us),
        update_time=timestamp(r.update_time_us),
        end_time=timestamp(r.end_time_us),
        start_time=timestamp(r.start_time_us),
    )
