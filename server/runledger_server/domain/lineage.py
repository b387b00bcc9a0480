"""Lineage as a content address: the five reproducibility facts and their fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields, replace
from typing import Any

from runledger_server.domain.errors import AlreadyExists, InvalidArgument

REQUIRED_FIELDS: tuple[str, ...] = ("data_version", "code_commit", "config", "base_model", "seed")
MAX_CONFIG_DEPTH = 64  # levels of nested objects and arrays in a config; real ones have a handful


@dataclass(frozen=True)
class Lineage:
    """A run's lineage; `None` marks a field not recorded yet. `config` is JSON object text."""

    data_version: str | None = None
    code_commit: str | None = None
    config: str | None = None
    base_model: str | None = None
    seed: int | None = None

    def missing_fields(self) -> list[str]:
        return [name for name in REQUIRED_FIELDS if getattr(self, name) is None]

    def is_complete(self) -> bool:
        return not self.missing_fields()

    def as_dict(self) -> dict[str, Any]:
        """The recorded fields with `config` parsed, as the fingerprint sees them."""
        out: dict[str, Any] = {}
        for name in REQUIRED_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = parse_config(value) if name == "config" else value
        return out

    def fingerprint(self) -> str | None:
        """sha256 hex of the canonical JSON, or None while incomplete."""
        if not self.is_complete():
            return None
        return fingerprint_of(self.as_dict())


def parse_config(text: str, *, incoming: bool = False) -> dict[str, Any]:
    """Parse config JSON text, keeping ints as ints and floats as floats; it must be an object.

    `incoming` text (a request's, before it is stored) must nest at most MAX_CONFIG_DEPTH levels; text already
    stored is read whatever its depth, so configs stored before the limit stay usable.
    """
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError as exc:
        raise InvalidArgument(f"lineage.config is not valid JSON: {exc}", field="lineage.config") from exc
    except RecursionError:  # deeper than the parser goes on this thread's stack
        raise _too_deep() from None
    if incoming and _depth(value) > MAX_CONFIG_DEPTH:
        # One limit, whatever the stack: a depth the parser took on a worker thread could fail when the answer
        # is built on another thread, after the change was stored.
        raise _too_deep()
    if not isinstance(value, dict):
        raise InvalidArgument("lineage.config must be a JSON object", field="lineage.config")
    return value


def _too_deep() -> InvalidArgument:
    return InvalidArgument(
        f"lineage.config is nested too deeply (at most {MAX_CONFIG_DEPTH} levels)", field="lineage.config"
    )


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest (1 for a flat object), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            todo.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return deepest


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: a fingerprint over them could not be reproduced by a strict parser."""
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    """A number too large for a double (1e400) would be read as infinity and written back as `Infinity`."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a double")
    return value


def fingerprint_of(lineage: dict[str, Any]) -> str:
    """The canonical fingerprint of a complete lineage dict (the reference rule, verbatim)."""
    canonical = json.dumps({k: lineage[k] for k in REQUIRED_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate(lineage: Lineage) -> None:
    """Reject malformed fields before anything is stored."""
    for name in ("data_version", "code_commit", "base_model"):
        value = getattr(lineage, name)
        if value is not None and (not value or len(value) > 1024 or "\x00" in value):
            raise InvalidArgument(f"lineage.{name} must be 1-1024 characters without NUL", field=f"lineage.{name}")
    if lineage.config is not None:
        parse_config(lineage.config, incoming=True)


def merge(current: Lineage, update: Lineage) -> Lineage:
    """Apply an update: unset fields are filled in; a field already set keeps its value, as params do (a
    different one is refused), so a lineage is never rewritten, complete or not."""
    validate(update)
    changes: dict[str, Any] = {}
    for f in fields(Lineage):
        new = getattr(update, f.name)
        if new is None:
            continue
        old = getattr(current, f.name)
        if old is not None and _same(f.name, old, new):
            continue  # the same value (a config spelt otherwise): the stored text stays as it was
        if old is not None:
            raise AlreadyExists(
                f"lineage is immutable once set: lineage.{f.name} is already set to a different value",
                reason="LINEAGE_IMMUTABLE",
                field=f"lineage.{f.name}",
            )
        changes[f.name] = new
    return replace(current, **changes)


def drifted_fields(expected: Lineage, claimed: Lineage) -> list[str]:
    """The fields of a claimed reproduction that differ from (or are missing against) the original."""
    out = []
    for name in REQUIRED_FIELDS:
        a, b = getattr(expected, name), getattr(claimed, name)
        if b is None or a is None or not _same(name, a, b):
            out.append(name)
    return out


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "config":
        return _canon(a) == _canon(b)
    return bool(a == b)


def _canon(text: str) -> str:
    return json.dumps(parse_config(text), sort_keys=True, separators=(",", ":"))
