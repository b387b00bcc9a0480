"""Resource names: versions by number or alias, with or without the `models/` prefix, and clear refusals."""

from __future__ import annotations

import pytest

from runledger_server.domain import names
from runledger_server.domain.errors import InvalidArgument


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("models/qwen/versions/3", ("qwen", 3, None)),
        ("qwen/versions/3", ("qwen", 3, None)),  # bare, as every model field takes a bare ID
        ("models/qwen@production", ("qwen", None, "production")),
        ("qwen@production", ("qwen", None, "production")),
        (f"qwen/versions/{(1 << 63) - 1}", ("qwen", (1 << 63) - 1, None)),
        ("qwen/versions/0000000000000000000007", ("qwen", 7, None)),
    ],
)
def test_version_names_by_number_or_alias(name: str, expected: tuple[str, int | None, str | None]) -> None:
    assert names.version_ref(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "models/qwen",
        "models/qwen/versions/0",
        "models/qwen/versions/x",
        "a@b@c",
        f"models/qwen/versions/{1 << 63}",
        "models/qwen/versions/" + "1" * 4301,  # beyond what int() converts: its own ValueError
        "qwen/versions/" + "9" * 20,
    ],
)
def test_bad_version_names_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        names.version_ref(name)
    assert info.value.field == "name"


def test_a_model_field_given_an_alias_reference_says_where_the_alias_goes() -> None:
    assert names.model_id("models/qwen") == names.model_id("qwen") == "qwen"
    with pytest.raises(InvalidArgument) as info:
        names.model_id("models/qwen@production")
    assert info.value.field == "model" and "alias in its own field" in info.value.message
