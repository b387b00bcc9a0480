"""Resource names and IDs (AIP-122): parsing and validation, so every service names fields the same way."""

from __future__ import annotations

import re

from runledger_server.domain.errors import InvalidArgument, ResourceExhausted

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_EXPERIMENT = re.compile(r"^experiments/([a-z0-9][a-z0-9-]{0,63})$")
_VERSION = re.compile(r"^models/([^/@]+)/versions/([0-9]+)$")
_ALIAS_REF = re.compile(r"^models/([^/@]+)@([^/@]+)$")
_GATE = re.compile(r"^models/([^/@]+)/gates/([^/@]+)$")

MAX_KEY = 250
MAX_VALUE = 1 << 20  # 1 MiB per param/tag value: refused above, never truncated
# Params and tags of one run together (keys and values, in characters): a run must stay readable, and GetRun's
# answer, or a page of SearchRuns, fit gRPC's 64 MiB message limit.
MAX_RUN_METADATA = 4 << 20


def slug(value: str, field: str) -> str:
    """A model, gate or alias ID: letters, digits, `.`, `_`, `-`, 1-128 chars, alphanumeric first."""
    if not _SLUG.fullmatch(value or ""):
        raise InvalidArgument(
            f"{field} {value!r} is not a valid ID: use letters, digits, '.', '_', '-' "
            "(1-128 characters, starting with a letter or digit)",
            field=field,
        )
    return value


def run_id(value: str, field: str = "run_id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    if not _RUN_ID.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} is not a valid run ID (lowercase letters, digits, '-', 1-64 characters)",
            field=field,
        )
    return value


def experiment_id(name: str, field: str = "experiment") -> str:
    """`experiments/{id}` -> id."""
    if not name:
        raise InvalidArgument(f"{field} is required (format: experiments/{{experiment}})", field=field)
    m = _EXPERIMENT.fullmatch(name)
    if not m:
        raise InvalidArgument(f"{field} {name!r} is not of the form experiments/{{experiment}}", field=field)
    return m.group(1)


def model_id(name: str, field: str = "model") -> str:
    """`models/{model}` (or the bare ID) -> model ID."""
    if not name:
        raise InvalidArgument(f"{field} is required (format: models/{{model}})", field=field)
    bare = name[len("models/") :] if name.startswith("models/") else name
    if "@" in bare:  # `models/{m}@{alias}` names a version; here only the model goes
        raise InvalidArgument(
            f"{field} {name[:200]!r} names an alias: give the model here and the alias in its own field "
            "(the models/{model}@{alias} form is taken where a version name is)",
            field=field,
        )
    return slug(bare, field)


def version_ref(name: str, field: str = "name") -> tuple[str, int | None, str | None]:
    """`models/{m}/versions/{n}` or `models/{m}@{alias}`, with or without the `models/` prefix (as model
    fields take a bare ID) -> (model, version, alias)."""
    if not name:
        raise InvalidArgument(f"{field} is required", field=field)
    candidate = name if name.startswith("models/") else f"models/{name}"
    m = _VERSION.fullmatch(candidate)
    if m:
        digits = m.group(2).lstrip("0") or "0"  # int() refuses over 4,300 digits with an error of its own
        number = int(digits) if len(digits) <= 19 else 1 << 63
        if not 0 < number < 1 << 63:
            raise InvalidArgument(f"{field} {name!r}: a version number is from 1 to 2^63-1", field=field)
        return slug(m.group(1), field), number, None
    m = _ALIAS_REF.fullmatch(candidate)
    if m:
        return slug(m.group(1), field), None, slug(m.group(2), field)
    raise InvalidArgument(
        f"{field} {name!r} is not of the form models/{{model}}/versions/{{version}} or models/{{model}}@{{alias}}",
        field=field,
    )


def gate_ref(name: str, field: str = "name") -> tuple[str, str]:
    m = _GATE.fullmatch(name or "")
    if not m:
        raise InvalidArgument(f"{field} {name!r} is not of the form models/{{model}}/gates/{{gate}}", field=field)
    return slug(m.group(1), field), slug(m.group(2), field)


def key(value: str, field: str) -> str:
    """A param, tag or metric key: 1-250 characters, no NUL, no surrounding whitespace."""
    if not value or len(value) > MAX_KEY or "\x00" in value or value.strip() != value:
        raise InvalidArgument(
            f"{field} {value!r} is not a valid key (1-{MAX_KEY} characters, no NUL, no surrounding spaces)",
            field=field,
        )
    return value


def text_value(value: str, field: str) -> str:
    if len(value) > MAX_VALUE or "\x00" in value:
        raise InvalidArgument(f"{field} is longer than {MAX_VALUE} characters or contains NUL", field=field)
    return value


def metadata_size(values: dict[str, str]) -> int:
    """Characters of a params or tags map, keys and values, as MAX_RUN_METADATA counts them."""
    return sum(len(k) + len(v) for k, v in values.items())


def check_run_metadata(total: int, field: str) -> None:
    """Refuse params and tags that would take a run beyond MAX_RUN_METADATA characters together."""
    if total > MAX_RUN_METADATA:
        raise ResourceExhausted(
            f"{field} would take the run's params and tags to {total:,} characters; together they may hold at "
            f"most {MAX_RUN_METADATA:,} (store large values as artifacts)",
            reason="RUN_METADATA_TOO_LARGE",
            field=field,
            metadata={"characters": str(total), "limit": str(MAX_RUN_METADATA)},
        )
