"""The server starts, answers health checks and creates a run over loopback."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runledger.v1 import tracking_service_pb2 as pb
from tests.support import refusal


def test_health_and_create_run(channel: grpc.Channel, tracking) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="runledger.v1.TrackingService")).status == 1
    exp = tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="smoke"))
    run = tracking.CreateRun(pb.CreateRunRequest(experiment=exp.name, display_name="r0", params={"lr": "2e-5"}))
    assert run.run_id and run.params["lr"] == "2e-5"
    r = refusal(lambda: tracking.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={"lr": "3e-5"})))
    assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "PARAM_IMMUTABLE" and "lr" in r.message
