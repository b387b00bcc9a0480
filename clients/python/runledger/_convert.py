"""Python values to request messages: lineage dicts, statuses, directions, param and tag maps."""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import Message

from runledger import errors
from runledger.v1 import common_pb2, tracking_pb2

_LOGGER = logging.getLogger(__name__)

LINEAGE_FIELDS = ("data_version", "code_commit", "config", "base_model", "seed")

M = TypeVar("M", bound=Message)


def _invalid(message: str, field: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, reason="INVALID_ARGUMENT", metadata={"field": field})


def request(cls: type[M], **fields: Any) -> M:
    """Build a request message; a value protobuf refuses (an int beyond the field's range, a wrong type) is
    InvalidArgument naming its field, instead of protobuf's bare ValueError or TypeError."""
    try:
        return cls(**fields)
    except (TypeError, ValueError):
        for name, value in fields.items():
            try:
                cls(**{name: value})
            except (TypeError, ValueError) as exc:
                shown = repr(value)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                raise _invalid(f"{name} {shown} is not valid: {exc}", name) from None
        raise


def mapping(value: Any, field: str) -> Mapping[Any, Any]:
    """`value` when it is a mapping (a dict, usually), else InvalidArgument naming the field: a list of pairs or a
    "k=v" string would otherwise fail deep inside with a bare TypeError or AttributeError."""
    if type(value) is dict or isinstance(value, Mapping):
        return value
    raise _invalid(f"{field} must be a mapping (a dict of name to value), got {type(value).__name__}", field)


def as_float(value: Any) -> float:
    """`float(value)` for numbers (numpy scalars, 0-d arrays, tensors, Decimal), but never text.

    `float("1.5")` parses, so a string read from a config or a CSV column would be stored as a number without
    anyone noticing; MLflow refuses such values too."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"a number is required, not {type(value).__name__} {value[:40]!r}")
    if isinstance(value, np.ndarray):  # a 0-d array holding text (numpy's scalars of text are str/bytes)
        if value.dtype.kind in "US":
            raise TypeError(f"a number is required, not an array of {value.dtype}")
        if value.dtype.kind == "O":
            return as_float(value.item())  # what it holds, checked the same way
    return float(value)


def number(value: Any, field: str) -> float:
    """A number (see `as_float`), else InvalidArgument naming the field."""
    try:
        return as_float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _invalid(f"{field} must be a number, got {type(value).__name__}: {exc}", field) from None


def lineage_to_proto(lineage: Mapping[str, Any]) -> common_pb2.Lineage:
    """`{"data_version", "code_commit", "config": dict, "base_model", "seed": int}`; absent or None fields stay unset.

    `config` goes as JSON text (a dict is serialised with json.dumps; a str is sent as is) so that the server
    parses it with integers and floats intact; the server alone computes the fingerprint.
    """
    unknown = sorted(set(lineage) - set(LINEAGE_FIELDS))
    if unknown:
        raise _invalid(f"unknown lineage fields {unknown}; expected some of {list(LINEAGE_FIELDS)}", "lineage")
    msg = common_pb2.Lineage()
    for name in ("data_version", "code_commit", "base_model"):
        value = lineage.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise _invalid(f"lineage.{name} must be a string, got {type(value).__name__}", f"lineage.{name}")
            setattr(msg, name, value)
    config = lineage.get("config")
    if config is not None:
        if isinstance(config, str):
            msg.config = config
        elif isinstance(config, Mapping):
            try:
                msg.config = json.dumps(dict(config), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise _invalid(f"lineage.config is not JSON-serialisable: {exc}", "lineage.config") from None
        else:
            raise _invalid("lineage.config must be a dict (or JSON object text)", "lineage.config")
    seed = lineage.get("seed")
    if seed is not None:
        if isinstance(seed, bool):
            raise _invalid("lineage.seed must be an integer, not a bool", "lineage.seed")
        try:
            msg.seed = operator.index(seed)
        except (TypeError, ValueError) as exc:
            raise _invalid(f"lineage.seed must be an integer: {exc}", "lineage.seed") from None
    return msg


def run_status(status: str | int) -> tracking_pb2.RunStatus.ValueType:
    """ "FINISHED", "run_status_finished" or the enum value."""
    if isinstance(status, int):
        if isinstance(status, bool) or status not in tracking_pb2.RunStatus.values():
            raise _invalid(f"unknown run status {status!r}", "status")
        return tracking_pb2.RunStatus.ValueType(status)
    name = status.strip().upper()
    if not name.startswith("RUN_STATUS_"):
        name = "RUN_STATUS_" + name
    try:
        return tracking_pb2.RunStatus.Value(name)
    except ValueError:
        raise _invalid(f"unknown run status {status!r}", "status") from None


def direction(value: str | int) -> common_pb2.Direction.ValueType:
    """ "MAXIMIZE"/"max", "MINIMIZE"/"min", "DIRECTION_MAXIMIZE" or the enum value."""
    if isinstance(value, int):
        return common_pb2.Direction.ValueType(value)
    name = value.strip().upper().removeprefix("DIRECTION_")
    name = {"MAX": "MAXIMIZE", "MIN": "MINIMIZE"}.get(name, name)
    try:
        return common_pb2.Direction.Value("DIRECTION_" + name)
    except ValueError:
        raise _invalid(f"unknown direction {value!r}; use MAXIMIZE or MINIMIZE", "direction") from None


def string_map(values: Mapping[str, Any] | None, field: str) -> dict[str, str]:
    """Params and tags are strings on the wire; numbers are sent as their str() (2e-05, 16, True)."""
    if values is None:
        return {}
    values = mapping(values, field)
    out: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not sendable(key):
            raise _invalid(f"{field} keys must be strings of valid Unicode, got {key!r}", field)
        text = value if isinstance(value, str) else str(value)
        if not sendable(text):
            raise _invalid(f"{field}[{key}] {text[:80]!r} is not valid Unicode (a lone surrogate)", f"{field}[{key}]")
        out[key] = text
    return out


def number_map(values: Mapping[str, Any], field: str) -> dict[str, float]:
    """Scores by name: string names, number values, else InvalidArgument naming the entry."""
    out: dict[str, float] = {}
    for key, value in mapping(values, field).items():
        if not isinstance(key, str) or not sendable(key):
            raise _invalid(f"{field} names must be strings of valid Unicode, got {key!r}", field)
        out[key] = number(value, f"{field}[{key}]")
    return out


def sendable(text: str) -> bool:
    """Protobuf strings are UTF-8: a lone surrogate (half an emoji from a JSON escape) cannot be sent."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def same_json(a: str, b: str) -> bool:
    """Whether two JSON texts hold the same value as the lineage fingerprint sees it (the server may store a
    config re-serialised): compared in canonical form, so 1 and 1.0, or true and 1, differ as they do there."""
    try:
        return _canonical(json.loads(a)) == _canonical(json.loads(b))
    except (ValueError, RecursionError):
        return a == b


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
