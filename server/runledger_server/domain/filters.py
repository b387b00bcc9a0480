"""The run search language: `params.lr = "2e-5" AND metrics.`train/loss` < 0.5 AND status = "FINISHED"`.

Parsed here into plain clauses; the SQL backend turns clauses into queries. MLflow users will find
the syntax familiar (single or double quotes, backticks for keys with special characters).

`LIKE` is case-sensitive and `ILIKE` ignores the case of ASCII letters, on SQLite and PostgreSQL alike, so
a filter selects the same runs on either. In their patterns `%` matches any characters, `_` one character,
and a backslash makes the next one literal (`\\%`, `\\_`, `\\\\`); inside the quotes a backslash is itself
escaped, so `params.opt LIKE 'a\\\\_b'` matches `a_b` and not `axb`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from runledger_server.domain.errors import InvalidArgument

KINDS = ("params", "tags", "metrics", "lineage")
# A run's lineage, as recorded (`fingerprint` is the sha256 the registry checks); unset fields match nothing.
LINEAGE_KEYS = ("data_version", "code_commit", "config", "base_model", "seed", "fingerprint")
MAX_SEED = 2**63 - 1
TIME_ATTRIBUTES = ("create_time", "start_time", "end_time")  # milliseconds since the epoch in a filter
ATTRIBUTES = ("status", "display_name", "run_id", "experiment", *TIME_ATTRIBUTES)
OPS = ("=", "!=", "<", "<=", ">", ">=", "LIKE", "ILIKE", "IN")
PATTERN_OPS = ("LIKE", "ILIKE")
MAX_IN_VALUES = 1000
# Each clause is a subquery the database plans together with the others: PostgreSQL took 0.14 s for 20 and
# 0.5 s for 50 (28 s for 200), per request, so a filter is a query and not a load on the shared database.
MAX_CLAUSES = 20
MAX_EXPERIMENTS = 1000  # experiments named in one search
# A LIKE pattern costs up to (pattern length x value length) per row on both databases, and a param value may
# hold 1 MiB: 0.09 s per row for 100 characters after a `%`, 0.8 s for 1,000 (SQLite, measured).
MAX_PATTERN_CHARS = 256
# The whole filter, checked before it is read at all: 20 clauses of run ID lists fit (1,000 IDs are ~36,000
# characters), and reading it stays well under a millisecond per kilobyte.
MAX_FILTER_CHARS = 256 * 1024
MAX_ORDER_BY_CHARS = 1024
# Tokens a filter within the other bounds can hold: field, operator, AND, and an IN list's values and commas.
MAX_TOKENS = MAX_CLAUSES * (2 * MAX_IN_VALUES + 6)
MAX_TIME_MS = 9.2e15  # microseconds since the epoch must fit the database's 64-bit integer

_INTEGER = re.compile(r"[-+]?[0-9]{1,19}")
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op><=|>=|!=|=|<|>)
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<num>(?>[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)(?![\w/]))
      | (?P<punct>[(),])
      | (?P<field>(?:params|tags|metrics|lineage)\.(?:`[^`]+`|[\w./:-]+)|[A-Za-z_]\w*)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Clause:
    kind: str  # params | tags | metrics | lineage | attribute
    key: str  # param/tag/metric key, lineage field, or the attribute name
    op: str
    values: tuple[str | float, ...]


@dataclass(frozen=True)
class OrderBy:
    kind: str
    key: str
    descending: bool


def _tokens(text: str, field: str, limit: int) -> list[tuple[str, str]]:
    """The tokens of `text`, in linear time (each pattern matches one way only), refused past `limit` chars
    and past what any valid filter holds, so a huge request costs a refusal and not the server's memory."""
    if len(text) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} characters ({len(text)})", field=field)
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise InvalidArgument(f"{field}: cannot parse near {text[pos : pos + 20]!r}", field=field)
        if len(out) == MAX_TOKENS:
            raise InvalidArgument(
                f"{field}: more terms than {MAX_CLAUSES} clauses of up to {MAX_IN_VALUES} values can hold", field=field
            )
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _field(token: str, field: str) -> tuple[str, str]:
    if "." in token and token.split(".", 1)[0] in KINDS:
        kind, key = token.split(".", 1)
        if key.startswith("`"):
            key = key[1:-1]
        if kind == "lineage" and key not in LINEAGE_KEYS:
            raise InvalidArgument(
                f"{field}: unknown lineage field {key!r}; use one of {', '.join(LINEAGE_KEYS)}", field=field
            )
        return kind, key
    name = token.lower()
    if name not in ATTRIBUTES:
        raise InvalidArgument(
            f"{field}: unknown field {token!r}; use params.<key>, tags.<key>, metrics.<key> or one of "
            f"{', '.join(ATTRIBUTES)}",
            field=field,
        )
    return "attribute", name


def _literal(kind: str, text: str) -> str | float:
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return float(text)


def parse_filter(text: str, field: str = "filter") -> tuple[Clause, ...]:
    if not text or not text.strip():
        return ()
    toks = _tokens(text, field, MAX_FILTER_CHARS)
    clauses: list[Clause] = []
    i = 0

    def need(cond: bool, what: str) -> None:
        if not cond:
            shown = text if len(text) <= 300 else f"{text[:300]}... ({len(text)} characters)"  # fits a status
            raise InvalidArgument(f"{field}: expected {what} in {shown!r}", field=field)

    while True:
        need(i < len(toks) and toks[i][0] == "field", "a field such as params.lr")
        kind, key = _field(toks[i][1], field)
        i += 1
        need(i < len(toks), "an operator")
        tk, tv = toks[i]
        if tk == "field" and tv.upper() in ("LIKE", "ILIKE", "IN"):
            op = tv.upper()
        elif tk == "field" and tv.upper() == "NOT" and i + 1 < len(toks) and toks[i + 1][1].upper() == "IN":
            op = "NOT IN"
            i += 1
        else:
            need(tk == "op", "an operator (= != < <= > >= LIKE ILIKE IN)")
            op = tv
        i += 1
        values: list[str | float] = []
        written: list[str] = []  # each value as written (a seed beyond 2**53 is exact only as text)
        if op in ("IN", "NOT IN"):
            need(i < len(toks) and toks[i][1] == "(", "'('")
            i += 1
            while True:
                need(i < len(toks) and toks[i][0] in ("str", "num"), "a value")
                values.append(_literal(*toks[i]))
                written.append(toks[i][1])
                i += 1
                need(i < len(toks) and toks[i][1] in (",", ")"), "',' or ')'")
                i += 1
                if toks[i - 1][1] == ")":
                    break
        else:
            need(i < len(toks) and toks[i][0] in ("str", "num"), "a quoted string or a number")
            values.append(_literal(*toks[i]))
            written.append(toks[i][1])
            i += 1
        # Bounds that keep a filter a query rather than a load on the database (SQLite refuses long patterns,
        # PostgreSQL more than 65,535 parameters, and neither takes NUL in text).
        need(len(values) <= MAX_IN_VALUES, f"at most {MAX_IN_VALUES} values in IN (...)")
        need(
            all(isinstance(v, str) or _representable(v, w) for v, w in zip(values, written, strict=True)),
            "numbers within the range of a double (1e-400 would read as 0, 1e400 as infinity)",
        )
        need(not any(isinstance(v, str) and "\x00" in v for v in values), "no NUL in a value")
        need("\x00" not in key, "no NUL in a key")
        if op in PATTERN_OPS:
            need(isinstance(values[0], str), f"a quoted pattern after {op}")
            need(len(str(values[0])) <= MAX_PATTERN_CHARS, f"a {op} pattern of at most {MAX_PATTERN_CHARS} characters")
            closed = _escapes_closed(str(values[0]))
            need(closed, f"a character after the last backslash of the {op} pattern (it escapes the next one)")
        if kind == "metrics":
            need(op not in PATTERN_OPS, "a numeric comparison for metrics")
            need(all(isinstance(v, float) for v in values), "a number for metrics")
        elif kind == "lineage" and key == "seed":
            need(op not in PATTERN_OPS, "a numeric comparison for lineage.seed")
            seeds = [int(w) if _INTEGER.fullmatch(w) else None for w in written]
            need(all(v is not None and -MAX_SEED - 1 <= v <= MAX_SEED for v in seeds), "an integer for lineage.seed")
            values = [v for v in seeds if v is not None]
        elif kind in ("params", "tags", "lineage"):
            # Stored as the text that was logged ("2e-5", "0.10"): a number here would be compared as some other
            # text (2e-5 -> "2e-05", and "128" < "64"), silently matching the wrong runs, so it must be quoted.
            need(all(isinstance(v, str) for v in values), f"a quoted value for {kind}.{key} (it is text)")
        else:
            need(key not in TIME_ATTRIBUTES or op not in PATTERN_OPS, f"a numeric comparison for {key}")
            if key in TIME_ATTRIBUTES:
                need(
                    all(isinstance(v, float) and abs(v) <= MAX_TIME_MS for v in values),
                    f"milliseconds since the epoch for {key} (a number within +-{MAX_TIME_MS:.0f})",
                )
                values = [_num_text(float(v)) for v in values]
            else:  # text (a run named "2e-5", ID "0123"): a number would be some other text, as for params
                need(all(isinstance(v, str) for v in values), f"a quoted value for {key} (it is text)")
        if kind == "attribute" and key == "status" and op not in PATTERN_OPS:  # a pattern matches the stored names
            values = [_status(str(v), field) for v in values]
        clauses.append(Clause(kind, key, op, tuple(values)))
        need(len(clauses) <= MAX_CLAUSES, f"at most {MAX_CLAUSES} clauses joined by AND")
        if i == len(toks):
            return tuple(clauses)
        need(toks[i][0] == "field" and toks[i][1].upper() == "AND", "AND between clauses")
        i += 1


def _representable(value: float, written: str) -> bool:
    """Whether a number in a filter means what it says as a double: not rounded to infinity, nor to zero."""
    mantissa = re.split("[eE]", written)[0]
    return not math.isinf(value) and (value != 0 or not re.search("[1-9]", mantissa))


def _escapes_closed(pattern: str) -> bool:
    """False when the pattern ends in a backslash that escapes nothing: PostgreSQL refuses such a pattern and
    SQLite matches nothing with it, so it is refused before either sees it."""
    trailing = len(pattern) - len(pattern.rstrip("\\"))
    return trailing % 2 == 0


def _num_text(v: float) -> str:
    return str(int(v)) if v.is_integer() else repr(v)


def _status(value: str, field: str) -> str:
    v = value.upper().removeprefix("RUN_STATUS_")
    if v not in ("RUNNING", "FINISHED", "FAILED", "KILLED"):
        raise InvalidArgument(f"{field}: unknown status {value!r}", field=field)
    return v


def parse_order_by(text: str, field: str = "order_by") -> OrderBy:
    if not text or not text.strip():
        return OrderBy("attribute", "create_time", False)
    if len(text) > MAX_ORDER_BY_CHARS:
        raise InvalidArgument(f"{field} is longer than {MAX_ORDER_BY_CHARS} characters ({len(text)})", field=field)
    parts = text.strip().rsplit(None, 1)
    descending = False
    if len(parts) == 2 and parts[1].upper() in ("ASC", "DESC"):
        descending = parts[1].upper() == "DESC"
        text = parts[0]
    toks = _tokens(text, field, MAX_ORDER_BY_CHARS)
    if len(toks) != 1 or toks[0][0] != "field":
        raise InvalidArgument(f"{field}: expected one field and an optional ASC/DESC, got {text[:300]!r}", field=field)
    kind, key = _field(toks[0][1], field)
    if "\x00" in key:  # PostgreSQL takes no NUL in text; SQLite would sort by a key nobody can log
        raise InvalidArgument(f"{field}: no NUL in a key", field=field)
    return OrderBy(kind, key, descending)
