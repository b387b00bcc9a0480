"""The client's request building: lineage dicts (config as JSON text), statuses, directions, string maps."""

from __future__ import annotations

import json
import math

import pytest

from runledger import errors
from runledger._convert import direction, lineage_to_proto, number, request, run_status, string_map
from runledger.v1 import common_pb2, registry_service_pb2, tracking_pb2, tracking_service_pb2

HISTORY = tracking_service_pb2.GetMetricHistoryRequest

EXAMPLE = {
    "data_version": "sft-mix-v3",
    "code_commit": "a1b2c3d",
    "config": {"lr": 2e-5, "lora_r": 16},
    "base_model": "Qwen/Qwen3-8B",
    "seed": 0,
}


def test_lineage_config_travels_as_json_text_with_int_and_float_intact() -> None:
    msg = lineage_to_proto(EXAMPLE)
    assert msg.data_version == "sft-mix-v3" and msg.base_model == "Qwen/Qwen3-8B"
    assert msg.HasField("seed") and msg.seed == 0  # seed 0 is present, not missing
    parsed = json.loads(msg.config)
    assert parsed == {"lr": 2e-5, "lora_r": 16}
    assert type(parsed["lora_r"]) is int and type(parsed["lr"]) is float


def test_partial_lineage_leaves_the_rest_unset() -> None:
    msg = lineage_to_proto({"data_version": "v1", "seed": None})
    assert msg.HasField("data_version")
    for name in ("code_commit", "config", "base_model", "seed"):
        assert not msg.HasField(name)


def test_config_text_is_sent_verbatim() -> None:
    assert lineage_to_proto({"config": '{"lr": 2e-5}'}).config == '{"lr": 2e-5}'


@pytest.mark.parametrize(
    ("lineage", "field"),
    [
        ({"datasets": "x"}, "lineage"),
        ({"seed": "0"}, "lineage.seed"),
        ({"seed": 1.5}, "lineage.seed"),
        ({"seed": True}, "lineage.seed"),
        ({"config": [1, 2]}, "lineage.config"),
        ({"config": {"lr": math.nan}}, "lineage.config"),
        ({"config": {"f": object()}}, "lineage.config"),
        ({"base_model": 3}, "lineage.base_model"),
    ],
)
def test_lineage_refusals_name_the_field(lineage: dict, field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        lineage_to_proto(lineage)
    assert info.value.metadata["field"] == field


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("FINISHED", tracking_pb2.RUN_STATUS_FINISHED),
        ("failed", tracking_pb2.RUN_STATUS_FAILED),
        ("RUN_STATUS_KILLED", tracking_pb2.RUN_STATUS_KILLED),
        (tracking_pb2.RUN_STATUS_RUNNING, tracking_pb2.RUN_STATUS_RUNNING),
    ],
)
def test_run_status(value: str | int, expected: int) -> None:
    assert run_status(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("MAXIMIZE", common_pb2.DIRECTION_MAXIMIZE),
        ("min", common_pb2.DIRECTION_MINIMIZE),
        ("DIRECTION_MINIMIZE", common_pb2.DIRECTION_MINIMIZE),
        (common_pb2.DIRECTION_MAXIMIZE, common_pb2.DIRECTION_MAXIMIZE),
    ],
)
def test_direction(value: str | int, expected: int) -> None:
    assert direction(value) == expected


@pytest.mark.parametrize(("call", "arg"), [(run_status, "DONE"), (direction, "UP")])
def test_unknown_enum_names(call, arg: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        call(arg)


def test_string_map_stringifies_values() -> None:
    assert string_map({"lr": 2e-5, "lora_r": 16, "name": "x", "flag": True}, "params") == {
        "lr": "2e-05",
        "lora_r": "16",
        "name": "x",
        "flag": "True",
    }
    assert string_map(None, "params") == {}
    with pytest.raises(errors.InvalidArgument):
        string_map({1: "x"}, "params")


def test_same_json_compares_as_the_lineage_fingerprint_does() -> None:
    from runledger._convert import same_json

    assert same_json('{"lr": 1e-4, "r": 16}', '{"r":16,"lr":0.0001}')  # re-serialised, same value
    assert not same_json('{"lr": 1}', '{"lr": 1.0}')  # 1 and 1.0 give different fingerprints
    assert not same_json('{"flag": true}', '{"flag": 1}')


@pytest.mark.parametrize(
    ("cls", "fields", "field"),
    [
        (HISTORY, {"run_id": "r", "key": "k", "max_points": 1 << 31}, "max_points"),
        (HISTORY, {"run_id": "r", "key": "k", "start_step": 1 << 63}, "start_step"),
        (HISTORY, {"run_id": "r", "key": "k", "end_step": "10"}, "end_step"),
        (registry_service_pb2.SetAliasRequest, {"model": "m", "alias": "a", "version": 1 << 64}, "version"),
        (registry_service_pb2.RecordGateResultRequest, {"model": "m", "gate_id": "g", "score": "high"}, "score"),
        (tracking_service_pb2.SearchRunsRequest, {"filter": "", "page_size": -(1 << 40)}, "page_size"),
    ],
)
def test_a_value_protobuf_refuses_is_invalid_argument_naming_its_field(
    cls: type, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        request(cls, **fields)
    assert info.value.metadata["field"] == field and field in info.value.message


def test_request_keeps_unset_optional_fields_unset() -> None:
    built = request(tracking_service_pb2.GetMetricHistoryRequest, run_id="r", key="k", start_step=None, end_step=5)
    assert not built.HasField("start_step") and built.end_step == 5 and built.run_id == "r"


def test_a_score_is_anything_float_takes() -> None:
    import numpy as np

    assert number(np.array(0.9), "score") == 0.9 and number(np.float32(0.5), "score") == 0.5 and number(1, "s") == 1.0
    with pytest.raises(errors.InvalidArgument) as info:
        number("high", "score")
    assert info.value.metadata["field"] == "score"
    with pytest.raises(errors.InvalidArgument, match="str") as info:
        number("0.9", "threshold")  # float() would parse it; a score written as text is a mistake upstream
    assert info.value.metadata["field"] == "threshold"


def test_decimal_and_fraction_scores_are_numbers() -> None:
    from decimal import Decimal
    from fractions import Fraction

    assert number(Decimal("0.25"), "score") == 0.25 and number(Fraction(1, 4), "score") == 0.25
