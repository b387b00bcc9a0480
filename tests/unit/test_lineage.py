"""Lineage fingerprints agree with the reference rule; drift and missing fields are named."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from typing import Any

import pytest

from runledger_server.domain.errors import AlreadyExists, InvalidArgument
from runledger_server.domain.lineage import (
    MAX_CONFIG_DEPTH,
    REQUIRED_FIELDS,
    Lineage,
    drifted_fields,
    fingerprint_of,
    merge,
    validate,
)

EXAMPLE_FINGERPRINT = "b06a681fb46bb8d9aceed5caf216654a5dcb3ccc55f3c5965abbaae565ab830d"
BASE: dict[str, Any] = {
    "data_version": "sft-mix-v3",
    "code_commit": "a1b2c3d",
    "config": {"lr": 2e-5, "lora_r": 16},
    "base_model": "Qwen/Qwen3-8B",
    "seed": 0,
}


def reference_fingerprint(lineage: dict[str, Any]) -> str:
    """The reference rule, copied."""
    missing = [k for k in REQUIRED_FIELDS if k not in lineage]
    if missing:
        raise ValueError(f"broken lineage, missing: {missing}")
    canonical = json.dumps({k: lineage[k] for k in REQUIRED_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def as_lineage(d: dict[str, Any], config_text: str | None = None) -> Lineage:
    return Lineage(
        data_version=d.get("data_version"),
        code_commit=d.get("code_commit"),
        config=config_text if config_text is not None else (json.dumps(d["config"]) if "config" in d else None),
        base_model=d.get("base_model"),
        seed=d.get("seed"),
    )


def test_example_fingerprint() -> None:
    assert reference_fingerprint(BASE) == EXAMPLE_FINGERPRINT
    assert fingerprint_of(BASE) == EXAMPLE_FINGERPRINT
    assert as_lineage(BASE).fingerprint() == EXAMPLE_FINGERPRINT


def test_config_text_keeps_ints_and_floats() -> None:
    # 16 must stay an integer and 2e-5 a float whatever the spelling of the JSON text.
    for text in ('{"lr": 2e-5, "lora_r": 16}', '{"lora_r":16,"lr":0.00002}', '{ "lr" : 2E-5 , "lora_r" : 16 }'):
        assert as_lineage(BASE, config_text=text).fingerprint() == EXAMPLE_FINGERPRINT
    assert as_lineage(BASE, config_text='{"lr": 2e-5, "lora_r": 16.0}').fingerprint() != EXAMPLE_FINGERPRINT


def test_reordering_keeps_the_fingerprint() -> None:
    reordered = {
        "seed": 0,
        "base_model": "Qwen/Qwen3-8B",
        "config": {"lora_r": 16, "lr": 2e-5},
        "code_commit": "a1b2c3d",
        "data_version": "sft-mix-v3",
    }
    assert reference_fingerprint(reordered) == EXAMPLE_FINGERPRINT
    assert as_lineage(reordered).fingerprint() == EXAMPLE_FINGERPRINT


DRIFTS = [
    ("seed", 1),
    ("data_version", "sft-mix-v4"),
    ("code_commit", "deadbee"),
    ("base_model", "Qwen/Qwen3-14B"),
    ("config", {"lr": 3e-5, "lora_r": 16}),
]


@pytest.mark.parametrize(("field", "value"), DRIFTS)
def test_each_drifted_field_changes_the_fingerprint_and_is_named(field: str, value: Any) -> None:
    drifted = {**BASE, field: value}
    assert reference_fingerprint(drifted) != EXAMPLE_FINGERPRINT
    claimed = as_lineage(drifted)
    assert claimed.fingerprint() == reference_fingerprint(drifted)
    assert drifted_fields(as_lineage(BASE), claimed) == [field]


def test_two_hundred_seeds_give_two_hundred_fingerprints() -> None:
    ours = {as_lineage({**BASE, "seed": s}).fingerprint() for s in range(200)}
    assert len(ours) == 200
    assert ours == {reference_fingerprint({**BASE, "seed": s}) for s in range(200)}


@pytest.mark.parametrize("missing", REQUIRED_FIELDS)
def test_a_missing_field_is_named(missing: str) -> None:
    partial = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        reference_fingerprint(partial)
    lineage = as_lineage(partial)
    assert lineage.missing_fields() == [missing]
    assert lineage.fingerprint() is None and not lineage.is_complete()
    assert drifted_fields(as_lineage(BASE), lineage) == [missing]


def test_seed_zero_is_present_not_missing() -> None:
    assert as_lineage(BASE).seed == 0 and as_lineage(BASE).is_complete()


def test_several_missing_fields_are_named_in_order() -> None:
    assert Lineage(code_commit="a1b2c3d").missing_fields() == ["data_version", "config", "base_model", "seed"]


def test_drift_ignores_config_key_order_and_spacing() -> None:
    same = as_lineage(BASE, config_text='{"lora_r":16,   "lr":2e-5}')
    assert drifted_fields(as_lineage(BASE), same) == []


def test_the_same_config_spelt_otherwise_keeps_the_stored_text() -> None:
    """Setting a complete lineage again with an equivalent config (other key order, 2e-5 as 0.00002) is a no-op:
    the text the run recorded stays, byte for byte, and so does the fingerprint."""
    stored = as_lineage(BASE, config_text='{"lr": 2e-5, "lora_r": 16}')
    again = merge(stored, Lineage(config='{"lora_r":16,"lr":0.00002}'))
    assert again.config == '{"lr": 2e-5, "lora_r": 16}' and again.fingerprint() == stored.fingerprint()


def test_complete_lineage_is_immutable_and_a_partial_one_only_fills_in() -> None:
    partial = merge(Lineage(), Lineage(data_version="v1", seed=0))
    assert merge(partial, Lineage(code_commit="abc")) == replace(partial, code_commit="abc")
    for changed in (Lineage(data_version="v2"), Lineage(seed=5), Lineage(code_commit="abc", seed=5)):
        with pytest.raises(AlreadyExists) as info:  # set fields keep their value before the lineage is complete too
            merge(partial, changed)
        assert info.value.reason == "LINEAGE_IMMUTABLE"
        assert info.value.field in ("lineage.data_version", "lineage.seed")
    complete = merge(partial, as_lineage({**BASE, "data_version": "v1", "seed": 0}))
    assert complete.is_complete()
    assert merge(complete, Lineage(seed=0)) == complete
    with pytest.raises(AlreadyExists) as info:
        merge(complete, Lineage(seed=1))
    assert info.value.field == "lineage.seed"


@pytest.mark.parametrize("text", ["[1, 2]", "not json", '"a string"'])
def test_config_must_be_a_json_object(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        merge(Lineage(), Lineage(config=text))
    assert info.value.field == "lineage.config"


def test_config_nesting_has_one_limit_whatever_the_stack() -> None:
    """64 levels are taken, 65 refused, and so are depths the parser itself cannot reach; a config accepted on
    one thread can be fingerprinted on any other (the answer of SetLineage is built after the write)."""

    def nested(levels: int) -> str:
        return '{"a": ' * (levels - 1) + '{"a": [1]' + "}" * levels if levels > 1 else '{"a": 1}'

    assert nested(3) == '{"a": {"a": {"a": [1]}}}'
    ok = Lineage(data_version="d", code_commit="c", config=nested(MAX_CONFIG_DEPTH - 1), base_model="b", seed=0)
    validate(ok)
    assert ok.fingerprint() is not None
    for levels in (MAX_CONFIG_DEPTH, 985, 200_000):  # nested(n) holds n objects and an array: n + 1 levels
        with pytest.raises(InvalidArgument) as info:
            validate(Lineage(config=nested(levels)))
        assert info.value.field == "lineage.config" and "nested too deeply" in str(info.value)
    # A config stored before the limit (100 levels) stays usable: the rest of its lineage can still be recorded.
    stored = Lineage(config=nested(100))
    completed = merge(stored, Lineage(data_version="d", code_commit="c", base_model="b", seed=0))
    assert completed.config == stored.config and completed.fingerprint() is not None


def test_random_lineages_agree_with_the_reference() -> None:
    rng = random.Random(7)
    for _ in range(500):
        d = {
            "data_version": f"mix-v{rng.randint(0, 9)}",
            "code_commit": f"{rng.getrandbits(28):07x}",
            "config": {"lr": rng.choice([1e-5, 2e-5, 3e-4]), "lora_r": rng.choice([8, 16, 32]), "n": rng.random()},
            "base_model": rng.choice(["Qwen/Qwen3-8B", "meta/Llama-3-8B"]),
            "seed": rng.randint(-(2**40), 2**40),
        }
        assert as_lineage(d).fingerprint() == reference_fingerprint(d)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "-1E999"])
def test_a_config_with_non_json_numbers_is_refused(constant: str) -> None:
    from runledger_server.domain.lineage import parse_config

    with pytest.raises(InvalidArgument) as info:
        parse_config(f'{{"lr": {constant}}}')
    assert info.value.field == "lineage.config"
