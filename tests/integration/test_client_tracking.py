"""The Python client against a real server: runs, lineage, exact metric round trips, typed errors, backpressure."""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import runledger
from runledger import RetryPolicy, errors
from runledger.v1 import tracking_pb2, tracking_service_pb2 as tpb, tracking_service_pb2_grpc
from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer

EXAMPLE_LINEAGE = {
    "data_version": "sft-mix-v3",
    "code_commit": "a1b2c3d",
    "config": {"lr": 2e-5, "lora_r": 16},
    "base_model": "Qwen/Qwen3-8B",
    "seed": 0,
}
EXAMPLE_FINGERPRINT = "b06a681fb46bb8d9aceed5caf216654a5dcb3ccc55f3c5965abbaae565ab830d"
FAST_RETRY = RetryPolicy(initial_backoff=0.02, max_backoff=0.2)


@pytest.fixture
def client(server: EmbeddedServer) -> Iterator[runledger.Client]:
    with runledger.Client(server.address, retry=FAST_RETRY) as c:
        yield c


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll a state the client exposes (not a stand-in for synchronisation: the state is the event)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.int64)


# ---- experiments and runs ---------------------------------------------------------------------------
def test_start_run_records_params_tags_and_lineage_fingerprint(client: runledger.Client) -> None:
    run = client.start_run(
        experiment="qwen3-sft",
        name="lr-2e-5",
        params={"lr": 2e-5, "lora_r": 16},
        tags={"team": "post-training"},
        lineage=EXAMPLE_LINEAGE,
    )
    assert run.lineage_fingerprint == EXAMPLE_FINGERPRINT and run.missing_lineage_fields == []
    info = client.get_run(run.run_id)
    assert info.status == tracking_pb2.RUN_STATUS_RUNNING
    assert dict(info.params) == {"lr": "2e-05", "lora_r": "16"} and info.tags["team"] == "post-training"
    assert info.lineage_fingerprint == EXAMPLE_FINGERPRINT and info.display_name == "lr-2e-5"
    run.finish()
    assert client.get_run(run.run_id).status == tracking_pb2.RUN_STATUS_FINISHED


def test_start_run_with_a_chosen_id_again_returns_that_run_while_it_is_the_same(client: runledger.Client) -> None:
    # A create retried after its reply was lost (or a restarted script with a fixed ID) gets the run it made;
    # a run of that ID that differs, or has ended, is a conflict.
    kwargs = {"experiment": "chosen", "name": "a", "params": {"lr": 2e-5}, "lineage": EXAMPLE_LINEAGE}
    first = client.start_run(run_id="chosen-run-1", **kwargs)  # type: ignore[arg-type]
    again = client.start_run(run_id="chosen-run-1", **kwargs)  # type: ignore[arg-type]
    assert again.run_id == first.run_id and again.lineage_fingerprint == EXAMPLE_FINGERPRINT
    with pytest.raises(errors.AlreadyExists):
        client.start_run(run_id="chosen-run-1", **{**kwargs, "params": {"lr": 3e-5}})  # type: ignore[arg-type]
    first.finish()
    with pytest.raises(errors.AlreadyExists):
        client.start_run(run_id="chosen-run-1", **kwargs)  # type: ignore[arg-type]


def test_lineage_set_in_parts_gets_the_fingerprint_when_complete(client: runledger.Client) -> None:
    run = client.start_run(experiment="qwen3-sft", lineage={"data_version": "sft-mix-v3", "seed": 0})
    assert run.lineage_fingerprint == "" and set(run.missing_lineage_fields) == {"code_commit", "config", "base_model"}
    response = run.set_lineage({k: EXAMPLE_LINEAGE[k] for k in ("code_commit", "config", "base_model")})
    assert response.fingerprint == EXAMPLE_FINGERPRINT == run.lineage_fingerprint
    assert run.missing_lineage_fields == []
    # complete lineage is immutable: a changed field is refused, naming it
    with pytest.raises(errors.AlreadyExists) as info:
        run.set_lineage({"seed": 1})
    assert "seed" in info.value.message
    assert client.get_run(run.run_id).lineage.seed == 0


def test_experiment_is_get_or_create_by_display_name(client: runledger.Client) -> None:
    first = client.get_or_create_experiment("sweep-a", description="lr sweep")
    again = client.get_or_create_experiment("sweep-a")
    assert first.name == again.name and first.name.startswith("experiments/")
    with pytest.raises(errors.AlreadyExists) as info:
        client.create_experiment("sweep-a")
    assert info.value.metadata["experiment"] == first.name
    run = client.start_run(experiment="sweep-a")
    assert run.experiment == first.name
    assert client.start_run(experiment=first).experiment == first.name
    assert [e.name for e in client.list_experiments(filter='display_name = "sweep-a"')] == [first.name]


def test_search_runs_pages_and_filters(client: runledger.Client) -> None:
    exp = client.get_or_create_experiment("search")
    ids = [client.start_run(experiment=exp, params={"lr": lr}).run_id for lr in (1e-5, 2e-5, 3e-5, 4e-5, 5e-5)]
    found = [r.run_id for r in client.search_runs(experiments=[exp], page_size=2)]
    assert found == ids  # creation order across three pages
    hits = list(client.search_runs(experiments=[exp.name], filter='params.lr = "3e-05"'))
    assert [r.run_id for r in hits] == [ids[2]]
    newest_first = [r.run_id for r in client.search_runs(experiments=[exp], order_by="create_time DESC")]
    assert newest_first == ids[::-1]
    by_display_name = [r.run_id for r in client.search_runs(experiments=["search"])]  # as start_run takes it
    assert by_display_name == ids
    # One experiment alone, not in a list: once taken as a list of its characters ("s", "e", ...).
    assert [r.run_id for r in client.search_runs(experiments="search")] == ids
    assert [r.run_id for r in client.search_runs(experiments=exp)] == ids
    with pytest.raises(runledger.errors.NotFound):  # looked up, never created
        list(client.search_runs(experiments=["no-such-experiment"]))
    assert [e.display_name for e in client.list_experiments(filter='display_name = "no-such-experiment"')] == []


def test_eval_results_and_winner_selection(client: runledger.Client) -> None:
    exp = client.get_or_create_experiment("sweep-winner")
    a, b, phantom = (client.start_run(experiment=exp, name=n) for n in ("a", "b", "phantom"))
    a.log_eval_result(suite_fingerprint="suite-1", metrics={"mmlu": 0.61})
    b.log_eval_result(suite_fingerprint="suite-1", metrics={"mmlu": 0.64})
    phantom.log_eval_result(suite_fingerprint="suite-2", metrics={"mmlu": 0.99})
    with pytest.raises(errors.FailedPrecondition) as info:
        client.select_winner(experiment=exp, metric="mmlu", direction="MAXIMIZE")
    assert info.value.reason == "INCOMPARABLE_EVAL_SUITES"
    result = client.select_winner(experiment="sweep-winner", metric="mmlu", suite_fingerprint="suite-1")
    assert result.winner_run_id == b.run_id and result.score == pytest.approx(0.64)
    assert [r.run_id for r in result.excluded] == [phantom.run_id]
    by_ids = client.select_winner(run_ids=[a.run_id, b.run_id], metric="mmlu", direction="min")
    assert by_ids.winner_run_id == a.run_id
    one = client.select_winner(run_ids=b.run_id, metric="mmlu")  # once 32 one-character run IDs: NOT_FOUND
    assert one.winner_run_id == b.run_id and [c.run_id for c in one.cohort] == [b.run_id]
    with pytest.raises(errors.InvalidArgument) as bad:  # once protobuf's bare TypeError
        client.select_winner(run_ids=[a.run_id], metric=5)  # type: ignore[arg-type]
    assert bad.value.metadata["field"] == "metric"


# ---- metrics ----------------------------------------------------------------------------------------
def test_metrics_round_trip_exactly_including_nan_and_infinities(client: runledger.Client) -> None:
    steps = 20_000
    rng = np.random.default_rng(0)
    logged = {key: rng.normal(size=steps) for key in ("train/loss", "train/reward", "train/kl", "train/entropy")}
    specials = {100: math.nan, 101: math.inf, 102: -math.inf, 103: -0.0, 104: 5e-324, 105: 1.7976931348623157e308}
    for step, value in specials.items():
        logged["train/loss"][step] = value
    logged["train/kl"][:] = math.nan  # a diverged run: every point is NaN
    started = time.time_ns() // 1_000_000
    with client.start_run(experiment="roundtrip") as run:
        for step in range(steps):
            run.log_metrics({key: values[step] for key, values in logged.items()}, step=step)
    finished = time.time_ns() // 1_000_000
    assert run.acked_points == run.logged_points == 4 * steps
    assert client.get_run(run.run_id).status == tracking_pb2.RUN_STATUS_FINISHED  # context exit
    for key, values in logged.items():
        history = client.metric_history(run.run_id, key)
        assert history.steps.dtype == np.int64 and history.values.dtype == np.float64
        assert np.array_equal(history.steps, np.arange(steps))
        assert np.array_equal(bits(history.values), bits(values)), key  # bit-exact, NaN payload and -0.0 too
        assert started <= history.timestamps_ms.min() and history.timestamps_ms.max() <= finished
    latest = client.get_run(run.run_id).latest_metrics["train/reward"]
    assert latest.step == steps - 1 and latest.value == logged["train/reward"][-1]


def test_metric_history_range_downsampling_and_explicit_timestamps(client: runledger.Client) -> None:
    with client.start_run(experiment="history") as run:
        for step in range(1_000):
            run.log_metrics({"loss": 1000.0 - step if step != 500 else -1.0}, step=step, timestamp_ms=1_000 + step)
    window = client.metric_history(run.run_id, "loss", start_step=10, end_step=19)
    assert window.steps.tolist() == list(range(10, 20)) and window.timestamps_ms.tolist() == list(range(1010, 1020))
    small = client.metric_history(run.run_id, "loss", max_points=50)
    assert len(small.steps) <= 60 and small.steps[0] == 0 and small.steps[-1] == 999
    assert -1.0 in small.values.tolist() and 1000.0 in small.values.tolist()  # min and max survive
    empty = client.metric_history(run.run_id, "never-logged")
    assert empty.steps.shape == (0,) and empty.values.dtype == np.float64


def test_exception_in_the_with_block_marks_failed_and_propagates(client: runledger.Client) -> None:
    with pytest.raises(RuntimeError, match="diverged"), client.start_run(experiment="crash") as run:
        for step in range(100):
            run.log_metrics({"loss": float(step)}, step=step)
        raise RuntimeError("diverged")
    info = client.get_run(run.run_id)
    assert info.status == tracking_pb2.RUN_STATUS_FAILED and info.HasField("end_time")
    assert len(client.metric_history(run.run_id, "loss").steps) == 100  # flushed before marking


@pytest.mark.parametrize(
    ("code", "status"),
    [(0, "FINISHED"), (None, "FINISHED"), (3, "FAILED"), ("bad", "FAILED"), (143, "KILLED"), (130, "KILLED")],
)
def test_sys_exit_in_the_with_block_sets_the_status_by_its_code(
    client: runledger.Client, code: object, status: str
) -> None:
    with pytest.raises(SystemExit), client.start_run(experiment="exits") as run:
        run.log_metrics({"loss": 1.0}, step=0)
        raise SystemExit(code)
    info = client.get_run(run.run_id)
    assert info.status == tracking_pb2.RunStatus.Value(f"RUN_STATUS_{status}")
    assert client.metric_history(run.run_id, "loss").steps.tolist() == [0]


def test_finished_run_refuses_more_metrics(client: runledger.Client) -> None:
    run = client.start_run(experiment="closed")
    run.log_metrics({"loss": 1.0}, step=0)
    run.finish()
    run.finish()  # idempotent
    with pytest.raises(errors.FailedPrecondition) as info:
        run.log_metrics({"loss": 1.0}, step=1)
    assert info.value.reason == "RUN_CLOSED"


def test_bad_metric_input_is_refused_in_the_callers_hands(client: runledger.Client) -> None:
    run = client.start_run(experiment="bad-input")
    with pytest.raises(errors.InvalidArgument):
        run.log_metrics({"loss": "high"}, step=0)
    with pytest.raises(errors.InvalidArgument):
        run.log_metrics({" loss": 1.0}, step=0)
    with pytest.raises(errors.InvalidArgument):
        run.log_metrics({"loss": 1.0}, step=1.5)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        run.log_metrics({"loss": 1.0}, step=1 << 63)
    with pytest.raises(errors.InvalidArgument):
        run.log_metrics({"kl": None}, step=2)  # keys never logged again: must not hold up the rest
    with pytest.raises(errors.InvalidArgument) as named:
        run.log_metrics({"loss": 1.0, "acc": "high"}, step=2)
    assert named.value.metadata["field"] == "values[acc]" and "'acc'" in named.value.message
    with pytest.raises(errors.InvalidArgument) as boolean:
        run.log_metrics({"loss": 1.0}, step=True)
    assert boolean.value.metadata["field"] == "step"
    # Half an emoji (a JSON label's "\ud83d"): refused here; it used to be taken, then stop every later batch.
    with pytest.raises(errors.InvalidArgument):
        run.log_metrics({"acc/\ud83d": 0.9}, step=2)
    run.log_metrics({"loss": 1.0}, step=np.int64(3))  # numpy integers are integers
    run.log_metrics({"reward": 0.5}, step=4)
    run.finish(timeout=60)
    assert client.metric_history(run.run_id, "loss").steps.tolist() == [3]
    assert client.metric_history(run.run_id, "reward").steps.tolist() == [4]


def test_invalid_writer_ids_are_refused_before_anything_is_logged(server: EmbeddedServer) -> None:
    for bad in ("x" * 129, "a\x00b", "rank\ud800"):
        with pytest.raises(errors.InvalidArgument) as info:
            runledger.Client(server.address, writer_id=bad)
        assert info.value.metadata["field"] == "writer_id"
    with runledger.Client(server.address) as client:
        with pytest.raises(errors.InvalidArgument):
            client.start_run(experiment="writer-ids", writer_id="w" * 129)
        with pytest.raises(errors.NotFound):  # refused before the experiment or the run was created
            list(client.search_runs(experiments=["writer-ids"]))
        run = client.start_run(experiment="writer-ids")
        with pytest.raises(errors.InvalidArgument):
            client.attach_run(run.run_id, writer_id="node-a/" + "x" * 130)
        run.finish()


def test_typed_errors_for_eval_scores_params_and_names(client: runledger.Client) -> None:
    run = client.start_run(experiment="typed-inputs")
    for metrics, field in (({"acc": "high"}, "metrics[acc]"), ({"acc": None}, "metrics[acc]"), ({1: 0.5}, "metrics")):
        with pytest.raises(errors.InvalidArgument) as info:
            run.log_eval_result(suite_fingerprint="suite@1", metrics=metrics)  # type: ignore[arg-type]
        assert info.value.metadata["field"] == field
    with pytest.raises(errors.InvalidArgument) as info:
        run.log_params({"lr": "2e-5\udcff"})
    assert info.value.metadata["field"] == "params[lr]"
    with pytest.raises(errors.InvalidArgument) as info:
        run.set_tags({"team\ud800": "x"})
    assert info.value.metadata["field"] == "tags"
    with pytest.raises(errors.InvalidArgument) as info:
        client.start_run(experiment="typed-inputs", name=5)  # type: ignore[arg-type]
    assert info.value.metadata["field"] == "display_name"
    with pytest.raises(errors.InvalidArgument) as info:
        client.update_run(run.run_id, display_name=5)  # type: ignore[arg-type]
    assert info.value.metadata["field"] == "display_name"
    run.finish()


def test_arguments_that_are_not_mappings_are_refused_naming_the_field(client: runledger.Client) -> None:
    """A list of pairs, a "k=v" string or None where a dict belongs: InvalidArgument naming the argument, not a
    bare TypeError or AttributeError from deep inside; nothing is stored."""
    run = client.start_run(experiment="not-mappings")
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: run.log_metrics(None, step=0), "metrics"),  # type: ignore[arg-type]
        (lambda: run.log_metrics(0.5, step=0), "metrics"),  # type: ignore[arg-type]
        (lambda: run.log_series(None, steps=[0]), "metrics"),  # type: ignore[arg-type]
        (lambda: run.log_params("lr=1"), "params"),  # type: ignore[arg-type]
        (lambda: run.set_tags(["team"]), "tags"),  # type: ignore[arg-type]
        (lambda: run.log_eval_result(suite_fingerprint="s@1", metrics=None), "metrics"),  # type: ignore[arg-type]
        (lambda: client.start_run(experiment="not-mappings", params=[("lr", 1)]), "params"),  # type: ignore[arg-type]
    ]
    for call, field in calls:
        with pytest.raises(errors.InvalidArgument) as info:
            call()
        assert info.value.metadata["field"] == field, call
    run.log_metrics({"loss": 1.0}, step=1)
    run.finish()
    stored = client.get_run(run.run_id)
    assert dict(stored.params) == {} and dict(stored.tags) == {} and run.logged_points == 1
    assert len(list(client.search_runs(experiments="not-mappings"))) == 1  # start_run refused created none


def test_a_bad_value_in_a_very_wide_call_is_named(client: runledger.Client) -> None:
    run = client.start_run(experiment="wide-bad")
    wide: dict[str, object] = {f"layer{i}/grad_norm": float(i) for i in range(12_000)}
    wide["layer11999/grad_norm"] = "nan?"
    with pytest.raises(errors.InvalidArgument) as info:
        run.log_metrics(wide, step=0)
    assert info.value.metadata["field"] == "values[layer11999/grad_norm]"
    assert run.logged_points == 0
    run.finish()


def test_finish_with_a_bad_status_closes_nothing_and_can_be_called_again(client: runledger.Client) -> None:
    run = client.start_run(experiment="finish-again")
    run.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(errors.InvalidArgument):
        run.finish("DONE")
    run.log_metrics({"loss": 0.5}, step=1)  # still open
    run.flush(timeout=math.inf)  # no limit, as None: infinity used to overflow the wait
    run.finish("FINISHED", timeout=math.inf)
    assert client.get_run(run.run_id).status == tracking_pb2.RUN_STATUS_FINISHED
    assert client.metric_history(run.run_id, "loss").steps.tolist() == [0, 1]


def test_finish_whose_status_update_failed_sets_it_when_called_again(tmp_path: Path) -> None:
    settings = Settings(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "data")
    first = EmbeddedServer(settings).start()
    client = runledger.Client(first.address, retry=FAST_RETRY, timeout=None)  # None: no limit
    try:
        run = client.start_run(experiment="status-later")
        run.log_metrics({"loss": 1.0}, step=0)
        run.flush()
        first.stop()
        client.timeout = 0.5
        with pytest.raises(errors.Unavailable):
            run.finish()  # the points were all stored; only the status could not be set
        second = EmbeddedServer(settings).start()
        try:
            client.timeout = 30
            run.finish()
            assert client.get_run(run.run_id).status == tracking_pb2.RUN_STATUS_FINISHED
            run.finish()  # done: nothing more
        finally:
            second.stop()
    finally:
        client.close()


def test_log_series_stores_arrays_exactly_in_order_with_per_step_logging(client: runledger.Client) -> None:
    rng = np.random.default_rng(3)
    reward = rng.normal(size=50_000)
    reward[7] = math.nan
    kl = np.abs(rng.normal(size=50_000))
    with client.start_run(experiment="series") as run:
        run.log_metrics({"rl/reward": -1.0}, step=0)  # per-step points before and after the arrays
        run.log_series({"rl/reward": reward, "rl/kl": kl}, steps=np.arange(1, 50_001), timestamps_ms=np.arange(50_000))
        run.log_metrics({"rl/reward": -2.0, "rl/kl": 9.0}, step=50_001, timestamp_ms=99)
        run.log_series({"rl/kl": [0.5, 0.25]}, steps=[60_000, 60_001])  # plain lists; timestamps: now
    assert run.acked_points == run.logged_points == 1 + 100_000 + 2 + 2
    r = client.metric_history(run.run_id, "rl/reward")
    assert r.steps.tolist() == list(range(50_002))
    assert np.array_equal(bits(r.values), bits(np.concatenate([[-1.0], reward, [-2.0]])))
    assert r.timestamps_ms[1:50_001].tolist() == list(range(50_000)) and r.timestamps_ms[-1] == 99
    k = client.metric_history(run.run_id, "rl/kl")
    assert k.steps.tolist() == [*range(1, 50_002), 60_000, 60_001]
    assert np.array_equal(bits(k.values), bits(np.concatenate([kl, [9.0, 0.5, 0.25]])))


def test_log_series_keeps_what_was_logged_when_the_caller_reuses_its_arrays(client: runledger.Client) -> None:
    """A loop that refills preallocated step and timestamp arrays for each call: the points already queued keep
    the steps and timestamps they were logged with."""
    steps = np.arange(5, dtype=np.int64)
    stamps = np.arange(1_000, 1_005, dtype=np.int64)
    values = np.zeros(5)
    with client.start_run(experiment="series-reuse") as run:
        for _ in range(3):
            run.log_series({"loss": values}, steps=steps, timestamps_ms=stamps)
            steps += 5  # refilled in place before the sender took the previous call's points
            stamps += 5
            values += 1.0
    history = client.metric_history(run.run_id, "loss")
    assert history.steps.tolist() == list(range(15))
    assert history.timestamps_ms.tolist() == list(range(1_000, 1_015))
    assert history.values.tolist() == [float(call) for call in range(3) for _ in range(5)]


@pytest.mark.parametrize(
    ("metrics", "steps", "stamps", "fragment"),
    [
        ({"a": [1.0, 2.0]}, [1, 2, 3], None, "shape"),
        ({"a": [1.0, "x"]}, [1, 2], None, "must be numbers"),
        ({"a": ["1.0", "2.0"]}, [1, 2], None, "must be numbers"),  # text float() would parse is still text
        ({"a": np.array([b"1", b"2"])}, [1, 2], None, "must be numbers"),
        ({"a": np.array([1.0, "2"], dtype=object)}, [1, 2], None, "must be numbers"),
        ({"a": np.array([1.0, np.array("2")], dtype=object)}, [1, 2], None, "must be numbers"),
        ({"a": [1.0]}, [1.5], None, "must be integers"),
        ({"a": [1.0]}, [1 << 63], None, "int64"),
        ({"a": [[1.0]]}, [[1]], None, "one-dimensional"),
        ({" a": [1.0]}, [1], None, "not valid"),
        ({"a": [1.0, 2.0]}, [1, 2], [5], "timestamps_ms has 1"),
    ],
)
def test_log_series_refuses_bad_arrays_and_queues_nothing(
    client: runledger.Client, metrics: dict, steps: list, stamps: list | None, fragment: str
) -> None:
    run = client.start_run(experiment="series-bad")
    with pytest.raises(errors.InvalidArgument, match=fragment):
        run.log_series(metrics, steps=steps, timestamps_ms=stamps)
    assert run.logged_points == 0
    run.finish()


# ---- typed errors -----------------------------------------------------------------------------------
def test_typed_errors_carry_code_reason_and_metadata(client: runledger.Client) -> None:
    run = client.start_run(experiment="errors", params={"lr": 2e-5})
    run.log_params({"lr": 2e-5, "warmup": 100})  # the same value again is a no-op
    with pytest.raises(errors.AlreadyExists) as info:
        run.log_params({"lr": 3e-5, "batch": 64})
    err = info.value
    assert err.code is grpc.StatusCode.ALREADY_EXISTS and err.reason == "PARAM_IMMUTABLE"
    assert err.metadata["key"] == "lr" and "lr" in err.message and err.domain == "runledger"
    assert not isinstance(err, grpc.RpcError)
    assert dict(client.get_run(run.run_id).params) == {"lr": "2e-05", "warmup": "100"}  # nothing of the call stored
    with pytest.raises(errors.NotFound):
        client.get_run("0" * 32)
    with pytest.raises(errors.InvalidArgument) as bad:
        client.get_run("Not A Run ID")
    assert bad.value.metadata.get("field") == "run_id"
    with pytest.raises(errors.AlreadyExists):
        client.start_run(experiment="errors", run_id=run.run_id)


def test_streaming_into_a_missing_run_surfaces_not_found(client: runledger.Client) -> None:
    ghost = runledger.Run(client, tracking_pb2.Run(run_id="0" * 32), writer_id="w", owns_status=False)
    ghost.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(errors.NotFound):
        ghost.flush(timeout=30)
    with pytest.raises(errors.NotFound):  # the error sticks: nothing more would be stored
        ghost.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(errors.NotFound):
        ghost.finish()


# ---- writers ----------------------------------------------------------------------------------------
def test_two_writers_into_one_run_concurrently_store_every_point_once(client: runledger.Client) -> None:
    owner = client.start_run(experiment="ddp", writer_id="rank0")
    other = client.attach_run(owner.run_id, writer_id="rank1")
    steps = 5_000

    def train(run: runledger.Run, rank: int) -> None:
        for step in range(steps):
            run.log_metrics({"loss": rank * 1e6 + step, "reward": -(rank * 1e6 + step)}, step=step)
        run.flush()

    threads = [threading.Thread(target=train, args=(r, i)) for i, r in enumerate((owner, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.finish()
    assert client.get_run(owner.run_id).status == tracking_pb2.RUN_STATUS_RUNNING  # an attached writer leaves it
    owner.finish()
    for key, sign in (("loss", 1.0), ("reward", -1.0)):
        history = client.metric_history(owner.run_id, key)
        got = Counter(zip(history.steps.tolist(), history.values.tolist(), strict=True))
        want = Counter((s, sign * (r * 1e6 + s)) for r in (0, 1) for s in range(steps))
        assert got == want
        assert np.all(np.diff(history.steps) >= 0)


def test_a_restarted_writer_keeping_its_writer_id_continues_where_it_stopped(server: EmbeddedServer) -> None:
    """A preempted job restarts and attaches its ranks with the same writer IDs: their batches are numbered on
    from what the server stored, so the resumed points are stored, not refused as another writer's."""
    with runledger.Client(server.address) as before:
        run = before.start_run(experiment="resume", writer_id="rank0")
        for step in range(1_000):
            run.log_metrics({"loss": step * 0.5}, step=step)
        run.flush()
        run_id = run.run_id  # the process dies here: no finish()
    with runledger.Client(server.address) as after:
        resumed = after.attach_run(run_id, writer_id="rank0")
        for step in range(1_000, 2_000):
            resumed.log_metrics({"loss": step * 0.5}, step=step)
        resumed.finish()
        assert resumed.acked_points == resumed.logged_points == 1_000
        history = after.metric_history(run_id, "loss")
        assert history.steps.tolist() == list(range(2_000))
        assert history.values.tolist() == [step * 0.5 for step in range(2_000)]


def _take_next_batch_number(address: str, data_dir: Path, run_id: str, writer_id: str) -> None:
    """Store a batch under the number the writer's next batch takes (one past its highest), as another writer
    numbering from what the run held (without asking GetMetricWriter) would: that batch then collides."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(data_dir / "runledger.db")) as db:
        (highest,) = db.execute(
            "SELECT MAX(seq) FROM metric_batches WHERE run_id = ? AND writer_id = ?", (run_id, writer_id)
        ).fetchone()
    with grpc.insecure_channel(address) as ch:
        stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        series = tracking_pb2.MetricSeries(key="other", steps=[0], values=[9.0], timestamps_ms=[0])
        request = tpb.LogMetricsRequest(run_id=run_id, writer_id=writer_id, seq=highest + 1, series=[series])
        assert not stub.LogMetrics(request).duplicate


def test_a_batch_number_another_writer_took_is_refused_not_silently_dropped(
    client: runledger.Client, server: EmbeddedServer
) -> None:
    first = client.start_run(experiment="reuse", writer_id="rank0")
    first.log_metrics({"loss": 1.0}, step=0)
    first.flush()
    _take_next_batch_number(server.address, server.settings.data_dir, first.run_id, "rank0")
    first.log_metrics({"loss": 3.0}, step=2)
    with pytest.raises(errors.AlreadyExists) as info:
        first.flush(timeout=30)
    assert info.value.reason == "WRITER_ID_REUSED" and info.value.metadata["writerId"] == "rank0"
    assert first.logged_points == 2 and first.acked_points == 1  # logged, not stored: counted as logged
    assert client.metric_history(first.run_id, "loss").values.tolist() == [1.0]


def test_two_live_writers_attached_under_one_writer_id_both_keep_their_points(client: runledger.Client) -> None:
    """The second resumes far past what the first stored (GetMetricWriter's gap), so their numbers do not collide
    and neither loses points; each still stores its own re-sends once."""
    first = client.start_run(experiment="shared", writer_id="rank0")
    first.log_metrics({"loss": 1.0}, step=0)
    first.flush()
    second = client.attach_run(first.run_id, writer_id="rank0")
    second.log_metrics({"loss": 2.0}, step=1)
    second.flush()
    first.log_metrics({"loss": 3.0}, step=2)
    first.flush(timeout=30)
    assert (first.acked_points, second.acked_points) == (2, 1)
    assert client.metric_history(first.run_id, "loss").values.tolist() == [1.0, 2.0, 3.0]


# ---- batching, backpressure and reconnection --------------------------------------------------------
def test_a_full_batch_is_sent_at_once_not_at_the_batch_interval(server: EmbeddedServer) -> None:
    # An hour between timed cuts: only a full batch (4 points) can make the sender cut and send.
    with runledger.Client(server.address, batch_points=4, batch_interval=3600.0, retry=FAST_RETRY) as c:
        run = c.start_run(experiment="full-batches")
        run.log_metrics({"a": 0.0, "b": 0.0}, step=0)
        run.log_metrics({"a": 1.0, "b": -1.0}, step=1)  # 4 points: a full batch
        wait_until(lambda: run.acked_points == 4)
        run.log_metrics({"a": 2.0, "b": -2.0}, step=2)  # half a batch stays buffered
        time.sleep(0.2)
        assert run.acked_points == 4 and run.logged_points == 6
        run.log_metrics({"a": 3.0, "b": -3.0}, step=3)
        wait_until(lambda: run.acked_points == 8)
        assert c.metric_history(run.run_id, "b").values.tolist() == [0.0, -1.0, -2.0, -3.0]
        run.finish()


def test_full_buffer_blocks_the_caller_until_the_server_is_back(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(host="127.0.0.1", port=port, data_dir=tmp_path / "data")
    first = EmbeddedServer(settings).start()
    client = runledger.Client(first.address, max_buffered_points=8, batch_points=4, retry=FAST_RETRY)
    try:
        run = client.start_run(experiment="backpressure")
        run.log_metrics({"a": 0.0}, step=0)
        run.flush()
        first.stop()  # the server goes away; the stream breaks

        logged: list[int] = []

        def train() -> None:
            for step in range(1, 51):
                run.log_metrics({"a": float(step), "b": float(-step)}, step=step)
                logged.append(step)

        trainer = threading.Thread(target=train)
        trainer.start()
        stream = run._stream
        assert stream is not None
        wait_until(lambda: stream._blocked == 1)  # blocked once 8 points are waiting, not dropping
        assert run.logged_points - run.acked_points <= 8 and len(logged) < 50
        with pytest.raises(errors.DeadlineExceeded) as info:
            run.flush(timeout=0.05)
        assert info.value.reason == "FLUSH_TIMEOUT" and isinstance(info.value, TimeoutError)

        second = EmbeddedServer(settings).start()  # same port, same data: the sender resumes
        try:
            trainer.join(timeout=60)
            assert not trainer.is_alive() and len(logged) == 50
            run.finish(timeout=60)
            history = client.metric_history(run.run_id, "a")
            assert history.steps.tolist() == list(range(51))
            assert history.values.tolist() == [float(s) for s in range(51)]
            assert client.metric_history(run.run_id, "b").steps.tolist() == list(range(1, 51))
            assert run.reconnections >= 1
        finally:
            second.stop()
    finally:
        client.close()


def test_points_waiting_for_a_slow_commit_stay_within_the_ingest_budget(tmp_path: Path) -> None:
    """While commits cannot proceed (the database's write lock is held elsewhere), the server takes no more
    points than its ingest buffer; the senders wait, and once commits resume every point is stored once."""
    import sqlite3

    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", ingest_buffer_mib=1)
    with EmbeddedServer(settings) as srv, runledger.Client(srv.address, batch_points=8_192) as client:
        budget = srv._server.ingest_budget if srv._server is not None else None
        assert budget is not None and budget.limit == (1 << 20) // 24
        run = client.start_run(experiment="budget")
        run.log_metrics({"warmup": 0.0}, step=0)
        run.flush()
        holder = sqlite3.connect(settings.data_dir / "runledger.db", timeout=60)
        holder.execute("BEGIN IMMEDIATE")  # every commit now waits for this lock
        try:
            steps = np.arange(25_000)
            run.log_series({f"k{i}": steps * 0.5 + i for i in range(8)}, steps=steps)  # 200,000 points
            flushed = threading.Thread(target=run.flush, daemon=True)
            flushed.start()
            wait_until(lambda: budget.used >= budget.limit - 8_192)  # the buffer fills up to its limit ...
            time.sleep(0.3)
            assert budget.used <= budget.limit and budget.peak <= budget.limit  # ... and no further
            assert flushed.is_alive()
        finally:
            holder.rollback()
            holder.close()
        flushed.join(60)
        assert not flushed.is_alive() and budget.used == 0
        history = client.metric_history(run.run_id, "k7")
        assert history.steps.tolist() == steps.tolist() and history.values[-1] == 24_999 * 0.5 + 7
        run.finish()


@contextlib.contextmanager
def _small_budget_run(tmp_path: Path, name: str) -> Iterator[tuple[EmbeddedServer, grpc.Channel, Any, Any, str]]:
    """A server with a 1 MiB ingest budget: (server, channel, budget, tracking stub, a run's id)."""
    from runledger.v1 import tracking_service_pb2 as pb, tracking_service_pb2_grpc

    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", ingest_buffer_mib=1)
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        budget = srv._server.ingest_budget if srv._server is not None else None
        assert budget is not None
        stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        exp = stub.CreateExperiment(pb.CreateExperimentRequest(display_name=name))
        yield srv, channel, budget, stub, stub.CreateRun(pb.CreateRunRequest(experiment=exp.name)).run_id


def _loss_batch(run_id: str, seq: int, per_batch: int) -> Any:
    """LogMetricsRequest seq of `per_batch` points of "loss", at steps seq * per_batch onwards."""
    from runledger import wire
    from runledger.v1 import tracking_service_pb2 as pb

    steps = np.arange(seq * per_batch, (seq + 1) * per_batch, dtype=np.int64)
    series = wire.series("loss", steps, steps * 0.25, np.full(per_batch, 7, dtype=np.int64))
    return pb.LogMetricsRequest(run_id=run_id, writer_id="w", seq=seq, series=[series])


@contextlib.contextmanager
def _commits_held(srv: EmbeddedServer) -> Iterator[None]:
    """Every commit waits meanwhile: the database's write lock is held from outside."""
    import sqlite3

    holder = sqlite3.connect(srv.settings.data_dir / "runledger.db", timeout=60)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.rollback()
        holder.close()


def test_batches_of_calls_that_went_away_count_against_the_ingest_budget_until_committed(tmp_path: Path) -> None:
    """A LogMetrics call whose deadline passes while its batch waits for a commit leaves the batch queued (it
    is stored later): its points must go on counting against the server's ingest budget until then."""
    with _small_budget_run(tmp_path, "budget-cancel") as (srv, _, budget, stub, run_id):
        per_batch = 10_000

        def request(seq: int) -> Any:
            return _loss_batch(run_id, seq, per_batch)

        stub.LogMetrics(request(0))  # a first commit, so the next ones wait only for the lock below
        with _commits_held(srv):
            for seq in range(1, 9):  # 80,000 points, within the budget of ~43,690 only if released early
                with pytest.raises(grpc.RpcError) as info:
                    stub.LogMetrics(request(seq), timeout=0.2)
                assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                assert budget.used <= budget.limit
            time.sleep(0.3)
            # The calls are gone; the batches are not: the budget is full and holds the next caller back.
            assert budget.used >= budget.limit - per_batch
        wait_until(lambda: budget.used == 0)
        # What the callers would do: send again. The batches that got in were stored meanwhile; those whose
        # callers gave up while waiting for room never entered and are stored now.
        duplicates = [stub.LogMetrics(request(seq), timeout=30).duplicate for seq in range(1, 9)]
        entered = budget.limit // per_batch
        assert duplicates == [True] * entered + [False] * (8 - entered)
        history = runledger.Client(srv.address).metric_history(run_id, "loss")
        assert history.steps.tolist() == list(range(9 * per_batch))


def test_a_batch_is_charged_for_the_whole_message_its_points_keep_alive(tmp_path: Path) -> None:
    """A batch's arrays are views of its message, which stays in memory until the commit: a message of one
    point padded with 2 MiB of unknown fields (skipped, as every parser does) was charged 24 bytes, so a flood
    of them held hundreds of MiB within a 1 MiB budget. It is charged for its whole size."""
    from runledger import wire
    from runledger.v1 import tracking_service_pb2 as pb

    with _small_budget_run(tmp_path, "padded") as (srv, channel, budget, _, run_id):
        log = channel.unary_unary(
            "/runledger.v1.TrackingService/LogMetrics",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.LogMetricsResponse.FromString,
        )

        def padded(seq: int) -> bytes:
            message = _loss_batch(run_id, seq, 1).SerializeToString()
            return message + wire.length_delimited(99, bytes(2 << 20))

        log(padded(0), timeout=30)  # a first commit, so the next ones wait only for the lock below
        with _commits_held(srv):
            calls = [log.future(padded(seq), timeout=60) for seq in (1, 2, 3)]
            wait_until(lambda: len(budget._waiters) == 2)  # the first took the whole budget; the others wait
            assert budget.used == budget.limit
        assert [c.result().seq for c in calls] == [1, 2, 3]
        wait_until(lambda: budget.used == 0)
        history = runledger.Client(srv.address).metric_history(run_id, "loss")
        assert history.steps.tolist() == [0, 1, 2, 3]


def test_unary_calls_beyond_what_may_wait_for_the_ingest_budget_are_refused_as_busy(tmp_path: Path) -> None:
    """Each LogMetrics call waiting for room holds its request, and nothing bounded how many waited (a reviewer
    held 363 MiB with 24 of them within a 1 MiB budget). Beyond UNARY_WAITING_BUDGETS budgets' worth, a call
    is refused UNAVAILABLE INGEST_BUSY at once; sent again later, it is stored, and nothing is stored twice."""
    from runledger_server.transport.tracking_servicer import UNARY_WAITING_BUDGETS
    from tests.support import refusal_of

    with _small_budget_run(tmp_path, "busy") as (srv, _, budget, stub, run_id):
        per_batch, calls = 10_000, 30

        def request(seq: int) -> Any:
            return _loss_batch(run_id, seq, per_batch)

        stub.LogMetrics(request(0))  # a first commit, so the next ones wait only for the lock below
        with _commits_held(srv):
            futures = {seq: stub.LogMetrics.future(request(seq), timeout=60) for seq in range(1, calls + 1)}
            wait_until(lambda: sum(f.done() for f in futures.values()) + len(budget._waiters) >= calls - 4)
            assert budget.waiting <= UNARY_WAITING_BUDGETS * budget.limit + per_batch + 100
        refused = []
        for seq, fut in futures.items():
            if fut.exception() is None:
                assert fut.result().seq == seq and not fut.result().duplicate
            else:
                r = refusal_of(fut.exception())  # type: ignore[arg-type]
                assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "INGEST_BUSY"), r
                refused.append(seq)
        assert 0 < len(refused) < calls - 4
        assert [stub.LogMetrics(request(seq)).duplicate for seq in refused] == [False] * len(refused)
        history = runledger.Client(srv.address).metric_history(run_id, "loss")
        assert history.steps.tolist() == list(range((calls + 1) * per_batch))


def test_a_named_writer_learns_where_it_resumes_once_the_server_is_back(tmp_path: Path) -> None:
    """Asking where a named writer resumes waits for the server like any send: points logged meanwhile are kept,
    and stored once it answers."""
    settings = Settings(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "data")
    first = EmbeddedServer(settings).start()
    client = runledger.Client(first.address, retry=FAST_RETRY, timeout=2.0)
    try:
        run = client.start_run(experiment="resume-later")
        resumed = client.attach_run(run.run_id, writer_id="rank3")
        first.stop()
        for step in range(100):
            resumed.log_metrics({"loss": float(step)}, step=step)
        with pytest.raises(errors.DeadlineExceeded):
            resumed.flush(timeout=0.5)
        assert resumed.acked_points == 0
        second = EmbeddedServer(settings).start()
        try:
            resumed.flush(timeout=60)
            resumed.finish()
            run.finish()
            assert client.metric_history(run.run_id, "loss").steps.tolist() == list(range(100))
        finally:
            second.stop()
    finally:
        client.close()


def test_runs_dropped_without_finish_end_their_senders_once_everything_is_stored(client: runledger.Client) -> None:
    """An attached writer that goes out of scope unfinished (a helper that logged and returned): its sender sends
    what it holds, then ends, instead of polling for the life of the process."""
    import gc

    def senders() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("runledger-metrics-"))

    owner = client.start_run(experiment="dropped")
    before = senders()

    def helper(step: int) -> None:
        writer = client.attach_run(owner.run_id)
        writer.log_metrics({"helper/x": float(step)}, step=step)  # no flush, no finish

    for step in range(20):
        helper(step)
    gc.collect()
    wait_until(lambda: senders() == before)
    owner.finish()
    assert client.metric_history(owner.run_id, "helper/x").steps.tolist() == list(range(20))


def test_closing_the_client_stores_what_its_runs_still_hold(server: EmbeddedServer) -> None:
    """`with Client(...)` around a training loop that never calls finish: leaving the block sends every logged
    point before the channel closes (they used to be dropped with it); the runs keep their status."""
    with runledger.Client(server.address, batch_interval=30.0) as client:  # nothing goes out on a timer
        run = client.start_run(experiment="closed-client")
        helper = client.attach_run(run.run_id, writer_id="helper")
        for step in range(1_000):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        helper.log_series({"reward": np.arange(500.0)}, steps=np.arange(500))
        assert run.acked_points < 1_000
    with pytest.raises(errors.FailedPrecondition) as refused:
        run.log_metrics({"loss": 0.0}, step=1_000)
    assert refused.value.reason == "RUN_CLOSED"
    with pytest.raises(errors.FailedPrecondition) as closed:
        client.start_run(experiment="closed-client")
    assert closed.value.reason == "CLIENT_CLOSED"
    client.close()  # again: nothing to do
    with runledger.Client(server.address) as reader:
        assert reader.metric_history(run.run_id, "loss").steps.tolist() == list(range(1_000))
        assert reader.metric_history(run.run_id, "reward").values.tolist() == list(np.arange(500.0))
        assert reader.get_run(run.run_id).status == tracking_pb2.RUN_STATUS_RUNNING


def _a_point_the_stopped_server_cannot_take(tmp_path: Path, experiment: str) -> tuple[runledger.Client, runledger.Run]:
    """A client whose run holds one point logged after its server stopped (one stored before)."""
    settings = Settings(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "data")
    srv = EmbeddedServer(settings).start()
    client = runledger.Client(srv.address, retry=FAST_RETRY)
    run = client.start_run(experiment=experiment)
    run.log_metrics({"loss": 1.0}, step=0)
    run.flush()
    srv.stop()
    run.log_metrics({"loss": 0.5}, step=1)
    return client, run


def test_closing_the_client_while_the_server_is_down_raises_after_its_timeout(tmp_path: Path) -> None:
    client, run = _a_point_the_stopped_server_cannot_take(tmp_path, "closed-while-down")
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded) as info:
        client.close(timeout=0.5)
    assert info.value.reason == "FLUSH_TIMEOUT" and info.value.metadata["pendingPoints"] == "1"
    assert time.monotonic() - started < 10
    with pytest.raises(errors.FailedPrecondition) as closed:
        client.get_run(run.run_id)
    assert closed.value.reason == "CLIENT_CLOSED"


def test_logging_from_inside_a_logging_call_is_refused_not_a_deadlock(client: runledger.Client) -> None:
    """A signal handler that logs a last metric: when it interrupts log_metrics or log_series while they hold the
    run's lock, its call waited for that lock for ever. It is refused (REENTRANT_CALL); between calls, it works.
    Simulated deterministically: a metrics mapping, or a key, that calls back while it is read under the lock."""
    run = client.start_run(experiment="reentrant-logging")
    run.log_metrics({"loss": 1.0}, step=0)
    seen: list[errors.RunledgerError] = []

    def handler() -> None:
        assert run._stream is not None and run._stream._lock.locked()
        for call in (
            lambda: run.log_metrics({"loss": 9.0}, step=9),
            lambda: run.log_metrics({"preempted": 1.0}, step=9),
            lambda: run.log_series({"loss": [9.0]}, steps=[9]),
        ):
            try:
                call()
            except errors.FailedPrecondition as exc:
                seen.append(exc)

    class InterruptingMetrics(dict):  # type: ignore[type-arg]
        def values(self):  # type: ignore[no-untyped-def]
            handler()
            return super().values()

    class InterruptingKey(str):
        def strip(self, chars: str | None = None) -> str:
            if run._stream is not None and run._stream._lock.locked():  # checked again under the lock
                handler()
            return str.strip(self, chars)

    run.log_metrics(InterruptingMetrics(loss=0.5), step=1)
    run.log_series({InterruptingKey("loss"): np.array([0.25])}, steps=[2])
    assert [e.reason for e in seen] == ["REENTRANT_CALL"] * 6
    run.log_metrics({"loss": 0.125}, step=3)
    run.finish()
    assert client.metric_history(run.run_id, "loss").values.tolist() == [1.0, 0.5, 0.25, 0.125]


def test_logging_while_another_thread_holds_the_lock_waits_for_it(client: runledger.Client) -> None:
    """The reentry check runs when a call finds the run's lock held: held by another thread (the sender cutting a
    batch, a second training thread), the call waits and logs; it was refused as if reentered."""
    run = client.start_run(experiment="contended")
    run.log_metrics({"loss": 1.0}, step=0)
    stream = run._stream
    assert stream is not None
    holding = threading.Event()

    def hold() -> None:
        with stream._lock:
            holding.set()
            time.sleep(0.3)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    run.log_metrics({"loss": np.float64(0.5)}, step=1)  # a numpy value: the Python path, which checks the lock
    run.log_series({"loss": [0.25]}, steps=[2])
    holder.join()
    run.finish()
    assert client.metric_history(run.run_id, "loss").values.tolist() == [1.0, 0.5, 0.25]


def test_a_signal_handler_logging_while_its_thread_waits_for_the_lock_is_logged(client: runledger.Client) -> None:
    """A real signal arrives while log_metrics waits for the run's lock (the sender holds it): the handler's own
    log_metrics waits too and is logged. Only a handler interrupting a call that holds the lock is refused (it was
    refused here as well, from a look at the stack that took waiting for the lock as holding it)."""
    run = client.start_run(experiment="signal-while-waiting")
    run.log_metrics({"loss": 1.0}, step=0)
    stream = run._stream
    assert stream is not None
    main = threading.get_ident()
    holding = threading.Event()
    handled: list[object] = []

    def handler(signum: int, frame: object) -> None:
        try:
            run.log_metrics({"preempted": 1.0}, step=1)
            handled.append("logged")
        except Exception as exc:  # recorded for the assertion
            handled.append(exc)

    def hold_then_signal() -> None:
        with stream._lock:
            holding.set()
            time.sleep(0.2)  # the main thread is now waiting for the lock
            signal.pthread_kill(main, signal.SIGUSR1)
            time.sleep(0.2)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        holder = threading.Thread(target=hold_then_signal)
        holder.start()
        holding.wait()
        run.log_metrics({"loss": np.float64(0.5)}, step=1)  # a numpy value: the Python path, which takes the lock
        holder.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handled == ["logged"]
    run.finish()
    assert client.metric_history(run.run_id, "preempted").values.tolist() == [1.0]
    assert client.metric_history(run.run_id, "loss").values.tolist() == [1.0, 0.5]


def test_a_dropped_runs_finalizer_run_by_a_thread_holding_the_lock_does_not_wait_for_it(
    client: runledger.Client,
) -> None:
    """A Run in a reference cycle is finalised by the garbage collector on whichever thread runs it, the sender's
    included, possibly while that thread holds the lock: the finalizer waited for ever for it, and with it the
    sender and the exit flush. It now only sets the flags; the sender sends what it holds and ends."""
    run = client.start_run(experiment="finalised-under-the-lock")
    run.log_metrics({"loss": 1.0}, step=0)
    stream = run._stream
    assert stream is not None
    with stream._lock:  # as the sender would, when its garbage collection runs the finalizer
        stream.close_when_sent()
    stream._thread.join(10)
    assert not stream._thread.is_alive() and stream.acked_points == 1
    with pytest.raises(errors.FailedPrecondition) as closed:
        run.log_metrics({"loss": 0.5}, step=1)
    assert closed.value.reason == "RUN_CLOSED"


def test_a_signal_while_a_flush_takes_the_lock_back_never_releases_another_thread_s_hold() -> None:
    """flush() waits on the sender's condition; woken, it takes the lock back, and a signal (Ctrl-C) raising
    then left Condition.wait without the lock: the caller's `with` released it anyway, here the hold of the
    thread that had it (and that thread's own release then failed). The signal's handler now runs once the lock
    is back in the waiting thread's hand."""

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    client = runledger.Client("127.0.0.1:1")  # nothing listens there: the flush waits
    run = runledger.Run(client, tracking_pb2.Run(run_id="r1"), writer_id=None, owns_status=False)
    run.log_metrics({"loss": 0.5}, step=0)
    stream = run._stream
    assert stream is not None
    main = threading.get_ident()
    released: list[BaseException | None] = []

    def hold_and_signal() -> None:
        time.sleep(0.3)  # the main thread waits in flush() by now
        try:
            with stream._lock:
                stream._cond.notify_all()  # it wakes, and waits to take the lock back from us
                time.sleep(0.2)
                signal.pthread_kill(main, signal.SIGUSR1)
                time.sleep(0.2)
            released.append(None)
        except BaseException as exc:  # our release failed: someone released our hold
            released.append(exc)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        helper = threading.Thread(target=hold_and_signal)
        helper.start()
        with pytest.raises(Interrupted):
            run.flush(timeout=10)
        helper.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert released == [None]
    assert not stream._lock.locked()  # and nobody holds it now
    stream.abandon()
    client.close(timeout=0)


def test_finishing_from_inside_a_logging_call_is_refused_not_a_deadlock(client: runledger.Client) -> None:
    """A signal handler (SIGTERM on a preempted job) runs in the thread it interrupts, possibly inside
    log_metrics while it holds the run's lock: finish() there used to wait for that lock for ever. Simulated
    deterministically: the metrics mapping calls back while it is read under the lock."""
    run = client.start_run(experiment="reentrant")
    run.log_metrics({"loss": 1.0}, step=0)
    seen: list[errors.RunledgerError] = []

    class Interrupting(dict):  # type: ignore[type-arg]
        def values(self):  # type: ignore[no-untyped-def]
            for call in (lambda: run.finish("KILLED", timeout=5), run.flush, client.close):
                try:
                    call()
                except errors.FailedPrecondition as exc:
                    seen.append(exc)
            return super().values()

    run.log_metrics(Interrupting(loss=0.5), step=1)
    assert [e.reason for e in seen] == ["REENTRANT_CALL"] * 3
    run.finish()  # once the interrupted call has returned, everything works, and nothing was lost
    assert client.get_run(run.run_id).status == tracking_pb2.RUN_STATUS_FINISHED
    assert client.metric_history(run.run_id, "loss").values.tolist() == [1.0, 0.5]


SIGNAL_DURING_THE_FIRST_LOG_CALL = """
import signal, sys, threading
import runledger
from runledger import _process, errors

client = runledger.Client(sys.argv[1])
run = client.start_run(experiment="signal-while-opening")
seen = []

def handler(signum, frame):
    # The first log_metrics holds the run's and the client's locks while it starts the metric sender.
    # A call on the client's cached channel does not need the lock, and runs; a first use of the registry
    # builds on the channel (the lock), and is refused.
    for call in (lambda: run.finish("KILLED"), lambda: run.log_metrics({"x": 1.0}, step=5), client.close,
                 lambda: client.registry.get_model("m"), lambda: client.get_run(run.run_id)):
        try:
            call()
            seen.append("ran")
        except errors.FailedPrecondition as exc:
            seen.append(exc.reason)

signal.signal(signal.SIGUSR1, handler)
main = threading.get_ident()
held = threading.Event()

def hold_then_signal():
    # The sender's start takes this lock: the main thread waits for it inside the first log call, then the
    # signal arrives (a lock wait is interrupted to run the handler, on the main thread).
    with _process._lock:
        held.set()
        threading.Event().wait(0.3)
        signal.pthread_kill(main, signal.SIGUSR1)
        threading.Event().wait(0.3)

holder = threading.Thread(target=hold_then_signal)
holder.start()
held.wait()
run.log_metrics({"loss": 0.5}, step=1)
holder.join()
print(",".join(seen), flush=True)
run.finish()
print(client.get_run(run.run_id).status, client.metric_history(run.run_id, "loss").values.tolist(), flush=True)
client.close()
"""


def test_a_signal_handler_calling_the_client_during_the_first_log_call_is_refused_not_a_deadlock(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """The first log_metrics opens the run's metric stream holding the run's and the client's locks, and
    starting the sender takes a moment: a handler (SIGTERM on a preempted job) calling finish(), close() or a
    call needing the client's lock there waited for ever for a lock its own thread held. Each is refused
    (REENTRANT_CALL), and once the interrupted call has returned everything works, nothing lost."""
    script = tmp_path / "trainer.py"
    script.write_text(SIGNAL_DURING_THE_FIRST_LOG_CALL)
    done = subprocess.run(
        [sys.executable, str(script), server.address], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    refusals, outcome = done.stdout.splitlines()
    assert refusals == ",".join(["REENTRANT_CALL"] * 4 + ["ran"])
    assert outcome == f"{tracking_pb2.RUN_STATUS_FINISHED} [0.5]"


SIGNAL_WHILE_FLUSH_WAITS = """
import signal, sys, threading, time
import runledger
from runledger import errors

client = runledger.Client(sys.argv[1])
run = client.start_run(experiment="signal-while-flushing")
print("ready", flush=True)
sys.stdin.readline()  # the test holds the database's write lock now: commits, and so acks, wait
seen = []

def handler(signum, frame):
    try:
        run.log_metrics({"x": 1.0}, step=1)
        seen.append("ran")
    except errors.FailedPrecondition as exc:
        seen.append(exc.reason)

signal.signal(signal.SIGUSR1, handler)
main = threading.get_ident()
threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGUSR1)).start()
run.log_metrics({"loss": 0.5}, step=0)
run.flush(timeout=60)  # waits in slices with SIGUSR1 held; the handler runs between two of them
print(",".join(seen), flush=True)
run.finish()
client.close()
"""


def test_a_signal_handler_calling_the_client_while_flush_waits_is_refused_not_a_deadlock(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """flush() waits in slices with the usual signals held; when one ended, the held signal's handler ran with
    the run's lock taken again but not yet marked as its thread's, so its log_metrics waited for ever for a lock
    its own thread held, and the sender with it. It is refused (REENTRANT_CALL), as the README says."""
    import sqlite3

    script = tmp_path / "trainer.py"
    script.write_text(SIGNAL_WHILE_FLUSH_WAITS)
    proc = subprocess.Popen(
        [sys.executable, str(script), server.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    holder = sqlite3.connect(server.settings.data_dir / "runledger.db", timeout=60, isolation_level=None)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        holder.execute("BEGIN IMMEDIATE")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(1.5)  # the signal lands while the flush waits for the commit
        holder.execute("ROLLBACK")
        out, err = proc.communicate(timeout=60)
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["REENTRANT_CALL"], (out, err)


def test_closing_the_client_reports_points_a_stopped_sender_lost_unless_already_reported(
    server: EmbeddedServer,
) -> None:
    client = runledger.Client(server.address)
    first = client.start_run(experiment="lost-on-close", writer_id="rank0")
    first.log_metrics({"loss": 1.0}, step=0)
    first.flush()
    _take_next_batch_number(server.address, server.settings.data_dir, first.run_id, "rank0")
    first.log_metrics({"loss": 3.0}, step=2)  # refused in the background: nobody asks the first writer again
    stream = first._stream
    assert stream is not None
    wait_until(lambda: stream.error is not None)
    with pytest.raises(errors.AlreadyExists) as info:
        client.close()
    assert info.value.reason == "WRITER_ID_REUSED"
    client.close()  # closed: nothing more to say

    again = runledger.Client(server.address)
    one = again.attach_run(first.run_id, writer_id="rank1")
    one.log_metrics({"loss": 4.0}, step=3)
    one.flush()
    _take_next_batch_number(server.address, server.settings.data_dir, first.run_id, "rank1")
    one.log_metrics({"loss": 6.0}, step=5)  # refused ...
    with pytest.raises(errors.AlreadyExists):
        one.flush(timeout=30)  # ... and told here
    again.close()  # so closing does not raise it a second time


def test_a_second_close_waits_for_the_first(server: EmbeddedServer) -> None:
    import threading

    client = runledger.Client(server.address, batch_interval=30.0)
    run = client.start_run(experiment="close-twice")
    for step in range(1_000):
        run.log_metrics({"loss": float(step)}, step=step)
    first = threading.Thread(target=client.close)
    first.start()
    wait_until(lambda: client._closing)
    client.close()  # returns once the first close has stored everything
    assert run.acked_points == 1_000
    first.join(timeout=30)
    assert not first.is_alive()


def test_finish_refuses_an_unknown_numeric_status_before_closing(client: runledger.Client) -> None:
    run = client.start_run(experiment="numeric-status")
    for bad in (99, True):  # True is 1 to Python, but never a status someone meant
        with pytest.raises(errors.InvalidArgument):
            run.finish(bad)  # type: ignore[arg-type]
    run.log_metrics({"loss": 1.0}, step=0)  # still open
    run.finish(tracking_pb2.RUN_STATUS_FINISHED)  # type: ignore[arg-type]
    assert client.get_run(run.run_id).status == tracking_pb2.RUN_STATUS_FINISHED


def test_a_batch_that_cannot_be_encoded_stops_the_sender_for_good(
    client: runledger.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runledger import _streamer

    real = _streamer.build_request

    def build(run_id: str, writer_id: str, seq: int, blocks):  # type: ignore[no-untyped-def]
        if seq == 1:
            raise RuntimeError("simulated encoding failure")
        return real(run_id, writer_id, seq, blocks)

    monkeypatch.setattr(_streamer, "build_request", build)
    run = client.start_run(experiment="not-encodable")
    run.log_metrics({"loss": 1.0}, step=0)
    run.flush()
    run.log_metrics({"loss": 2.0}, step=1)
    with pytest.raises(errors.RunledgerError) as info:
        run.flush(timeout=30)
    assert info.value.reason == "CLIENT_ERROR"
    stream = run._stream
    assert stream is not None
    connections = stream.connections
    time.sleep(1.0)
    assert stream.connections == connections and not stream.sending  # no reconnecting to the same failure


def test_close_called_inside_close_is_refused_not_a_deadlock(tmp_path: Path) -> None:
    """A SIGTERM handler calling close() while this thread's close() waits for the server: the nested call is
    refused (REENTRANT_CALL) and the interrupted one goes on to its own end."""
    import signal

    client, _ = _a_point_the_stopped_server_cannot_take(tmp_path, "nested-close")
    nested: list[BaseException] = []

    def handler(signum: int, frame: object) -> None:
        try:
            client.close()
        except errors.RunledgerError as exc:
            nested.append(exc)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(errors.DeadlineExceeded):
            client.close(timeout=3)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [getattr(e, "reason", None) for e in nested] == ["REENTRANT_CALL"]
    client.close()  # done: returns at once


def test_a_forked_child_of_a_closed_client_can_close_it_too(server: EmbeddedServer) -> None:
    import os

    client = runledger.Client(server.address)
    client.close()
    pid = os.fork()
    if pid == 0:  # the child: close() must not wait for a close that runs only in the parent
        import signal

        signal.alarm(10)
        client.close()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_methods_taking_a_run_id_take_the_run_too_and_refuse_other_types_by_name(
    client: runledger.Client, tmp_path: Path
) -> None:
    """register() took a Run, but get_run, log_params, list_artifacts, download_artifacts and others raised a
    bare TypeError from protobuf for one."""
    run = client.start_run(experiment="run-refs")
    run.log_metrics({"loss": 0.5}, step=0)
    run.flush()
    message = client.get_run(run)
    assert message.run_id == run.run_id and client.get_run(message).run_id == run.run_id
    assert client.log_params(run, {"lr": 1e-4}) == {"lr": "0.0001"}
    assert client.set_tags(message, {"stage": "sft"}) == {"stage": "sft"}
    assert client.metric_history(run, "loss").steps.tolist() == [0]
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"w")
    client.log_artifact(run, weights)
    assert [a.path for a in client.list_artifacts(run)] == ["w.bin"]
    assert client.download_artifacts(message, "w.bin", tmp_path / "got.bin").read_bytes() == b"w"
    assert client.attach_run(run, writer_id="second").run_id == run.run_id
    with pytest.raises(errors.InvalidArgument) as bad:
        client.get_run(42)  # type: ignore[arg-type]
    assert bad.value.metadata["field"] == "run_id"
    run.finish()


def test_a_crashed_run_is_resumed_with_its_writer_and_its_status_owned_again(client: runledger.Client) -> None:
    """start_run(run_id=...) of a run that crashed (or whose tags changed) was a bare AlreadyExists, and
    attach_run left the status RUNNING after its block: resume_run continues it as MLflow's start_run does."""
    run_id = "0" * 31 + "7"
    with pytest.raises(RuntimeError), client.start_run(experiment="resume", run_id=run_id, writer_id="rank0") as run:
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        client.set_tags(run, {"phase": "warmup"})
        raise RuntimeError("node lost")
    assert client.get_run(run_id).status == tracking_pb2.RUN_STATUS_FAILED
    with pytest.raises(errors.AlreadyExists) as exists:
        client.start_run(experiment="resume", run_id=run_id)
    assert exists.value.reason == "RUN_EXISTS" and "resume_run" in str(exists.value)
    with client.resume_run(run_id, writer_id="rank0") as resumed:
        assert client.get_run(run_id).status == tracking_pb2.RUN_STATUS_RUNNING
        for step in range(5, 10):
            resumed.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    info = client.get_run(run_id)
    assert info.status == tracking_pb2.RUN_STATUS_FINISHED and dict(info.tags) == {"phase": "warmup"}
    assert client.metric_history(run_id, "loss").steps.tolist() == list(range(10))
