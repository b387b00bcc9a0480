"""`runledger serve` as users start it: flags and env, the ready line, health, reflection, graceful stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from runledger.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    tracking_pb2,
    tracking_service_pb2 as pb,
    tracking_service_pb2_grpc,
)
from runledger_server import config


def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runledger_server", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("runledger listening on "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split()[-1]


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def test_serve_flags_health_reflection_and_graceful_stop(tmp_path: Path) -> None:
    proc, address = _start(["--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "d")])
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "runledger.v1.TrackingService", "runledger.v1.RegistryService"):
                resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            answer = next(
                iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            )
            names = {s.name for s in answer.list_services_response.service}
            assert {
                "runledger.v1.TrackingService",
                "runledger.v1.ArtifactService",
                "runledger.v1.RegistryService",
            } <= names
            stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            exp = stub.CreateExperiment(pb.CreateExperimentRequest(display_name="cli"))
            run = stub.CreateRun(pb.CreateRunRequest(experiment=exp.name))
            stub.LogMetrics(
                pb.LogMetricsRequest(
                    run_id=run.run_id,
                    writer_id="w",
                    seq=0,
                    series=[tracking_pb2.MetricSeries(key="loss", steps=[1], values=[0.5], timestamps_ms=[1])],
                )
            )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "runledger serving on 127.0.0.1" in err
    finally:
        _reap(proc)
    # the data directory holds the SQLite database; a restart on it sees the acknowledged point
    proc, address = _start(["--port", "0"], env={"RUNLEDGER_DATA_DIR": str(tmp_path / "d")})
    try:
        with grpc.insecure_channel(address) as ch:
            stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            got = stub.GetRun(pb.GetRunRequest(run_id=run.run_id), timeout=5)
            assert got.latest_metrics["loss"].value == 0.5
        assert (tmp_path / "d" / "runledger.db").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_env_port_and_flag_precedence(tmp_path: Path) -> None:
    proc, address = _start(["--data-dir", str(tmp_path)], env={"RUNLEDGER_PORT": "0", "RUNLEDGER_HOST": "127.0.0.1"})
    try:
        assert address.startswith("127.0.0.1:") and not address.endswith(":50051")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_bad_database_url_fails_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runledger_server", "serve", "--port", "0", "--db", "nosuchdb://x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "nosuchdb" in proc.stderr


def test_metric_cache_size_from_flag_or_env_reaches_the_server(tmp_path: Path) -> None:
    proc, _ = _start(
        ["--port", "0", "--data-dir", str(tmp_path / "a"), "--metric-cache-mib", "0"],
        env={"RUNLEDGER_METRIC_CACHE_MIB": "64"},
    )
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "metric cache: 0 MiB" in err  # the flag wins over the environment
    proc, _ = _start(["--port", "0", "--data-dir", str(tmp_path / "b")], env={"RUNLEDGER_METRIC_CACHE_MIB": "64"})
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "metric cache: 64 MiB" in err


def test_bad_settings_are_refused_naming_the_flag_and_variable(tmp_path: Path) -> None:
    cases = [
        (["--metric-cache-mib", "-1"], {}, "--metric-cache-mib (env RUNLEDGER_METRIC_CACHE_MIB)"),
        ([], {"RUNLEDGER_METRIC_CACHE_MIB": "lots"}, "--metric-cache-mib (env RUNLEDGER_METRIC_CACHE_MIB)"),
        (["--port", "70000"], {}, "--port (env RUNLEDGER_PORT)"),
        (["--history-max-points", "5000"], {}, "--history-max-points (env RUNLEDGER_HISTORY_MAX_POINTS)"),
        (["--search-budget-seconds", "0"], {}, "--search-budget-seconds (env RUNLEDGER_SEARCH_BUDGET_SECONDS)"),
        (
            [],
            {"RUNLEDGER_SEARCH_BUDGET_SECONDS": "1.5"},
            "--search-budget-seconds (env RUNLEDGER_SEARCH_BUDGET_SECONDS)",
        ),
        ([], {"RUNLEDGER_PORT": "http"}, "--port (env RUNLEDGER_PORT)"),
        (["--port", "http"], {}, "--port (env RUNLEDGER_PORT)"),  # argparse's own refusal named no variable
        (["--s3-secure", "maybe"], {}, "--s3-secure (env RUNLEDGER_S3_SECURE)"),
        (["--s3-secure", ""], {"RUNLEDGER_S3_SECURE": "true"}, "--s3-secure (env RUNLEDGER_S3_SECURE)"),
        ([], {"RUNLEDGER_S3_SECURE": "enable"}, "--s3-secure (env RUNLEDGER_S3_SECURE)"),  # was read as false
        ([], {"AWS_REGION": "eu west 1"}, "env AWS_REGION"),  # the SDK would refuse it only at startup
        ([], {"AWS_REGION": "", "AWS_DEFAULT_REGION": "-x"}, "env AWS_DEFAULT_REGION"),
        # a location that looks like a store is not made a directory of that name
        (["--artifacts", "S3://models/runs"], {}, "write s3:// in lower case"),
        (["--artifacts", "gs://models/runs"], {}, "--artifacts (env RUNLEDGER_ARTIFACTS)"),
        (["--artifacts", "s3:///runs"], {}, "names no bucket"),
        (["--artifacts", "s3://ab/runs"], {}, "not a valid S3 bucket name"),  # the SDK raised ValueError
        (["--artifacts", "s3://ab-.cd/runs"], {}, "not a valid S3 bucket name"),
        (["--artifacts", "s3://xn--models/runs"], {}, "not a valid S3 bucket name"),  # AWS's rule, on AWS
        (["--artifacts", "s3://10.0.0.1/runs"], {}, "not a valid S3 bucket name"),
        # S3 settings with local artifacts: each replica would keep its artifacts on its own disk
        (["--s3-endpoint", "minio:9000"], {}, "give --artifacts s3://bucket/prefix"),
        ([], {"RUNLEDGER_S3_SECURE": "true"}, "give --artifacts s3://bucket/prefix"),
        (["--db", "mysql://db/runs"], {}, "--db (env RUNLEDGER_DB)"),
        (["--db", "sqlite://"], {}, "in-memory SQLite"),  # each pooled connection would see its own empty one
        (["--db", "sqlite:///:memory:"], {}, "in-memory SQLite"),
        (["--db", "postgresql://bob:pw@db:notaport/rl"], {}, "is not a valid URL"),
        (["--artifacts", "s3://models/runs", "--s3-endpoint", "minio:99999"], {}, "--s3-endpoint"),
        (["--artifacts", "s3://Bad_Bucket/runs", "--s3-endpoint", "minio:9000"], {}, "not a valid S3 bucket name"),
        (["--log-level", "LOUD"], {}, "--log-level"),
    ]
    for args, env, named in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "runledger_server", "serve", "--data-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert proc.returncode == 2 and named in proc.stderr, (args, env, proc.stderr)
        assert not (tmp_path / "runledger.db").exists()  # refused before anything was created


@pytest.mark.parametrize(
    ("env", "region"),
    [
        ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-west-2"}, "eu-west-1"),
        ({"AWS_DEFAULT_REGION": "us-west-2"}, "us-west-2"),  # what AWS tools fall back to
        ({"AWS_REGION": "", "AWS_DEFAULT_REGION": "ap-south-1"}, "ap-south-1"),  # set but empty is unset
        ({}, ""),  # none: the SDK asks the bucket, rather than signing for a guessed us-east-1
    ],
)
def test_s3_region_comes_from_aws_region_then_aws_default_region(env: dict[str, str], region: str) -> None:
    assert config.from_argv([], env).s3.region == region


def test_s3_session_token_is_read_for_temporary_credentials() -> None:
    env = {"AWS_ACCESS_KEY_ID": "ASIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"}
    s3 = config.from_argv([], env).s3
    assert (s3.access_key, s3.secret_key, s3.session_token) == ("ASIAEXAMPLE", "secret", "token")
    assert config.from_argv([], {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}).s3.session_token == ""


def test_settings_take_postgres_urls_as_tools_write_them_and_empty_variables_as_unset() -> None:
    assert config.from_argv(["--db", "postgres://u@db:5432/runs"], {}).db_url == "postgresql+psycopg://u@db:5432/runs"
    assert config.from_argv([], {"RUNLEDGER_DB": "postgresql://db/runs"}).db_url == "postgresql+psycopg://db/runs"
    settings = config.from_argv([], {"RUNLEDGER_HOST": "", "RUNLEDGER_DATA_DIR": "", "RUNLEDGER_PORT": ""})
    assert (settings.host, settings.data_dir, settings.port) == (
        config.DEFAULT_HOST,
        Path(config.DEFAULT_DATA_DIR),
        config.DEFAULT_PORT,
    )


def test_log_level_is_taken_after_the_command_too(tmp_path: Path) -> None:
    proc, _ = _start(["--port", "0", "--data-dir", str(tmp_path / "a"), "--log-level", "debug"], env={})
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert " DEBUG " in err


def test_serving_on_a_taken_port_says_so_without_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "runledger_server", "serve", "--port", str(port), "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_database_migrated_by_a_newer_runledger_is_refused_plainly(tmp_path: Path) -> None:
    """A server must not run on a schema it does not know: it says so, naming the database, and starts nothing
    (it used to stop on Alembic's bare "Can't locate revision", in a traceback)."""
    import sqlite3

    from runledger_server.config import Settings
    from runledger_server.embedded import EmbeddedServer

    with EmbeddedServer(Settings(host="127.0.0.1", port=0, data_dir=tmp_path)):
        pass
    with sqlite3.connect(tmp_path / "runledger.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_from_the_future' WHERE rowid = 1")
    proc = subprocess.run(
        [sys.executable, "-m", "runledger_server", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "was migrated by a newer runledger" in proc.stderr and "runledger.db" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_mistyped_database_url_is_refused_without_showing_its_password(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runledger_server",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--db",
            "postgresql:/bob:S3cr3t@db/rl",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--db (env RUNLEDGER_DB)" in proc.stderr, proc.stderr
    assert "S3cr3t" not in proc.stderr and "bob:***@db" in proc.stderr, proc.stderr


@pytest.mark.parametrize("failure", ["artifacts is a file", "database unreachable"])
def test_a_store_that_cannot_be_used_at_start_up_is_said_in_one_line(tmp_path: Path, failure: str) -> None:
    """Not a traceback: the artifact location or the database named, with the reason, and exit status 1."""
    args = ["--port", "0", "--data-dir", str(tmp_path / "data")]
    if failure == "artifacts is a file":
        (tmp_path / "afile").write_text("not a directory")
        args += ["--artifacts", str(tmp_path / "afile")]
        expected = "afile"
    else:
        with socket.socket() as s:  # nothing listens there once the socket is closed
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args += ["--db", f"postgresql://bob:S3cr3t@127.0.0.1:{port}/rl"]
        expected = "metadata database"
    proc = subprocess.run(
        [sys.executable, "-m", "runledger_server", "serve", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and expected in proc.stderr and "S3cr3t" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("runledger serve: "), proc.stderr  # after the INFO log


def test_serve_listens_on_a_bare_ipv6_address(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    proc, address = _start(["--host", "::1", "--port", "0", "--data-dir", str(tmp_path)])
    try:
        port = address.rsplit(":", 1)[1]
        with grpc.insecure_channel(f"[::1]:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        _reap(proc)


@pytest.mark.parametrize("reached", ["by one path", "by a symlink"])
def test_two_servers_started_together_on_one_sqlite_file_both_come_up(tmp_path: Path, reached: str) -> None:
    """They migrate in turns (a file lock), as replicas do on PostgreSQL; one used to die of `database is locked`.
    The lock is the file's own, however a server names it (SQLite itself follows the symlink)."""
    for attempt in range(3):
        data = tmp_path / f"d{attempt}"
        second = ["--data-dir", str(data)]
        if reached == "by a symlink":
            data.mkdir()
            alias = tmp_path / f"alias{attempt}.db"
            alias.symlink_to(data / "runledger.db")
            second = ["--data-dir", str(tmp_path / f"other{attempt}"), "--db", f"sqlite:///{alias}"]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "runledger_server", "serve", "--port", "0", *flags],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for flags in (["--data-dir", str(data)], second)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                failed = "" if line else proc.stderr.read()[-2000:]  # type: ignore[union-attr]
                assert line.startswith("runledger listening on "), (line, proc.poll(), failed)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                _reap(proc)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://admin:Tr0ub/4dor@db.example:54x32/runs",  # a '/' in the password, unencoded
        "postgresql://admin:pa:Tr0ub4dor@db.example:notaport/runs",  # a ':'
        "postgresql://admin:p@Tr0ub4dor@db.example:notaport/runs",  # an '@'
    ],
)
def test_a_refused_database_url_never_shows_any_part_of_its_password(url: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.from_argv(["--db", url])
    assert "Tr0ub" not in str(info.value) and "admin:***@" in str(info.value), info.value


def test_s3_endpoints_as_the_store_takes_them_and_ports_out_of_range_are_refused() -> None:
    for endpoint in ("https://s3.example.com", "http://minio:9000/", "minio:9000", "[::1]:9000"):
        assert config.from_argv(["--s3-endpoint", endpoint, "--artifacts", "s3://models/p"]).s3.endpoint == endpoint
    for argv in (
        ["--s3-endpoint", "https://minio:0", "--artifacts", "s3://models/p"],
        ["--db", "postgresql://u@h:70000/d"],
    ):
        with pytest.raises(config.ConfigError):
            config.from_argv(argv)


def test_a_start_up_failure_without_a_message_is_still_one_line() -> None:
    from sqlalchemy.exc import OperationalError

    from runledger_server.cli import _one_line

    said = _one_line(OperationalError("SELECT 1", {}, Exception()))
    assert said == "the metadata database refused the connection or the schema: Exception"


def test_a_second_signal_cuts_the_grace_period_short(tmp_path: Path) -> None:
    """A call that would outlast the grace period (an upload its client stalled) holds the first stop for up to
    10 s; a second Ctrl-C or SIGTERM ends it at once, and the server still exits cleanly."""
    proc, address = _start(["--port", "0", "--data-dir", str(tmp_path / "d")])
    try:
        with grpc.insecure_channel(address) as ch:
            tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            exp = tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="stalled"))
            run = tracking.CreateRun(pb.CreateRunRequest(experiment=exp.name))
            release = threading.Event()

            def stalled() -> Iterator[artifact_service_pb2.UploadArtifactRequest]:
                yield artifact_service_pb2.UploadArtifactRequest(
                    header=artifact_service_pb2.UploadArtifactHeader(run_id=run.run_id, path="ckpt.bin")
                )
                yield artifact_service_pb2.UploadArtifactRequest(chunk=b"x" * 1024)
                release.wait(60)  # the client goes quiet mid-upload

            upload = artifact_service_pb2_grpc.ArtifactServiceStub(ch).UploadArtifact.future(stalled())
            time.sleep(0.5)  # the upload is under way on the server
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)
            assert proc.poll() is None  # the first signal waits for the upload (grace: 10 s)
            second = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            took = time.monotonic() - second
            release.set()
            with pytest.raises(grpc.RpcError) as info:
                upload.result(timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.returncode == 0, err
        assert took < 5, took  # generous: well under the 10 s grace that remained
        assert "second signal" in err
    finally:
        _reap(proc)
