"""TrackingService over the real server: every RPC, its refusals, and that refusals change nothing."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import struct
import time

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from runledger.v1 import common_pb2, tracking_pb2, tracking_service_pb2 as pb, tracking_service_pb2_grpc
from runledger_server.domain.metrics import RESUME_GAP, RESUME_SLOTS
from runledger_server.embedded import EmbeddedServer
from tests.support import refusal

EXAMPLE_LINEAGE = common_pb2.Lineage(
    data_version="sft-mix-v3",
    code_commit="a1b2c3d",
    config='{"lr": 2e-5, "lora_r": 16}',
    base_model="Qwen/Qwen3-8B",
    seed=0,
)
_NAMES = itertools.count()
EXAMPLE_FINGERPRINT = "b06a681fb46bb8d9aceed5caf216654a5dcb3ccc55f3c5965abbaae565ab830d"


def _experiment(tracking, name: str = "") -> tracking_pb2.Experiment:
    name = name or f"sweep-{next(_NAMES)}"
    return tracking.CreateExperiment(pb.CreateExperimentRequest(display_name=name, tags={"team": "rl"}))


def _run(tracking, exp, **kw) -> tracking_pb2.Run:
    return tracking.CreateRun(pb.CreateRunRequest(experiment=exp.name, **kw))


def _series(key, steps, values, ts=None):
    return tracking_pb2.MetricSeries(
        key=key, steps=steps, values=values, timestamps_ms=ts if ts is not None else [1000 + s for s in steps]
    )


def _history(tracking, run_id, key, **kw):
    steps, values, ts = [], [], []
    for chunk in tracking.GetMetricHistory(pb.GetMetricHistoryRequest(run_id=run_id, key=key, **kw)):
        assert chunk.key == key
        steps += chunk.steps
        values += chunk.values
        ts += chunk.timestamps_ms
    return steps, values, ts


def _bits(values):
    return [struct.pack("<d", v) for v in values]


# ---- experiments -------------------------------------------------------------------------------
def test_experiments_create_get_list_and_unique_name(tracking) -> None:
    exp = _experiment(tracking, "qwen3-sft")
    assert exp.name == f"experiments/{exp.experiment_id}" and exp.tags["team"] == "rl"
    assert tracking.GetExperiment(pb.GetExperimentRequest(name=exp.name)) == exp
    r = refusal(lambda: tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="qwen3-sft")))
    assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "ALREADY_EXISTS"
    assert r.metadata["experiment"] == exp.name and "display_name" in r.message
    for i in range(5):
        _experiment(tracking, f"e{i}")
    names, token = [], ""
    while True:
        page = tracking.ListExperiments(pb.ListExperimentsRequest(page_size=2, page_token=token))
        names += [e.display_name for e in page.experiments]
        token = page.next_page_token
        if not token:
            break
    assert names == ["qwen3-sft", "e0", "e1", "e2", "e3", "e4"]
    only = tracking.ListExperiments(pb.ListExperimentsRequest(filter='display_name = "e3"'))
    assert [e.display_name for e in only.experiments] == ["e3"]


def test_experiment_refusals(tracking) -> None:
    r = refusal(lambda: tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="")))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "display_name"
    r = refusal(lambda: tracking.GetExperiment(pb.GetExperimentRequest(name="experiments/nope")))
    assert r.code == grpc.StatusCode.NOT_FOUND and "experiments/nope" in r.message
    r = refusal(lambda: tracking.GetExperiment(pb.GetExperimentRequest(name="bogus")))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "name"
    r = refusal(lambda: tracking.ListExperiments(pb.ListExperimentsRequest(page_token="garbage!")))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "page_token"
    assert len(tracking.ListExperiments(pb.ListExperimentsRequest()).experiments) == 0


def test_a_page_token_edited_to_hold_text_no_database_stores_is_malformed(tracking) -> None:
    """A hand-edited token whose cursor holds a lone surrogate (JSON "\\ud800") reached the driver: INTERNAL."""
    for i in range(3):
        _experiment(tracking, f"paged-{i}")
    token = tracking.ListExperiments(pb.ListExperimentsRequest(page_size=1)).next_page_token
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert [type(v) for v in data["c"]] == [int, str]
    data["c"][1] = data["c"][1] + "\ud800"
    edited = base64.urlsafe_b64encode(json.dumps(data).encode()).decode()
    r = refusal(lambda: tracking.ListExperiments(pb.ListExperimentsRequest(page_size=1, page_token=edited)))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "page_token"


# ---- runs --------------------------------------------------------------------------------------
def test_run_lifecycle(tracking) -> None:
    exp = _experiment(tracking)
    run = _run(tracking, exp, display_name="r0", params={"lr": "2e-5"}, tags={"stage": "sft"}, lineage=EXAMPLE_LINEAGE)
    assert run.status == tracking_pb2.RUN_STATUS_RUNNING
    assert run.lineage_fingerprint == EXAMPLE_FINGERPRINT and not run.missing_lineage_fields
    assert not run.HasField("end_time")
    done = tracking.UpdateRun(pb.UpdateRunRequest(run_id=run.run_id, status=tracking_pb2.RUN_STATUS_FINISHED))
    assert done.status == tracking_pb2.RUN_STATUS_FINISHED and done.HasField("end_time")
    time.sleep(0.01)  # a retried UpdateRun (its reply lost) must not move the end time
    again = tracking.UpdateRun(pb.UpdateRunRequest(run_id=run.run_id, status=tracking_pb2.RUN_STATUS_FINISHED))
    assert again.end_time == done.end_time
    renamed = tracking.UpdateRun(pb.UpdateRunRequest(run_id=run.run_id, display_name="r0-final"))
    assert renamed.display_name == "r0-final" and renamed.status == tracking_pb2.RUN_STATUS_FINISHED
    got = tracking.GetRun(pb.GetRunRequest(run_id=run.run_id))
    assert got.params == {"lr": "2e-5"} and got.tags == {"stage": "sft"} and got.display_name == "r0-final"
    assert got.start_time == got.create_time  # no start time given: the server's clock at creation

    # An imported or resumed run keeps the start time it was created with.
    started = Timestamp(seconds=1_700_000_000, nanos=123_456_000)
    imported = _run(tracking, exp, start_time=started)
    assert imported.start_time == started and imported.create_time != started
    assert tracking.GetRun(pb.GetRunRequest(run_id=imported.run_id)).start_time == started
    at_epoch = _run(tracking, exp, start_time=Timestamp(seconds=0))  # the epoch is a time, not "unset"
    assert at_epoch.start_time.ToMicroseconds() == 0 and at_epoch.HasField("start_time")


def test_client_chosen_run_id_is_retry_safe(tracking) -> None:
    exp = _experiment(tracking)
    run = _run(tracking, exp, run_id="my-run-1")
    assert run.run_id == "my-run-1"
    r = refusal(lambda: _run(tracking, exp, run_id="my-run-1"))
    assert r.code == grpc.StatusCode.ALREADY_EXISTS and "my-run-1" in r.message
    r = refusal(lambda: _run(tracking, exp, run_id="Bad ID"))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "run_id"


@pytest.mark.parametrize("long", ["x" * 5_000, "é" * 5_000, "\U0001f600" * 3_000])
def test_a_refusal_echoing_a_long_value_keeps_its_code_reason_and_field(tracking, long: str) -> None:
    """The echoed value is clipped: the whole status must fit gRPC's 8 KiB trailer limit, else the client sees
    RESOURCE_EXHAUSTED from its own transport instead of the refusal."""
    exp = _experiment(tracking)
    run = _run(tracking, exp)
    calls = [
        (lambda: tracking.GetRun(pb.GetRunRequest(run_id=long)), "run_id"),
        (lambda: tracking.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={" " + long: "v"})), "params"),
        (lambda: tracking.SearchRuns(pb.SearchRunsRequest(filter=f"nope.{long} = 1")), "filter"),
        (lambda: tracking.CreateRun(pb.CreateRunRequest(experiment=long)), "experiment"),
    ]
    for call, field in calls:
        r = refusal(call)
        assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field), r.message[:200]
        assert r.message.endswith("characters in all)") or len(r.message.encode()) <= 480


def test_run_refusals_change_nothing(tracking) -> None:
    exp = _experiment(tracking)
    r = refusal(lambda: tracking.CreateRun(pb.CreateRunRequest(experiment="experiments/missing")))
    assert r.code == grpc.StatusCode.NOT_FOUND and r.metadata["field"] == "experiment"
    r = refusal(lambda: _run(tracking, exp, lineage=common_pb2.Lineage(config="[1, 2]")))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "lineage.config"
    r = refusal(lambda: _run(tracking, exp, params={"": "x"}))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "params"
    assert not tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name])).runs
    r = refusal(lambda: tracking.GetRun(pb.GetRunRequest(run_id="nope")))
    assert r.code == grpc.StatusCode.NOT_FOUND and r.metadata["field"] == "run_id"
    run = _run(tracking, exp)
    r = refusal(lambda: tracking.UpdateRun(pb.UpdateRunRequest(run_id=run.run_id, status=17)))  # type: ignore[arg-type]
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "status"
    for bad_time in (Timestamp(seconds=10**12), Timestamp(seconds=1, nanos=-1)):  # these used to be INTERNAL
        request = pb.UpdateRunRequest(run_id=run.run_id, status=tracking_pb2.RUN_STATUS_FINISHED, end_time=bad_time)
        r = refusal(lambda request=request: tracking.UpdateRun(request))  # type: ignore[misc]
        assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "end_time"
    r = refusal(lambda: _run(tracking, exp, start_time=Timestamp(seconds=-(10**12))))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "start_time"
    r = refusal(lambda: _run(tracking, exp, lineage=common_pb2.Lineage(config="[" * 100_000)))  # too deep to parse
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "lineage.config"
    r = refusal(lambda: _run(tracking, exp, run_id="abc\n"))  # a trailing newline is not part of a valid ID
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "run_id"
    # End times: none on a running run, none with RUNNING, none before the start (the epoch is not "unset").
    later = Timestamp(seconds=run.start_time.seconds + 60)
    r = refusal(lambda: tracking.UpdateRun(pb.UpdateRunRequest(run_id=run.run_id, end_time=later)))
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.FAILED_PRECONDITION, "RUN_NOT_ENDED", "end_time")
    resumed = pb.UpdateRunRequest(run_id=run.run_id, status=tracking_pb2.RUN_STATUS_RUNNING, end_time=later)
    r = refusal(lambda: tracking.UpdateRun(resumed))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "end_time"
    for early in (Timestamp(seconds=0), Timestamp(seconds=run.start_time.seconds - 1)):
        ended = pb.UpdateRunRequest(run_id=run.run_id, status=tracking_pb2.RUN_STATUS_FINISHED, end_time=early)
        r = refusal(lambda ended=ended: tracking.UpdateRun(ended))  # type: ignore[misc]
        assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "end_time"
    unchanged = tracking.GetRun(pb.GetRunRequest(run_id=run.run_id))
    assert unchanged.status == tracking_pb2.RUN_STATUS_RUNNING and not unchanged.HasField("end_time")
    # On an ended run, an end time alone corrects the end.
    tracking.UpdateRun(pb.UpdateRunRequest(run_id=run.run_id, status=tracking_pb2.RUN_STATUS_FAILED))
    corrected = tracking.UpdateRun(pb.UpdateRunRequest(run_id=run.run_id, end_time=later))
    assert corrected.end_time == later and corrected.status == tracking_pb2.RUN_STATUS_FAILED


def test_params_are_immutable(tracking) -> None:
    run = _run(tracking, _experiment(tracking), params={"lr": "2e-5"})
    same = tracking.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={"lr": "2e-5", "lora_r": "16"}))
    assert same.params == {"lr": "2e-5", "lora_r": "16"}
    r = refusal(
        lambda: tracking.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={"beta": "0.1", "lr": "3e-5"}))
    )
    assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "PARAM_IMMUTABLE"
    assert r.metadata["key"] == "lr" and "'lr'" in r.message
    # the refused call stored none of its params, not even the new key
    assert tracking.GetRun(pb.GetRunRequest(run_id=run.run_id)).params == {"lr": "2e-5", "lora_r": "16"}


def test_long_param_values_are_kept_whole(tracking) -> None:
    run = _run(tracking, _experiment(tracking))
    value = "x" * 50_000  # MLflow truncates at 6,000 characters; we keep every one
    tracking.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={"prompt": value}))
    assert tracking.GetRun(pb.GetRunRequest(run_id=run.run_id)).params["prompt"] == value


def test_tags_are_mutable(tracking) -> None:
    run = _run(tracking, _experiment(tracking), tags={"a": "1", "b": "2"})
    out = tracking.SetTags(pb.SetTagsRequest(run_id=run.run_id, tags={"a": "10", "c": "3"}, remove_keys=["b"]))
    assert out.tags == {"a": "10", "c": "3"}
    r = refusal(lambda: tracking.SetTags(pb.SetTagsRequest(run_id=run.run_id, tags={"a": "1"}, remove_keys=["a"])))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "remove_keys"
    assert tracking.GetRun(pb.GetRunRequest(run_id=run.run_id)).tags == {"a": "10", "c": "3"}


# ---- lineage -----------------------------------------------------------------------------------
def test_lineage_fingerprint_matches_reference_and_is_immutable(tracking) -> None:
    run = _run(tracking, _experiment(tracking))
    partial = tracking.SetLineage(
        pb.SetLineageRequest(run_id=run.run_id, lineage=common_pb2.Lineage(data_version="sft-mix-v3", seed=0))
    )
    assert partial.fingerprint == "" and list(partial.missing_fields) == ["code_commit", "config", "base_model"]
    # a field once set keeps its value while the lineage is still incomplete too: two ranks that disagree on
    # data_version are told, rather than the last one silently winning
    r = refusal(
        lambda: tracking.SetLineage(
            pb.SetLineageRequest(run_id=run.run_id, lineage=common_pb2.Lineage(data_version="sft-mix-v2", seed=7))
        )
    )
    assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "LINEAGE_IMMUTABLE"
    assert r.metadata["field"] == "lineage.data_version"
    kept = tracking.GetRun(pb.GetRunRequest(run_id=run.run_id)).lineage
    assert kept.data_version == "sft-mix-v3" and kept.seed == 0 and not kept.HasField("code_commit")
    full = tracking.SetLineage(pb.SetLineageRequest(run_id=run.run_id, lineage=EXAMPLE_LINEAGE))
    assert full.fingerprint == EXAMPLE_FINGERPRINT and not full.missing_fields
    # key order and spacing of the config JSON do not matter; the parsed values do
    again = common_pb2.Lineage(config='{"lora_r":16,"lr":2e-05}')
    assert (
        tracking.SetLineage(pb.SetLineageRequest(run_id=run.run_id, lineage=again)).fingerprint == EXAMPLE_FINGERPRINT
    )
    for drift in (
        common_pb2.Lineage(seed=1),
        common_pb2.Lineage(data_version="sft-mix-v4"),
        common_pb2.Lineage(config='{"lr": 2e-5, "lora_r": 16.0}'),
    ):
        field = drift.ListFields()[0][0].name
        r = refusal(lambda d=drift: tracking.SetLineage(pb.SetLineageRequest(run_id=run.run_id, lineage=d)))
        assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "LINEAGE_IMMUTABLE"
        assert r.metadata["field"] == f"lineage.{field}" and field in r.message
    assert tracking.GetRun(pb.GetRunRequest(run_id=run.run_id)).lineage_fingerprint == EXAMPLE_FINGERPRINT


# ---- metrics -----------------------------------------------------------------------------------
def test_stream_metrics_acks_and_dedup(tracking) -> None:
    run = _run(tracking, _experiment(tracking))
    batches = [
        pb.StreamMetricsRequest(
            run_id=run.run_id,
            writer_id="rank0",
            seq=i,
            series=[
                _series("train/loss", [i * 10 + j for j in range(10)], [1.0 / (1 + i * 10 + j) for j in range(10)])
            ],
        )
        for i in range(20)
    ]
    acks = list(tracking.StreamMetrics(iter(batches + batches[:5])))
    assert [(a.writer_id, a.seq, a.duplicate) for a in acks] == [("rank0", i, False) for i in range(20)] + [
        ("rank0", i, True) for i in range(5)
    ]
    steps, values, _ = _history(tracking, run.run_id, "train/loss")
    assert steps == list(range(200)) and values == [1.0 / (1 + s) for s in steps]


def test_a_batch_under_a_stored_seq_with_other_points_is_refused_not_acknowledged(settings, tracking) -> None:
    """Same (run, writer, seq), other points: another writer reusing the writer_id, not a re-send. Acknowledging
    it as a duplicate would count its points as stored when they were dropped."""
    import sqlite3

    run = _run(tracking, _experiment(tracking))

    def batch(seq: int, value: float, key: str = "loss") -> pb.LogMetricsRequest:
        series = [_series(key, [seq], [value])]
        return pb.LogMetricsRequest(run_id=run.run_id, writer_id="rank0", seq=seq, series=series)

    assert not tracking.LogMetrics(batch(0, 0.5)).duplicate
    assert tracking.LogMetrics(batch(0, 0.5)).duplicate  # the same points again: a re-send
    for other in (batch(0, 0.25), batch(0, 0.5, key="reward")):
        r = refusal(lambda b=other: tracking.LogMetrics(b))
        assert (r.code, r.reason) == (grpc.StatusCode.ALREADY_EXISTS, "WRITER_ID_REUSED")
        assert r.metadata["field"] == "writer_id"
        assert r.metadata["seq"] == "0" and "another writer uses the same writer_id" in r.message
    # In one stream (one commit group, or two): the second batch numbered 1 is refused, the first is stored.
    stream = [pb.StreamMetricsRequest(**{f.name: v for f, v in batch(1, x).ListFields()}) for x in (1.5, 2.5)]
    acks = tracking.StreamMetrics(iter(stream))
    assert [(a.seq, a.duplicate) for a in itertools.islice(acks, 1)] == [(1, False)]
    r = refusal(lambda: list(acks))
    assert (r.code, r.reason) == (grpc.StatusCode.ALREADY_EXISTS, "WRITER_ID_REUSED")
    steps, values, _ = _history(tracking, run.run_id, "loss")
    assert (steps, values) == ([0, 1], [0.5, 1.5])
    assert _history(tracking, run.run_id, "reward")[0] == []
    # A batch stored before checksums were kept (what migration 0006 leaves) has none: its points are compared.
    two = [_series("loss", [7, 8], [float("nan"), -0.0]), _series("reward", [7], [1.0])]
    assert not tracking.LogMetrics(
        pb.LogMetricsRequest(run_id=run.run_id, writer_id="rank0", seq=2, series=two)
    ).duplicate
    with contextlib.closing(sqlite3.connect(settings.data_dir / "runledger.db")) as db, db:
        db.execute("UPDATE metric_batches SET content_crc = NULL WHERE seq IN (0, 2)")
    r = refusal(lambda: tracking.LogMetrics(batch(0, 0.25)))
    assert (r.code, r.reason) == (grpc.StatusCode.ALREADY_EXISTS, "WRITER_ID_REUSED")
    assert tracking.LogMetrics(batch(0, 0.5)).duplicate
    again = [two[1], _series("empty", [], []), two[0]]  # another order, and a key without points: the same points
    assert tracking.LogMetrics(
        pb.LogMetricsRequest(run_id=run.run_id, writer_id="rank0", seq=2, series=again)
    ).duplicate
    for other in (
        two[:1],
        [two[0], _series("reward", [7], [1.5])],
        [_series("loss", [7, 8], [float("nan"), 0.0]), two[1]],
    ):
        r = refusal(
            lambda o=other: tracking.LogMetrics(
                pb.LogMetricsRequest(run_id=run.run_id, writer_id="rank0", seq=2, series=o)
            )
        )
        assert (r.code, r.reason) == (grpc.StatusCode.ALREADY_EXISTS, "WRITER_ID_REUSED"), other
    assert _history(tracking, run.run_id, "loss")[1][:2] == [0.5, 1.5]


def test_get_metric_writer_says_where_a_writer_resumes(tracking) -> None:
    run = _run(tracking, _experiment(tracking))

    def next_seq(writer: str) -> int:
        return tracking.GetMetricWriter(pb.GetMetricWriterRequest(run_id=run.run_id, writer_id=writer)).next_seq

    def past(highest_plus_one: int, seq: int) -> bool:
        """A whole number of gaps past the highest stored: room for batches an earlier incarnation has in flight."""
        gaps, rest = divmod(seq - highest_plus_one, RESUME_GAP)
        return rest == 0 and 1 <= gaps <= RESUME_SLOTS

    fresh = {next_seq("rank0") for _ in range(5)}  # has stored nothing
    assert all(past(0, seq) for seq in fresh) and len(fresh) == 5  # two incarnations asking get different answers
    batches = [
        pb.StreamMetricsRequest(run_id=run.run_id, writer_id="rank0", seq=seq, series=[_series("loss", [seq], [0.5])])
        for seq in (0, 1, 2, 7)  # numbering with a gap (a batch refused, say): resume after the highest
    ]
    assert len(list(tracking.StreamMetrics(iter(batches)))) == 4
    assert past(8, next_seq("rank0")) and past(0, next_seq("rank1"))
    written = tracking.GetMetricWriter(pb.GetMetricWriterRequest(run_id=run.run_id, writer_id="rank0"))
    assert (written.run_id, written.writer_id) == (run.run_id, "rank0")
    r = refusal(lambda: tracking.GetMetricWriter(pb.GetMetricWriterRequest(run_id="0" * 32, writer_id="rank0")))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "run_id")
    r = refusal(lambda: tracking.GetMetricWriter(pb.GetMetricWriterRequest(run_id=run.run_id, writer_id="")))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "writer_id")


def test_get_metric_writer_refuses_bad_input_without_waiting_for_queued_commits(settings, tracking) -> None:
    """It waits (up to 10 s) for batches queued for commit; arguments that can never be right are refused first."""
    import sqlite3

    run = _run(tracking, _experiment(tracking))
    holder = sqlite3.connect(settings.data_dir / "runledger.db", timeout=60)
    holder.execute("BEGIN IMMEDIATE")  # commits wait for this lock: a batch stays queued
    try:
        batch = pb.LogMetricsRequest(run_id=run.run_id, writer_id="w", seq=0, series=[_series("loss", [0], [0.5])])
        with pytest.raises(grpc.RpcError):
            tracking.LogMetrics(batch, timeout=0.3)
        for run_id, writer_id, field in ((run.run_id, "", "writer_id"), ("Bad Id", "w", "run_id")):
            req = pb.GetMetricWriterRequest(run_id=run_id, writer_id=writer_id)
            r = refusal(lambda req=req: tracking.GetMetricWriter(req, timeout=5))  # not after the 10 s wait
            assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field)
    finally:
        holder.rollback()
        holder.close()


def test_many_writers_into_one_run(tracking) -> None:
    run = _run(tracking, _experiment(tracking))

    def writer(rank: int):
        for seq in range(10):
            yield pb.StreamMetricsRequest(
                run_id=run.run_id,
                writer_id=f"rank{rank}",
                seq=seq,
                series=[_series("rl/reward", [seq], [rank + seq / 10])],
            )

    streams = [tracking.StreamMetrics(writer(rank)) for rank in range(4)]
    for s in streams:
        assert len(list(s)) == 10
    steps, values, _ = _history(tracking, run.run_id, "rl/reward")
    assert len(steps) == 40 and steps == sorted(steps)
    assert sorted(values) == sorted(rank + seq / 10 for rank in range(4) for seq in range(10))


def test_nan_and_infinities_round_trip_exactly(tracking) -> None:
    run = _run(tracking, _experiment(tracking))
    values = [0.5, math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308]
    tracking.LogMetrics(
        pb.LogMetricsRequest(
            run_id=run.run_id, writer_id="w", seq=0, series=[_series("train/loss", list(range(7)), values)]
        )
    )
    _, got, _ = _history(tracking, run.run_id, "train/loss")
    assert _bits(got) == _bits(values)
    latest = tracking.GetRun(pb.GetRunRequest(run_id=run.run_id)).latest_metrics["train/loss"]
    assert latest.step == 6 and latest.value == 1.7976931348623157e308
    tracking.LogMetrics(
        pb.LogMetricsRequest(run_id=run.run_id, writer_id="w", seq=1, series=[_series("train/loss", [7], [math.nan])])
    )
    latest = tracking.GetRun(pb.GetRunRequest(run_id=run.run_id)).latest_metrics["train/loss"]
    assert latest.step == 7 and math.isnan(latest.value)


def test_malformed_metric_batches_are_invalid_argument(channel: grpc.Channel, tracking) -> None:
    run = _run(tracking, _experiment(tracking))
    good = pb.LogMetricsRequest(
        run_id=run.run_id, writer_id="w", seq=0, series=[_series("ok", [1, 2], [1.0, 2.0])]
    ).SerializeToString()
    log = channel.unary_unary("/runledger.v1.TrackingService/LogMetrics")  # bytes in, bytes out
    stream = channel.stream_stream("/runledger.v1.TrackingService/StreamMetrics")
    for bad in (good[:-3], b"\x0a\x02\xff\xfe"):  # cut short; a run_id that is not UTF-8
        r = refusal(lambda bad=bad: log(bad))  # type: ignore[misc]
        assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "request")
        r = refusal(lambda bad=bad: list(stream(iter([bad]))))  # type: ignore[misc]
        assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "request")
    assert _history(tracking, run.run_id, "ok")[0] == []
    assert pb.LogMetricsResponse.FromString(log(good)).duplicate is False  # the well-formed batch goes in


def test_metric_refusals_store_nothing(tracking) -> None:
    run = _run(tracking, _experiment(tracking))
    bad = pb.LogMetricsRequest(
        run_id=run.run_id,
        writer_id="w",
        seq=0,
        series=[
            _series("ok", [1], [1.0]),
            tracking_pb2.MetricSeries(key="rl/kl", steps=[1, 2], values=[0.1], timestamps_ms=[1, 2]),
        ],
    )
    r = refusal(lambda: tracking.LogMetrics(bad))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and "rl/kl" in r.message and r.metadata["key"] == "rl/kl"
    assert _history(tracking, run.run_id, "ok")[0] == []
    r = refusal(lambda: tracking.LogMetrics(pb.LogMetricsRequest(run_id="ghost", writer_id="w", seq=0)))
    assert r.code == grpc.StatusCode.NOT_FOUND and r.metadata["field"] == "run_id"
    r = refusal(lambda: tracking.LogMetrics(pb.LogMetricsRequest(run_id=run.run_id, writer_id="", seq=0)))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "writer_id"
    twice = pb.LogMetricsRequest(
        run_id=run.run_id, writer_id="w", seq=0, series=[_series("ok", [1], [1.0]), _series("ok", [2], [2.0])]
    )
    r = refusal(lambda: tracking.LogMetrics(twice))  # one stored chunk per (key, writer, seq)
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "series.key" and "ok" in r.message
    # the same invalid batch over the stream ends the stream with the same status
    r = refusal(lambda: list(tracking.StreamMetrics(iter([pb.StreamMetricsRequest(**_fields(bad))]))))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["key"] == "rl/kl"
    # the batch was never recorded: a corrected batch with the same seq is stored, not a duplicate
    good = pb.LogMetricsRequest(run_id=run.run_id, writer_id="w", seq=0, series=[_series("ok", [1], [1.0])])
    assert tracking.LogMetrics(good).duplicate is False
    assert _history(tracking, run.run_id, "ok")[0] == [1]


def _fields(msg):
    return {f.name: v for f, v in msg.ListFields()}


def test_history_step_range_and_downsampling(tracking) -> None:
    run = _run(tracking, _experiment(tracking))
    n = 10_000
    values = [math.sin(i / 100) for i in range(n)]
    values[4321] = 50.0  # a spike
    values[777] = -50.0  # a collapse
    tracking.LogMetrics(
        pb.LogMetricsRequest(run_id=run.run_id, writer_id="w", seq=0, series=[_series("loss", list(range(n)), values)])
    )
    steps, _, _ = _history(tracking, run.run_id, "loss", start_step=100, end_step=199)
    assert steps == list(range(100, 200))
    steps, got, _ = _history(tracking, run.run_id, "loss", max_points=100)
    assert len(steps) <= 100 and steps[0] == 0 and steps[-1] == n - 1
    assert 4321 in steps and 777 in steps and max(got) == 50.0 and min(got) == -50.0
    assert steps == sorted(steps)
    r = refusal(
        lambda: list(
            tracking.GetMetricHistory(pb.GetMetricHistoryRequest(run_id=run.run_id, key="loss", max_points=-1))
        )
    )
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "max_points"


# ---- search ------------------------------------------------------------------------------------
def _seed_runs(tracking):
    exp = _experiment(tracking)
    runs = []
    for i, (lr, loss, team) in enumerate(
        [("1e-5", 0.9, "rl"), ("2e-5", 0.4, "sft"), ("3e-5", 0.7, "rl"), ("4e-5", None, "rl")]
    ):
        run = _run(tracking, exp, display_name=f"r{i}", params={"lr": lr}, tags={"team": team})
        if loss is not None:
            tracking.LogMetrics(
                pb.LogMetricsRequest(
                    run_id=run.run_id, writer_id="w", seq=0, series=[_series("train/loss", [5], [loss])]
                )
            )
        runs.append(run)
    tracking.UpdateRun(pb.UpdateRunRequest(run_id=runs[0].run_id, status=tracking_pb2.RUN_STATUS_FAILED))
    return exp, runs


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ('params.lr = "2e-5"', ["r1"]),
        ("params.lr >= '3e-5'", ["r2", "r3"]),
        ('tags.team = "rl"', ["r0", "r2", "r3"]),
        ("metrics.`train/loss` < 0.8", ["r1", "r2"]),
        ('metrics.train/loss < 0.8 AND tags.team = "rl"', ["r2"]),
        ('status = "FAILED"', ["r0"]),
        ("status IN ('RUNNING') and params.lr != '2e-5'", ["r2", "r3"]),
        ('display_name LIKE "r%"', ["r0", "r1", "r2", "r3"]),
        ('status LIKE "RUN%"', ["r1", "r2", "r3"]),  # a pattern over the stored status names
        ("status ILIKE '%ed'", ["r0"]),
        ("status = 'run_status_failed'", ["r0"]),
    ],
)
def test_search_filters(tracking, filter_text, expected) -> None:
    exp, _ = _seed_runs(tracking)
    found = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], filter=filter_text))
    assert [r.display_name for r in found.runs] == expected


def test_runs_are_searched_by_id_bare_or_by_their_resource_name(tracking) -> None:
    exp, runs = _seed_runs(tracking)
    for ref in (runs[2].run_id, f"runs/{runs[2].run_id}"):
        for text in (f"run_id = '{ref}'", f"run_id IN ('{ref}', 'runs/nope')"):
            found = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], filter=text))
            assert [r.display_name for r in found.runs] == ["r2"], text


def test_searching_an_experiment_that_does_not_exist_is_not_found(tracking) -> None:
    """A typo in an experiment name must not read as "no runs", alone or next to real experiments."""
    exp, _ = _seed_runs(tracking)
    for experiments in (["experiments/nope"], [exp.name, "experiments/nope"]):
        r = refusal(lambda e=experiments: tracking.SearchRuns(pb.SearchRunsRequest(experiments=e)))
        assert r.code == grpc.StatusCode.NOT_FOUND and r.metadata["field"] == "experiments"
        assert "experiments/nope" in r.message
    assert len(tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name])).runs) == 4


def test_search_by_start_and_end_time(tracking) -> None:
    """Imported runs keep their own start times: filters and order read those, in milliseconds."""
    exp = _experiment(tracking)
    for name, start_s in (("old", 1_600_000_000), ("mid", 1_650_000_000), ("new", 1_700_000_000)):
        run = _run(tracking, exp, display_name=name, start_time=Timestamp(seconds=start_s))
        if name != "new":  # "new" is still running: no end time
            end = Timestamp(seconds=start_s + 3_600)
            tracking.UpdateRun(
                pb.UpdateRunRequest(run_id=run.run_id, status=tracking_pb2.RUN_STATUS_FINISHED, end_time=end)
            )

    def names(filter_text: str = "", order_by: str = "") -> list[str]:
        found = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], filter=filter_text, order_by=order_by))
        return [r.display_name for r in found.runs]

    assert names("start_time >= 1650000000000") == ["mid", "new"]
    assert names("end_time < 1650000000000") == ["old"]  # a running run has no end time to compare
    assert names("start_time = 1650000000000") == ["mid"]  # whole milliseconds, as the API shows times
    assert names(order_by="start_time DESC") == ["new", "mid", "old"]
    assert names(order_by="end_time DESC") == ["mid", "old", "new"]  # without one: last
    r = refusal(lambda: tracking.SearchRuns(pb.SearchRunsRequest(filter="start_time LIKE '16%'")))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "filter"


def test_a_run_matches_its_own_create_time_in_milliseconds(tracking) -> None:
    exp = _experiment(tracking)
    run = _run(tracking, exp, display_name="me")
    ms = run.create_time.ToMilliseconds()  # what a user reads off the run

    def names(filter_text: str) -> list[str]:
        found = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], filter=filter_text))
        return [r.display_name for r in found.runs]

    assert names(f"create_time = {ms}") == ["me"] and names(f"create_time <= {ms}") == ["me"]
    assert names(f"create_time < {ms}") == [] and names(f"create_time > {ms}") == []


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_time_filters_compare_the_milliseconds_the_api_shows_before_1970_too(
    request: pytest.FixtureRequest, database: str
) -> None:
    """Every operator agrees with the times as GetRun shows them (rounded down to whole milliseconds), for
    starts before and after the epoch and for filter values with fractions, on both databases."""
    if database == "sqlite":
        _time_filters_agree(request.getfixturevalue("tracking"))
        return
    with EmbeddedServer(request.getfixturevalue("pg_settings")) as srv, grpc.insecure_channel(srv.address) as ch:
        _time_filters_agree(tracking_service_pb2_grpc.TrackingServiceStub(ch))


def _time_filters_agree(tracking: tracking_service_pb2_grpc.TrackingServiceStub) -> None:
    exp = _experiment(tracking)
    starts_us = [-10_000_500, -1_000, -500, 0, 999, 1_000, 1_500]
    shown: dict[str, int] = {}
    for i, us in enumerate(starts_us):
        start = Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1_000)
        run = _run(tracking, exp, display_name=f"r{i}", start_time=start)
        shown[run.display_name] = run.start_time.ToMilliseconds()
    assert shown["r2"] == -1 and shown["r0"] == -10_001  # what a user reads off these runs

    def names(filter_text: str) -> list[str]:
        found = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], filter=filter_text))
        return sorted(r.display_name for r in found.runs)

    checks = {
        "=": lambda ms, v: ms == v,
        "!=": lambda ms, v: ms != v,
        "<": lambda ms, v: ms < v,
        "<=": lambda ms, v: ms <= v,
        ">": lambda ms, v: ms > v,
        ">=": lambda ms, v: ms >= v,
    }
    for v in (-10_001, -10_000.5, -2, -1, -0.5, 0, 0.5, 1, 2):
        for op, holds in checks.items():
            expected = sorted(n for n, ms in shown.items() if holds(ms, v))
            assert names(f"start_time {op} {v}") == expected, (op, v)
    assert names("start_time IN (-1, 1, 0.5)") == ["r1", "r2", "r5", "r6"]
    assert names("start_time NOT IN (-1, 1)") == ["r0", "r3", "r4"]
    # The most values a list may hold (an OR of 1,000 ranges nested beyond SQLite's expression depth).
    many = ", ".join(str(v) for v in [-10_001, 0, *range(2, 1_000)])
    assert names(f"start_time IN ({many})") == ["r0", "r3", "r4"]
    assert names(f"start_time NOT IN ({many})") == ["r1", "r2", "r5", "r6"]


@pytest.mark.parametrize(
    "filter_text",
    [
        "params.x IN (" + ", ".join(f"'{i}'" for i in range(1_001)) + ")",  # beyond 1,000 values
        "params.x LIKE '" + "a%" * 6_000 + "'",  # a pattern SQLite would refuse as too complex
        "create_time > 1e30",  # beyond a 64-bit count of microseconds
        "params.x = 'a\x00b'",
        # 21 clauses, one beyond the limit (1,100 overflowed SQLite's expression depth; PostgreSQL planned 200
        # for 28 s)
        " AND ".join(f"params.p{i} = '1'" for i in range(21)),
    ],
)
def test_filters_beyond_the_databases_limits_are_invalid_argument(tracking, filter_text: str) -> None:
    r = refusal(lambda: tracking.SearchRuns(pb.SearchRunsRequest(filter=filter_text)))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "filter"), r.message


def test_a_filter_of_twenty_clauses_and_a_thousand_experiments_are_taken(tracking) -> None:
    exp = _experiment(tracking)
    run = _run(tracking, exp, params={f"p{i}": "1" for i in range(20)})
    twenty = " AND ".join(f"params.p{i} = '1'" for i in range(20))
    assert [r.run_id for r in tracking.SearchRuns(pb.SearchRunsRequest(filter=twenty)).runs] == [run.run_id]
    many = [exp.name] + [_experiment(tracking).name for _ in range(999)]  # each must exist
    assert len(tracking.SearchRuns(pb.SearchRunsRequest(experiments=many)).runs) == 1
    r = refusal(lambda: tracking.SearchRuns(pb.SearchRunsRequest(experiments=[*many, exp.name])))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "experiments")


def test_search_order_and_paging(tracking) -> None:
    exp, _ = _seed_runs(tracking)
    order = []
    token = ""
    while True:
        page = tracking.SearchRuns(
            pb.SearchRunsRequest(
                experiments=[exp.name], order_by="metrics.`train/loss` ASC", page_size=1, page_token=token
            )
        )
        order += [r.display_name for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert order == ["r1", "r2", "r0", "r3"]  # runs without the metric sort last
    desc = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], order_by="params.lr DESC"))
    assert [r.display_name for r in desc.runs] == ["r3", "r2", "r1", "r0"]
    first = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], page_size=2))
    r = refusal(
        lambda: tracking.SearchRuns(
            pb.SearchRunsRequest(experiments=[exp.name], order_by="params.lr", page_token=first.next_page_token)
        )
    )
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "page_token"


def check_paging_over_long_sort_values(tracking) -> None:
    """Runs ordered by a param of up to 1 MiB: a page token must not carry such a value (tokens past 16 KiB are
    refused unread), so the page after reads it again; pages still follow each other exactly."""
    exp = _experiment(tracking)
    common = "x" * 5000  # values alike over their first kilobytes: only the whole value orders them
    values = [common + tail for tail in ("b", "a", "c")] + ["short", common[:1024], common[:1025]]
    for i, v in enumerate(values):
        _run(tracking, exp, display_name=f"r{i}", params={"blob": v})
    for descending in (False, True):
        order, token, longest = [], "", 0
        while True:
            page = tracking.SearchRuns(
                pb.SearchRunsRequest(
                    experiments=[exp.name],
                    order_by=f"params.blob {'DESC' if descending else 'ASC'}",
                    page_size=1,
                    page_token=token,
                )
            )
            order += [r.params["blob"] for r in page.runs]
            token = page.next_page_token
            longest = max(longest, len(token))
            if not token:
                break
        assert order == sorted(values, reverse=descending)
        assert longest < 2048
    # A tag of 1,024 characters outside the BMP: 12 characters each in the token's JSON.
    emoji = [chr(0x1F600) * 1023 + tail for tail in "bca"]
    for i, v in enumerate(emoji):
        _run(tracking, exp, display_name=f"e{i}", tags={"mood": v})
    assert _all_pages(tracking, exp, "tags.mood") == sorted(emoji)
    # The run a page ended at changes its (long) sort value before the next page: refused, not a silent skip.
    long_tags = ["a" * 2000, "b" * 2000, "c" * 2000]
    moved = [_run(tracking, exp, display_name=f"t{i}", tags={"stage": v}) for i, v in enumerate(long_tags)]
    first = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], order_by="tags.stage", page_size=1))
    assert [r.tags["stage"] for r in first.runs] == long_tags[:1]
    tracking.SetTags(pb.SetTagsRequest(run_id=moved[0].run_id, tags={"stage": "z" * 2000}))
    r = refusal(
        lambda: tracking.SearchRuns(
            pb.SearchRunsRequest(
                experiments=[exp.name], order_by="tags.stage", page_size=1, page_token=first.next_page_token
            )
        )
    )
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.ABORTED, "PAGE_CURSOR_CHANGED", "page_token")
    # A forged cursor in that form is checked before it reaches the database.
    data = json.loads(base64.urlsafe_b64decode(first.next_page_token + "=" * (-len(first.next_page_token) % 4)))
    forgeries = [  # run IDs in JSON escapes: a lone surrogate, a NUL
        json.dumps({**data, "c": [data["c"][0], 0, "RUN"]}).replace("RUN", run_id) for run_id in (r"\ud800", r"a\u0000")
    ]
    forgeries.append(json.dumps({**data, "c": [{"reread": "Z" * 64}, *data["c"][1:]]}))  # not a digest
    for forged in forgeries:
        token = base64.urlsafe_b64encode(forged.encode()).decode().rstrip("=")
        r = refusal(
            lambda t=token: tracking.SearchRuns(
                pb.SearchRunsRequest(experiments=[exp.name], order_by="tags.stage", page_size=1, page_token=t)
            )
        )
        assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")


def _all_pages(tracking, exp, order_by: str) -> list[str]:
    key = order_by.split(".", 1)[1]
    out, token = [], ""
    while True:
        page = tracking.SearchRuns(
            pb.SearchRunsRequest(experiments=[exp.name], order_by=order_by, page_size=1, page_token=token)
        )
        out += [r.tags[key] for r in page.runs if key in r.tags]
        token = page.next_page_token
        if not token:
            return out


def test_pages_ordered_by_long_param_values_follow_each_other(tracking) -> None:
    check_paging_over_long_sort_values(tracking)


def test_a_page_token_longer_than_any_the_server_issues_is_refused_unread(tracking) -> None:
    exp = _experiment(tracking)
    forged = "A" * (40 << 20)  # decoding it would take several times its size
    for call in (
        lambda: tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], page_token=forged)),
        lambda: tracking.ListExperiments(pb.ListExperimentsRequest(page_token=forged)),
    ):
        r = refusal(call)
        assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "page_token"
        assert "longer than any token" in r.message  # refused for its length, before decoding


@pytest.mark.parametrize(
    ("filter_text", "order_by", "field"),
    [
        ("params.lr ~ 1", "", "filter"),
        ("bogus = 1", "", "filter"),
        ("metrics.loss < 'x'", "", "filter"),
        ("params.lr = 2e-5", "", "filter"),  # params are text: quote the value as it was logged
        ("", "a b c", "order_by"),
    ],
)
def test_search_refusals(tracking, filter_text, order_by, field) -> None:
    r = refusal(lambda: tracking.SearchRuns(pb.SearchRunsRequest(filter=filter_text, order_by=order_by)))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == field


# ---- LIKE and ILIKE: the same runs on SQLite and PostgreSQL (test_postgres_tracking.py runs these too) ----
PATTERN_RUNS = {  # display_name: (params.optimizer, tags.team)
    "adam": ("Adam", "RL"),
    "adamw": ("adamw", "rl"),
    "AdamW": ("AdamW", "rl-infra"),
    "sgd": ("SGD", ""),
    "underscore": ("a_b", ""),
    "x": ("axb", ""),
    "backslash": ("C:\\opt\\a", ""),
    "quote": ("it's", ""),
    "e-acute-upper": ("École", ""),
    "e-acute-lower": ("école", ""),
}
PATTERN_FILTERS = {
    "params.optimizer LIKE 'Adam%'": ["adam", "AdamW"],
    "params.optimizer ILIKE 'Adam%'": ["adam", "adamw", "AdamW"],
    "params.optimizer ilike 'ADAMW'": ["adamw", "AdamW"],
    "params.optimizer LIKE 'adam_'": ["adamw"],
    "params.optimizer LIKE 'sgd'": [],
    "params.optimizer ILIKE 'sgd'": ["sgd"],
    "params.optimizer LIKE 'a_b'": ["underscore", "x"],
    r"params.optimizer LIKE 'a\\_b'": ["underscore"],  # a backslash in the pattern escapes the `_`
    r"params.optimizer ILIKE 'A\\_B'": ["underscore"],
    r"params.optimizer LIKE 'C:\\\\opt%'": ["backslash"],  # and `\\` is one literal backslash
    r"params.optimizer LIKE 'it\'s'": ["quote"],
    'params.optimizer LIKE "it\'s%"': ["quote"],
    "params.optimizer LIKE '%cole'": ["e-acute-upper", "e-acute-lower"],
    "params.optimizer ILIKE 'é%'": ["e-acute-lower"],  # ILIKE folds A-Z only, whatever the database's locale
    "params.optimizer ILIKE 'É%'": ["e-acute-upper"],
    "tags.team LIKE 'rl%'": ["adamw", "AdamW"],
    "tags.team ILIKE 'rl%'": ["adam", "adamw", "AdamW"],
    "display_name LIKE 'Adam%'": ["AdamW"],
    "display_name ILIKE 'ADAM%' AND params.optimizer LIKE 'A%'": ["adam", "AdamW"],
}


def check_pattern_filters(tracking) -> None:
    """Seed PATTERN_RUNS in a new experiment and check every filter of PATTERN_FILTERS, and ILIKE on experiments."""
    exp = tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="Patterns"))
    for name, (optimizer, team) in PATTERN_RUNS.items():
        tags = {"team": team} if team else {}
        _run(tracking, exp, display_name=name, params={"optimizer": optimizer}, tags=tags)
    found = {
        text: [
            r.display_name for r in tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], filter=text)).runs
        ]
        for text in PATTERN_FILTERS
    }
    assert found == PATTERN_FILTERS

    for text, expected in [("display_name LIKE 'patterns'", []), ("display_name ILIKE 'patterns'", ["Patterns"])]:
        listed = tracking.ListExperiments(pb.ListExperimentsRequest(filter=text))
        assert [e.display_name for e in listed.experiments] == expected, text

    # A pattern ending in a backslash escapes nothing: PostgreSQL would fail on it, SQLite match nothing.
    r = refusal(lambda: tracking.SearchRuns(pb.SearchRunsRequest(filter=r"params.optimizer LIKE 'adam\\'")))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "filter"


def test_like_is_case_sensitive_and_ilike_is_not(tracking) -> None:
    check_pattern_filters(tracking)


# ---- eval results and sweeps ---------------------------------------------------------------------
SUITE = "mmlu@abcd"


def _sweep(tracking, scores, suite=SUITE):
    exp = _experiment(tracking)
    runs = {}
    for name, score in scores:
        run = _run(tracking, exp, display_name=name)
        s = suite if not isinstance(score, tuple) else score[1]
        v = score if not isinstance(score, tuple) else score[0]
        tracking.LogEvalResult(pb.LogEvalResultRequest(run_id=run.run_id, suite_fingerprint=s, metrics={"mmlu": v}))
        runs[name] = run.run_id
    return exp, runs


def _select(tracking, **kw):
    kw.setdefault("metric", "mmlu")
    kw.setdefault("direction", common_pb2.DIRECTION_MAXIMIZE)
    return tracking.SelectWinner(pb.SelectWinnerRequest(**kw))


def test_select_winner_reference_sweep(tracking) -> None:
    exp, runs = _sweep(tracking, [("r0", 0.61), ("r1", 0.66), ("r2", 0.59), ("r3", 0.64)])
    out = _select(tracking, experiment=exp.name)
    assert out.winner_run_id == runs["r1"] and out.score == 0.66 and out.suite_fingerprint == SUITE
    assert [c.run_id for c in out.cohort] == [runs[n] for n in ("r1", "r3", "r0", "r2")]
    by_ids = _select(tracking, run_ids=list(runs.values()))
    assert by_ids.winner_run_id == runs["r1"]


def test_select_winner_minimize_and_ties(tracking) -> None:
    exp, runs = _sweep(tracking, [("a", 0.9), ("b", 0.4), ("c", 0.7)])
    assert _select(tracking, experiment=exp.name, direction=common_pb2.DIRECTION_MINIMIZE).winner_run_id == runs["b"]
    exp2, runs2 = _sweep(tracking, [("first", 0.7), ("second", 0.7)])
    assert _select(tracking, experiment=exp2.name).winner_run_id == runs2["first"]


def test_select_winner_refuses_mixed_suites(tracking) -> None:
    exp, runs = _sweep(tracking, [("r0", 0.61), ("phantom", (0.99, "easyeval@zzzz"))])
    r = refusal(lambda: _select(tracking, experiment=exp.name))
    assert r.code == grpc.StatusCode.FAILED_PRECONDITION and r.reason == "INCOMPARABLE_EVAL_SUITES"
    assert SUITE in r.message and "easyeval@zzzz" in r.message
    named = _select(tracking, experiment=exp.name, suite_fingerprint=SUITE)
    assert named.winner_run_id == runs["r0"]  # the phantom never wins
    assert [(e.run_id, e.reason) for e in named.excluded] == [(runs["phantom"], "OTHER_EVAL_SUITE")]


def test_select_winner_refuses_runs_of_another_suite_that_alone_carry_the_metric_name(tracking) -> None:
    """The sweep's runs were scored as `mmlu`; a phantom on another suite reported `accuracy`. Asked for
    `accuracy`, the phantom alone has the metric, but the candidates span two suites: refused, not crowned."""
    exp, runs = _sweep(tracking, [("r0", 0.61), ("r1", 0.66)])
    phantom = _run(tracking, exp, display_name="phantom").run_id
    tracking.LogEvalResult(
        pb.LogEvalResultRequest(run_id=phantom, suite_fingerprint="easyeval@zzzz", metrics={"accuracy": 0.99})
    )
    r = refusal(lambda: _select(tracking, experiment=exp.name, metric="accuracy"))
    assert (r.code, r.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INCOMPARABLE_EVAL_SUITES")
    assert r.metadata["suiteFingerprints"] == f"easyeval@zzzz,{SUITE}"
    named = _select(tracking, experiment=exp.name, suite_fingerprint=SUITE)  # the sweep's own suite, named
    assert named.winner_run_id == runs["r1"]
    excluded = [(e.run_id, e.reason, list(e.suite_fingerprints)) for e in named.excluded]
    assert excluded == [(phantom, "NOT_SCORED", ["easyeval@zzzz"])]  # no `mmlu` at all; where it was scored


def test_eval_results_are_immutable_and_finite(tracking) -> None:
    run = _run(tracking, _experiment(tracking))
    tracking.LogEvalResult(pb.LogEvalResultRequest(run_id=run.run_id, suite_fingerprint=SUITE, metrics={"mmlu": 0.6}))
    again = tracking.LogEvalResult(
        pb.LogEvalResultRequest(run_id=run.run_id, suite_fingerprint=SUITE, metrics={"mmlu": 0.6, "gsm8k": 0.7})
    )
    assert again.metrics == {"mmlu": 0.6, "gsm8k": 0.7}
    r = refusal(
        lambda: tracking.LogEvalResult(
            pb.LogEvalResultRequest(run_id=run.run_id, suite_fingerprint=SUITE, metrics={"mmlu": 0.99})
        )
    )
    assert (
        r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "EVAL_RESULT_IMMUTABLE" and r.metadata["key"] == "mmlu"
    )
    r = refusal(
        lambda: tracking.LogEvalResult(
            pb.LogEvalResultRequest(run_id=run.run_id, suite_fingerprint=SUITE, metrics={"arc": math.nan})
        )
    )
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "metrics[arc]"
    out = _select(tracking, run_ids=[run.run_id])
    assert out.score == 0.6


def test_select_winner_refusals(tracking) -> None:
    exp = _experiment(tracking)
    run = _run(tracking, exp)
    r = refusal(lambda: _select(tracking, experiment=exp.name, direction=common_pb2.DIRECTION_UNSPECIFIED))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "direction"
    r = refusal(lambda: _select(tracking, experiment=exp.name))
    assert r.code == grpc.StatusCode.FAILED_PRECONDITION and r.reason == "NO_SCORED_RUNS"
    r = refusal(lambda: _select(tracking, run_ids=[run.run_id, "ghost"]))
    assert r.code == grpc.StatusCode.NOT_FOUND and "ghost" in r.message
    r = refusal(lambda: _select(tracking))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "run_ids"
    r = refusal(lambda: _select(tracking, run_ids=[run.run_id], filter='tags.keep = "yes"'))  # would be ignored
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "filter")
    r = refusal(lambda: _select(tracking, experiment="experiments/nope"))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "experiment")
    r = refusal(lambda: _select(tracking, experiment="experiments/bad id"))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "experiment")
    # Hundreds of unknown IDs: NOT_FOUND naming a few (a status listing all of them would not fit gRPC's headers).
    ghosts = [f"ghost{i:04d}" for i in range(600)]
    r = refusal(lambda: _select(tracking, run_ids=[run.run_id, *ghosts]))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "run_ids")
    assert "600 runs not found" in r.message and "ghost0000" in r.message and "and 595 more" in r.message
    r = refusal(lambda: _select(tracking, run_ids=[f"r{i}" for i in range(10_001)]))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "run_ids")


def test_select_winner_over_runs_read_in_several_batches(tracking) -> None:
    _, runs = _sweep(tracking, [(f"r{i}", 0.5 + (i % 97) / 1000) for i in range(1_200)])
    out = _select(tracking, run_ids=list(runs.values()))
    assert out.winner_run_id == runs["r96"] and len(out.cohort) == 1_200  # the first run with the top score


def test_params_and_tags_of_a_run_are_bounded_together_and_pages_stay_within_the_message_limit(
    server: EmbeddedServer,
) -> None:
    """Each value may hold 1 MiB, but not without end: past the per-run bound a write is refused and changes
    nothing (the run stays readable), and SearchRuns shortens a page of large runs instead of failing."""
    from runledger_server.domain import names

    big = "x" * names.MAX_VALUE
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        exp = _experiment(tracking)
        run_id = _run(tracking, exp).run_id
        tracking.LogParams(pb.LogParamsRequest(run_id=run_id, params={f"p{i}": big for i in range(3)}))
        r = refusal(lambda: tracking.LogParams(pb.LogParamsRequest(run_id=run_id, params={"p3": big})))
        assert (r.code, r.reason, r.metadata["field"]) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RUN_METADATA_TOO_LARGE",
            "params",
        )
        r = refusal(lambda: tracking.SetTags(pb.SetTagsRequest(run_id=run_id, tags={"t": big})))
        assert (r.code, r.metadata["field"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "tags")
        tracking.SetTags(pb.SetTagsRequest(run_id=run_id, tags={"small": "ok"}))
        r = refusal(lambda: _run(tracking, exp, params={f"p{i}": big for i in range(5)}))
        assert r.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        got = tracking.GetRun(pb.GetRunRequest(run_id=run_id))
        assert sorted(got.params) == ["p0", "p1", "p2"] and dict(got.tags) == {"small": "ok"}

        ids = {run_id} | {_run(tracking, exp, params={f"p{i}": big for i in range(3)}).run_id for _ in range(5)}
        seen, token, sizes = [], "", []
        while True:
            page = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], page_size=100, page_token=token))
            seen += [r.run_id for r in page.runs]
            sizes.append(page.ByteSize())
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(ids) and len(sizes) > 1  # every run once, over shortened pages
        assert max(sizes) < 32 << 20


def test_stopping_the_server_ends_open_metric_streams_at_once_with_shutting_down(settings) -> None:
    """A trainer's stream stays open between batches: a stop acknowledges what the stream took, then ends it
    with UNAVAILABLE SHUTTING_DOWN (the writer re-sends the rest elsewhere) instead of holding the whole grace
    period and being cancelled without a reason."""
    import queue
    import threading

    from tests.support import refusal

    srv = EmbeddedServer(settings).start()
    stopped = False
    try:
        with grpc.insecure_channel(srv.address) as ch:
            tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            run = _run(tracking, _experiment(tracking))
            outbox: queue.Queue[pb.StreamMetricsRequest | None] = queue.Queue()

            def requests():  # a trainer between steps: the stream stays open
                while (req := outbox.get()) is not None:
                    yield req

            call = tracking.StreamMetrics(requests())
            outbox.put(
                pb.StreamMetricsRequest(run_id=run.run_id, writer_id="w", seq=0, series=[_series("x", [0], [1.0])])
            )
            assert next(call).seq == 0
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 60})
            stopper.start()
            r = refusal(lambda: next(call))
            assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
            outbox.put(None)
            stopper.join(timeout=30)
            assert not stopper.is_alive()  # not held for the 60 s grace by the open stream
            stopped = True
    finally:
        if not stopped:
            srv.stop()
    with EmbeddedServer(settings) as again, grpc.insecure_channel(again.address) as ch:
        steps, _, _ = _history(tracking_service_pb2_grpc.TrackingServiceStub(ch), run.run_id, "x")
        assert steps == [0]


def test_a_stop_acknowledges_every_batch_it_stored_even_with_the_stream_s_acks_queue_full(settings) -> None:
    """A stream holds at most MAX_IN_FLIGHT_PER_STREAM batches awaiting their commit. With commits held back (a
    write lock held outside), the reader submitted the next batch and then waited for room in the ack queue;
    a stop cancelled it there, so that batch was stored and never acknowledged. Every stored batch is now
    acknowledged before SHUTTING_DOWN."""
    import queue
    import sqlite3
    import threading

    from runledger_server.transport.tracking_servicer import MAX_IN_FLIGHT_PER_STREAM

    srv = EmbeddedServer(settings).start()
    acks: list[int] = []
    ended: list[grpc.RpcError] = []
    try:
        with grpc.insecure_channel(srv.address) as ch:
            tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            run = _run(tracking, _experiment(tracking))
            holder = sqlite3.connect(settings.data_dir / "runledger.db", timeout=60, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # every group commit waits for this lock now
            outbox: queue.Queue[pb.StreamMetricsRequest | None] = queue.Queue()

            def requests():
                while (req := outbox.get()) is not None:
                    yield req

            call = tracking.StreamMetrics(requests())

            def consume() -> None:
                try:
                    acks.extend(a.seq for a in call)
                except grpc.RpcError as exc:
                    ended.append(exc)

            consumer = threading.Thread(target=consume)
            consumer.start()
            for seq in range(MAX_IN_FLIGHT_PER_STREAM + 6):
                outbox.put(
                    pb.StreamMetricsRequest(
                        run_id=run.run_id, writer_id="w", seq=seq, series=[_series("x", [seq], [1.0])]
                    )
                )
            time.sleep(1.0)  # the server takes what the stream's room lets it
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30})
            stopper.start()
            time.sleep(0.5)
            holder.rollback()  # the commits go through now
            holder.close()
            consumer.join(timeout=60)
            stopper.join(timeout=60)
            outbox.put(None)
    finally:
        if srv._server is not None:
            srv.stop()
    assert len(ended) == 1 and ended[0].code() == grpc.StatusCode.UNAVAILABLE
    with EmbeddedServer(settings) as again, grpc.insecure_channel(again.address) as ch:
        steps, _, _ = _history(tracking_service_pb2_grpc.TrackingServiceStub(ch), run.run_id, "x")
    assert len(steps) >= MAX_IN_FLIGHT_PER_STREAM and sorted(steps) == sorted(acks) == list(range(len(steps)))


def test_a_search_page_of_runs_with_many_latest_metrics_is_shortened(server: EmbeddedServer) -> None:
    """Latest metrics count toward a page's size like params and tags: runs with thousands of long metric keys
    (per-layer statistics) filled a default page past gRPC's 64 MiB, and no page of them could be read."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        exp = _experiment(tracking)
        keys = [f"layer{j:05d}/" + "g" * 238 for j in range(8_000)]  # 250 characters, the longest key
        ids = set()
        for _ in range(5):  # 5 x 8,000 x (250 + 40) = 11.6M characters, beyond one page's 8 Mi
            run_id = _run(tracking, exp).run_id
            batch = pb.LogMetricsRequest(
                run_id=run_id, writer_id="w", seq=0, series=[_series(k, [0], [0.5]) for k in keys]
            )
            tracking.LogMetrics(batch)
            ids.add(run_id)
        seen, token, pages = [], "", 0
        while True:
            page = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name], page_size=100, page_token=token))
            seen += [r.run_id for r in page.runs]
            assert all(len(r.latest_metrics) == len(keys) for r in page.runs)
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(ids) and pages > 1  # every run once, over shortened pages
