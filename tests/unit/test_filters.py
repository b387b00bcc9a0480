"""The run search language: what parses into which clauses, and what is refused naming the field."""

from __future__ import annotations

import base64
import time

import pytest

from runledger_server.domain import paging
from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.filters import (
    MAX_FILTER_CHARS,
    MAX_IN_VALUES,
    MAX_ORDER_BY_CHARS,
    MAX_PATTERN_CHARS,
    Clause,
    OrderBy,
    parse_filter,
    parse_order_by,
)


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


def test_a_long_run_of_digits_is_read_in_linear_time() -> None:
    """A number pattern that could split a run of digits many ways took O(n^2) steps (16,000 digits: 4 s, with
    the interpreter lock held): this input would take minutes. Bounded by a wide margin, not measured."""
    text = "metrics.loss < " + "1" * 200_000 + "x"
    start = time.perf_counter()
    with pytest.raises(InvalidArgument) as info:
        parse_filter(text)
    assert time.perf_counter() - start < 2.0
    assert info.value.field == "filter"
    assert parse_filter("metrics.loss < 0." + "1" * 200_000)[0].values == (float("0." + "1" * 200_000),)


def test_a_filter_beyond_its_length_is_refused_before_it_is_read() -> None:
    text = "params.a IN (" + ",".join(["'x'"] * (MAX_FILTER_CHARS // 4 + 1)) + ")"
    with pytest.raises(InvalidArgument) as info:
        parse_filter(text)
    assert info.value.field == "filter" and f"longer than {MAX_FILTER_CHARS} characters" in str(info.value)


def test_a_filter_with_more_terms_than_any_valid_one_is_refused_while_it_is_read() -> None:
    text = "metrics.m IN (" + ",".join(["1"] * 100_000) + ")"  # within the length: 200,000 tokens
    assert len(text) <= MAX_FILTER_CHARS
    with pytest.raises(InvalidArgument) as info:
        parse_filter(text)
    assert info.value.field == "filter" and "more terms than" in str(info.value)
    widest = " AND ".join(f"params.p{i} IN (" + ",".join(["'v'"] * MAX_IN_VALUES) + ")" for i in range(5))
    assert len(parse_filter(widest)) == 5  # the bound leaves room for every valid filter


def test_like_patterns_are_bounded_because_each_row_costs_pattern_times_value() -> None:
    assert parse_filter(f"params.t LIKE '%{'a' * (MAX_PATTERN_CHARS - 1)}'")[0].op == "LIKE"
    with pytest.raises(InvalidArgument) as info:
        parse_filter(f"params.t LIKE '%{'a' * MAX_PATTERN_CHARS}'")
    assert info.value.field == "filter" and f"at most {MAX_PATTERN_CHARS} characters" in str(info.value)


def test_an_order_by_beyond_its_length_is_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_order_by("metrics." + "k" * MAX_ORDER_BY_CHARS)
    assert info.value.field == "order_by" and "longer than" in str(info.value)


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


def test_lineage_seeds_take_the_whole_int64_range_exactly() -> None:
    low, high = -(2**63), 2**63 - 1
    assert parse_filter(f"lineage.seed IN ({low}, {high}, 9007199254740993)")[0].values == (low, high, 2**53 + 1)
    with pytest.raises(InvalidArgument):
        parse_filter(f"lineage.seed = {high + 1}")


@pytest.mark.parametrize("number", ["1e-400", "-2.5e-999", "1e400", "-1e309"])
def test_numbers_a_double_cannot_hold_are_refused_not_rounded_to_zero_or_infinity(number: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filter(f"metrics.m IN (1, {number})")
    assert info.value.field == "filter" and "range of a double" in str(info.value)


def test_numbers_at_the_edges_of_a_double_and_zero_are_taken() -> None:
    values = parse_filter("metrics.m IN (5e-324, 1.7976931348623157e308, 0.0e5, -0)")[0].values
    assert values == (5e-324, 1.7976931348623157e308, 0.0, 0.0)


@pytest.mark.parametrize("text", ["metrics.m = \u0661e-400", "metrics.m = \u0661", "lineage.seed = \u0661"])
def test_digits_are_ascii_digits(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:  # an Arabic-Indic one slipped past the range check as 0.0
        parse_filter(text)
    assert info.value.field == "filter"
