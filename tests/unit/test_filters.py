"""The run search language: what parses into which clauses, and what is refused naming the field."""

from __future__ import annotations

import base64

import pytest

from runledger_server.domain import paging
from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.filters import Clause, OrderBy, parse_filter, parse_order_by


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ('params.lr = "2e-5"', (Clause("params", "lr", "=", ("2e-5",)),)),
        ("metrics.`train/loss` < 0.5", (Clause("metrics", "train/loss", "<", (0.5,)),)),
        ("metrics.rl/kl >= -1e-3", (Clause("metrics", "rl/kl", ">=", (-1e-3,)),)),
        ("tags.team LIKE 'r%'", (Clause("tags", "team", "LIKE", ("r%",)),)),
        ("params.optimizer ILIKE 'Adam%'", (Clause("params", "optimizer", "ILIKE", ("Adam%",)),)),
        ('display_name ilike "R_"', (Clause("attribute", "display_name", "ILIKE", ("R_",)),)),
        ("status ILIKE 'finished'", (Clause("attribute", "status", "ILIKE", ("finished",)),)),
        ("status LIKE 'RUN%'", (Clause("attribute", "status", "LIKE", ("RUN%",)),)),  # a pattern stays one
        # The quoted string's escapes are undone; the pattern's own (`\_`, `\%`, `\\`) are left for LIKE.
        (r"params.opt LIKE 'a\\_b\\\\'", (Clause("params", "opt", "LIKE", ("a\\_b\\\\",)),)),
        ("status = 'run_status_finished'", (Clause("attribute", "status", "=", ("FINISHED",)),)),
        ("status NOT IN ('FAILED', 'KILLED')", (Clause("attribute", "status", "NOT IN", ("FAILED", "KILLED")),)),
        (
            "params.a = 'x' and tags.b != \"y\" AND metrics.c > 1",
            (
                Clause("params", "a", "=", ("x",)),
                Clause("tags", "b", "!=", ("y",)),
                Clause("metrics", "c", ">", (1.0,)),
            ),
        ),
        ("params.quote = 'it\\'s'", (Clause("params", "quote", "=", ("it's",)),)),
    ],
)
def test_parse_filter(text: str, expected: tuple[Clause, ...]) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "params.lr",
        "params.lr = ",
        "unknown = 1",
        "metrics.loss LIKE '1%'",
        "metrics.loss ILIKE '1%'",
        "metrics.loss ILIKE 1",
        "params.opt ILIKE 1",
        r"params.opt LIKE 'adam\\'",  # the pattern ends in a backslash that escapes nothing
        r"params.opt ILIKE 'a\\\\\\'",
        "create_time LIKE '1700000000000'",
        "create_time ILIKE '17%'",
        "metrics.loss = 'abc'",
        "status = 'DONE'",
        "params.a = 'x' OR params.b = 'y'",
        "params.a IN ('x'",
        "params.a = 'unterminated",
        "params.lr = 2e-5",  # params and tags are text: "2e-05" would never equal the logged "2e-5"
        "params.batch < 64",  # and "128" < "64" as text
        "tags.epochs IN (1, 2)",
        "display_name = 2e-5",  # attributes held as text, too: a run named "2e-5" would not match
        "run_id = 0123",  # nor run "0123" (the number reads as 123)
        "run_id IN (0123, 1000)",
        "experiment = 5",
    ],
)
def test_parse_filter_refusals_name_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filter(text)
    assert info.value.field == "filter"


@pytest.mark.parametrize("op", ["LIKE", "ILIKE", "like", "ilike"])
def test_patterns_are_refused_on_metrics_with_the_reason(op: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filter(f"metrics.`train/loss` {op} '0.5%'")
    assert info.value.field == "filter"
    assert "a numeric comparison for metrics" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", OrderBy("attribute", "create_time", False)),
        ("metrics.eval/mmlu DESC", OrderBy("metrics", "eval/mmlu", True)),
        ("params.lr asc", OrderBy("params", "lr", False)),
        ("display_name", OrderBy("attribute", "display_name", False)),
    ],
)
def test_parse_order_by(text: str, expected: OrderBy) -> None:
    assert parse_order_by(text) == expected


@pytest.mark.parametrize("text", ["a b c", "nope DESC", "params.lr = 1", "params.`a\x00b`", "metrics.`\x00` DESC"])
def test_parse_order_by_refusals(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_order_by(text)
    assert info.value.field == "order_by"


def test_a_token_nested_beyond_the_json_parsers_depth_is_malformed() -> None:
    token = base64.urlsafe_b64encode(b"[" * 200_000).decode()
    with pytest.raises(InvalidArgument) as info:
        paging.decode(token, {"q": 1})
    assert info.value.field == "page_token"


def test_a_token_with_an_empty_cursor_is_malformed_not_the_first_page() -> None:
    token = paging.encode([], {"q": 1})
    with pytest.raises(InvalidArgument) as info:
        paging.decode(token, {"q": 1})
    assert info.value.field == "page_token"
    assert paging.decode(paging.encode([3], {"q": 1}), {"q": 1}) == [3]


@pytest.mark.parametrize(
    "cursor",
    [
        [],
        [1],
        ["x", "y"],
        [1.5, "r"],
        [None, "r"],
        [1, 2],
        [{"a": 1}, "r"],
        [True, "r"],  # JSON true is an int to Python, and a different statement to SQLAlchemy
        [1 << 63, "r"],  # beyond int64: the driver's OverflowError
        [-(1 << 63) - 1, "r"],
        [7, "r\x00"],  # NUL: PostgreSQL refuses it in text
        [7, "r\ud800"],  # a lone surrogate (JSON's "\\ud800"): no UTF-8 text holds it, the drivers refuse it
    ],
)
def test_a_page_cursor_of_another_shape_is_a_malformed_token(cursor: list[object]) -> None:
    with pytest.raises(InvalidArgument) as info:
        paging.fields(cursor, int, str)
    assert info.value.field == "page_token"
    assert paging.fields([7, "r"], int, str) == [7, "r"]
