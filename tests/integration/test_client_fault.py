"""SIGKILL the server while four writers stream into one run; after a restart nothing is lost or doubled."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import runledger
from runledger import RetryPolicy, errors
from runledger.v1 import tracking_pb2
from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer
from tests.integration.test_client_tracking import _take_next_batch_number

WRITERS = 4
KEYS = ("train/loss", "train/reward")
STEPS = 25_000  # per writer and key: 4 writers x 2 keys x 25,000 = 200,000 points


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll state the client exposes; the state change is the event waited for."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


class ServerProcess:
    """`python -m runledger_server serve` on a fixed port and data directory, as a child process."""

    def __init__(self, port: int, data_dir: Path, log: Path) -> None:
        self.port, self.data_dir, self.log = port, data_dir, log
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "runledger_server", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # blocks until the server prints its address (or exits)
            if line.startswith("runledger listening on "):
                address = line.removeprefix("runledger listening on ").strip()
                assert address == f"127.0.0.1:{self.port}"
                return address
        raise AssertionError(f"server exited with {self.proc.wait()}:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL
        self.proc.stdout.close()  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.mark.slow
def test_server_killed_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    address = server.start()
    # Small batches and a short backoff: many batches are in flight when the kill lands, and the
    # writers find the restarted server quickly.
    client = runledger.Client(
        address, batch_points=2_000, max_in_flight=8, retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5)
    )
    try:
        owner = client.start_run(experiment="fault", name="sigkill", writer_id="rank0")
        runs = [owner] + [client.attach_run(owner.run_id, writer_id=f"rank{r}") for r in range(1, WRITERS)]
        killed = threading.Event()
        failures: list[BaseException] = []

        def train(rank: int, run: runledger.Run) -> None:
            try:
                for step in range(STEPS):
                    if step == STEPS // 2:
                        killed.wait(timeout=120)  # the second half is logged after the kill, whatever the timing
                    value = rank * 1e6 + step
                    run.log_metrics({KEYS[0]: value, KEYS[1]: -value}, step=step)
                run.flush(timeout=120)
            except BaseException as exc:
                failures.append(exc)
                raise

        threads = [threading.Thread(target=train, args=(rank, run)) for rank, run in enumerate(runs)]
        for t in threads:
            t.start()

        # Kill once every writer has had acknowledgements and batches are still awaiting theirs.
        wait_until(lambda: all(r.acked_points > 0 for r in runs) and any(r.in_flight_batches for r in runs))
        unacked_at_kill = sum(r.logged_points - r.acked_points for r in runs)
        server.kill()
        killed.set()
        assert unacked_at_kill > 0

        server.start()  # same data directory, same port
        for t in threads:
            t.join(timeout=180)
        assert not failures and not any(t.is_alive() for t in threads)
        for run in runs[1:]:
            run.finish()
        owner.finish()

        assert sum(r.acked_points for r in runs) == sum(r.logged_points for r in runs) == WRITERS * STEPS * len(KEYS)
        assert all(r.reconnections >= 1 for r in runs)
        for key, sign in zip(KEYS, (1.0, -1.0), strict=True):
            history = client.metric_history(owner.run_id, key)
            stored = Counter(zip(history.steps.tolist(), history.values.tolist(), strict=True))
            logged = Counter((step, sign * (rank * 1e6 + step)) for rank in range(WRITERS) for step in range(STEPS))
            assert len(history.steps) == WRITERS * STEPS
            assert stored == logged  # no point lost, none stored twice
        info = client.get_run(owner.run_id)
        assert info.status == tracking_pb2.RUN_STATUS_FINISHED
        print(
            f"unacknowledged at kill: {unacked_at_kill} points; "
            f"batches re-sent: {sum(r.resent_batches for r in runs)}; "
            f"reconnections: {[r.reconnections for r in runs]}"
        )
    finally:
        client.close()
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_logs_as_its_own_writer(tmp_path: Path) -> None:
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    client = runledger.Client(server.start())
    try:
        run = client.start_run(experiment="fork", writer_id="rank0")
        run.log_metrics({"loss": 1.0}, step=0)
        run.flush()  # the parent's sender thread and channel are live when it forks
        pid = os.fork()
        if pid == 0:  # a DataLoader-like worker: gets a fresh channel and writer, lazily
            code = 1
            try:
                run.log_metrics({"loss": 2.0}, step=1)
                run.flush(timeout=30)
                code = 0 if run.acked_points == 1 and run.writer_id.startswith("rank0-fork-") else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        run.log_metrics({"loss": 3.0}, step=2)  # the parent's sender carries on, its seqs unaffected
        run.finish()
        history = client.metric_history(run.run_id, "loss")
        assert history.steps.tolist() == [0, 1, 2] and history.values.tolist() == [1.0, 2.0, 3.0]
    finally:
        client.close()
        server.stop()


TRAINER_WITH_A_WORKER = """
import multiprocessing as mp
import sys
import runledger

def worker(run):  # a DataLoader-like worker: logs through the inherited run and returns, no flush
    for step in range(1000):
        run.log_metrics({"worker/x": float(step)}, step=step)

if __name__ == "__main__":
    client = runledger.Client(sys.argv[1])
    run = client.start_run(experiment="worker-exit")
    run.log_metrics({"main/x": 0.0}, step=0)
    run.flush()
    p = mp.get_context("fork").Process(target=worker, args=(run,))
    p.start()
    p.join()
    run.finish()
    print(p.exitcode, run.run_id, flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_points_of_a_multiprocessing_worker_are_flushed_when_it_returns(tmp_path: Path) -> None:
    # multiprocessing ends its workers with os._exit(): no atexit there, so the flush must ride its finalizers.
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    address = server.start()
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER_WITH_A_WORKER)
    try:
        done = subprocess.run([sys.executable, str(script), address], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        exitcode, run_id = done.stdout.split()
        assert exitcode == "0"
        with runledger.Client(address) as client:
            assert client.metric_history(run_id, "worker/x").steps.tolist() == list(range(1000))
            assert client.metric_history(run_id, "main/x").steps.tolist() == [0]
    finally:
        server.stop()


TRAINER_WITHOUT_FINISH = """
import sys
import runledger
client = runledger.Client(sys.argv[1])
run = client.start_run(experiment="exit")
for step in range(1000):
    run.log_metrics({"loss": float(step)}, step=step)
print(run.run_id, flush=True)
# no flush, no finish: the interpreter exits with the points still buffered
"""


@pytest.mark.slow
def test_points_of_an_unfinished_run_are_flushed_at_exit(tmp_path: Path) -> None:
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    address = server.start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", TRAINER_WITHOUT_FINISH, address], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        run_id = done.stdout.strip()
        with runledger.Client(address) as client:
            history = client.metric_history(run_id, "loss")
            assert history.steps.tolist() == list(range(1000))
            assert client.get_run(run_id).status == tracking_pb2.RUN_STATUS_RUNNING  # unknown outcome: left as is
    finally:
        server.stop()


@pytest.mark.slow
def test_registry_calls_ride_out_a_server_restart(tmp_path: Path) -> None:
    """Reads retry; a write waits for the server to be reachable before it is sent, so one made while the server
    restarts goes through once (the channel's reconnect backoff after a restart failed writes for ~4 s)."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    client = runledger.Client(server.start(), timeout=60, retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5))
    try:
        client.registry.create_model("served")
        server.stop()
        restarted = threading.Timer(1.0, server.start)
        restarted.start()
        started = time.monotonic()
        created = client.registry.create_model("while-down")  # sent once the server is back
        assert created.name == "models/while-down" and time.monotonic() - started >= 0.5
        restarted.join()
        assert [m.name for m in client.registry.list_models()] == ["models/served", "models/while-down"]
        client.create_gate("served", "g", suite_fingerprint="s@1", metric="acc", threshold=0.5)
        server.stop()
        restarted = threading.Timer(1.0, server.start)
        restarted.start()
        started = time.monotonic()
        assert client.registry.get_model("served").name == "models/served"  # a read waits for the server
        assert time.monotonic() - started >= 0.5
        restarted.join()
    finally:
        client.close()
        server.stop()


@pytest.mark.slow
def test_an_alias_watch_ends_promptly_at_shutdown_and_rides_out_the_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopping server ends its watches with UNAVAILABLE instead of holding its stop for the grace period;
    the client's watch opens again on the restarted server, without repeating the state it passed on."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    client = runledger.Client(server.start(), timeout=60, retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5))
    events: list[tuple[int, int]] = []
    failure: list[BaseException] = []
    caplog.set_level(logging.INFO, logger="runledger.registry")
    try:
        adapter = tmp_path / "adapter.bin"
        adapter.write_bytes(b"weights")
        lineage = {"data_version": "d1", "code_commit": "c1", "config": {}, "base_model": "b", "seed": 0}
        with client.start_run(experiment="watch", lineage=lineage) as run:
            run.log_artifact(adapter, "adapter.bin")
        version = client.register(run, model="served", artifact_path="adapter.bin").version
        client.create_gate("served", "g", suite_fingerprint="suite@1", metric="accuracy", threshold=0.5)
        client.record_gate_result("served", "g", version, 0.9)
        watch = client.watch_alias("served", "production")

        def follow() -> None:
            try:
                for event in watch:
                    events.append((event.alias.revision, event.alias.version))
                    if event.alias.revision == 1:
                        return
            except BaseException as exc:
                failure.append(exc)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events == [(0, 0)]  # the current state: never set

        assert server.proc is not None
        stopping = time.monotonic()
        server.proc.terminate()  # a graceful stop (10 s of grace by default)
        assert server.proc.wait(timeout=30) == 0
        assert time.monotonic() - stopping < 5  # not held open by the watch
        server.stop()
        assert follower.is_alive() and not failure  # waiting for the server, not ended
        assert "the server is shutting down" in caplog.text  # the status the stream ended with
        server.start()
        client.registry.get_model("served")  # a read waits out the channel's reconnect; a write would not
        client.set_alias("served", "production", version, gate="g")
        follower.join(30)
        assert not failure and not follower.is_alive()
        assert events == [(0, 0), (1, version)]  # the restarted stream's first state (0) was not passed on again

        server.stop()  # gone for longer than the client's timeout: the watch gives up with Unavailable
        with runledger.Client(f"127.0.0.1:{server.port}", timeout=1) as brief, pytest.raises(errors.Unavailable):
            next(iter(brief.watch_alias("served", "production")))
    finally:
        client.close()
        server.stop()


def test_a_garbled_status_detail_from_a_proxy_is_still_a_typed_error() -> None:
    """A proxy (or a broken server) may send a `grpc-status-details-bin` trailer that does not parse: the error
    keeps the call's own status code and message instead of failing while it is built."""

    def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("grpc-status-details-bin", b"\xff\x00 not a Status"),))
        context.abort(grpc.StatusCode.UNAVAILABLE, "upstream connect error")

    class Refuser(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Refuser()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/runledger.v1.TrackingService/GetRun")
            with pytest.raises(grpc.RpcError) as info:
                call(b"")
        err = errors.from_rpc_error(info.value)
        assert isinstance(err, errors.Unavailable) and err.message == "upstream connect error"
        assert errors.is_transient(err)  # not the server's own answer: a transport failure, retried
    finally:
        server.stop(None)


def test_every_point_taken_while_finish_runs_is_stored(tmp_path: Path) -> None:
    """A second thread (system metrics, say) logs while the main thread finishes the run: each of its calls is
    either refused (RUN_CLOSED) or its point is stored; finish() never returns with a taken point unsent."""
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")
    with EmbeddedServer(settings) as srv, runledger.Client(srv.address) as client:
        for attempt in range(5):
            run = client.start_run(experiment="finish-race")
            taken: list[int] = []
            started = threading.Event()

            def system_metrics(
                run: runledger.Run = run, taken: list[int] = taken, started: threading.Event = started
            ) -> None:
                step = 0
                while True:
                    try:
                        run.log_metrics({"gpu/util": float(step)}, step=step)
                    except errors.FailedPrecondition:
                        return
                    taken.append(step)
                    step += 1
                    if step == 1_000:
                        started.set()

            logger = threading.Thread(target=system_metrics, daemon=True)
            logger.start()
            assert started.wait(30)
            run.finish(timeout=60)
            logger.join(30)
            assert not logger.is_alive()
            assert run.acked_points == run.logged_points == len(taken)
            history = client.metric_history(run.run_id, "gpu/util")
            assert history.steps.tolist() == taken, attempt


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["finish", "close"])
def test_a_call_waiting_for_room_when_the_run_ends_is_refused_and_takes_nothing(tmp_path: Path, ending: str) -> None:
    """With the server away the buffer fills and log_metrics waits for room; the run is then finished (or its
    client closed) from another thread. The waiting call is refused as RUN_CLOSED: its point must not be stored
    too, or a caller that logs it again would store it twice."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    address = server.start()
    try:
        client = runledger.Client(address, max_buffered_points=1_000, batch_points=100, timeout=None)
        run = client.start_run(experiment="full-then-closed")
        run.log_metrics({"a": -1.0}, step=-1)
        run.flush()
        server.kill()  # acknowledgements stop: the buffer fills
        returned: list[int] = []
        refused: list[int] = []

        def trainer() -> None:
            for step in range(10_000):
                try:
                    run.log_metrics({"a": float(step)}, step=step)
                except errors.FailedPrecondition as exc:
                    assert exc.reason == "RUN_CLOSED", exc
                    refused.append(step)
                    return
                returned.append(step)

        logger = threading.Thread(target=trainer, daemon=True)
        logger.start()
        wait_until(lambda: run.logged_points - run.acked_points >= 1_000)
        time.sleep(0.3)  # the next call is waiting for room now
        assert logger.is_alive() and not refused
        end = (
            threading.Thread(target=run.finish, kwargs={"timeout": 60})
            if ending == "finish"
            else threading.Thread(target=client.close, kwargs={"timeout": 60})
        )
        end.start()
        logger.join(30)
        assert not logger.is_alive() and len(refused) == 1
        server.start()  # the ending's flush now stores what the calls that returned took
        end.join(90)
        assert not end.is_alive()
        with runledger.Client(address) as reader:
            stored = reader.metric_history(run.run_id, "a").steps.tolist()
        assert stored == [-1, *returned], (refused, stored[-3:])
    finally:
        server.stop()


TRAINER_INTERRUPTED_WHILE_FINISHING = """
import os, signal, sys, threading, time
from pathlib import Path
from typing import Any
import runledger
address, go_down, back_up = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
client = runledger.Client(address, retry=runledger.RetryPolicy(initial_backoff=0.05, max_backoff=0.2))
run = client.start_run(experiment="interrupted")
print(run.run_id, flush=True)
try:
    with run:
        for step in range(1000):
            run.log_metrics({"loss": float(step)}, step=step)
        run.flush()
        go_down.touch()  # the server is stopped now; the rest waits in the client
        while go_down.exists():
            time.sleep(0.02)
        for step in range(1000, 2000):
            run.log_metrics({"loss": float(step)}, step=step)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C while finishing
except KeyboardInterrupt:
    print("interrupted", flush=True)
while not back_up.exists():
    time.sleep(0.02)
# the interpreter exits: the exit flush delivers what the interrupted finish still held
"""


@pytest.mark.slow
def test_points_still_queued_when_ctrl_c_interrupts_finish_are_flushed_at_exit(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(port, tmp_path / "data", tmp_path / "server.log")
    address = server.start()
    script, go_down, back_up = tmp_path / "trainer.py", tmp_path / "go-down", tmp_path / "back-up"
    script.write_text(TRAINER_INTERRUPTED_WHILE_FINISHING)
    child = subprocess.Popen(
        [sys.executable, str(script), address, str(go_down), str(back_up)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        run_id = child.stdout.readline().strip()
        wait_until(go_down.exists)
        server.stop()
        go_down.unlink()
        assert child.stdout.readline().strip() == "interrupted"
        server.start()
        back_up.touch()
        assert child.wait(timeout=60) == 0
        with runledger.Client(address) as client:
            assert client.metric_history(run_id, "loss").steps.tolist() == list(range(2000))
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
        server.stop()


TRAINER_WITH_THREE_UNFINISHED_RUNS = """
import sys, time
import runledger
from runledger import _process
_process.EXIT_FLUSH_TIMEOUT = 1.0
client = runledger.Client(sys.argv[1])
runs = [client.start_run(experiment="exit-deadline") for _ in range(3)]
for run in runs:
    run.log_metrics({"loss": 1.0}, step=0)
print("logged", flush=True)
sys.stdin.readline()  # the server is gone now
print(time.monotonic(), flush=True)
"""


@pytest.mark.slow
def test_the_exit_flush_waits_once_for_all_unfinished_runs_not_once_each(tmp_path: Path) -> None:
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    address = server.start()
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER_WITH_THREE_UNFINISHED_RUNS)
    child = subprocess.Popen(
        [sys.executable, str(script), address], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "logged"
        server.stop()
        child.stdin.write("\n")
        child.stdin.flush()
        exiting = float(child.stdout.readline())
        assert child.wait(timeout=60) == 0
        took = time.monotonic() - exiting
        assert took < 2.5, f"the exit flush took {took:.1f} s for three runs at 1 s"  # was 3 x 1 s in turn
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
        server.stop()


CTRL_C_WHILE_LOGGING = """
import collections, os, random, signal, sys, threading
import numpy
import runledger
from runledger.v1 import tracking_pb2
random.seed(1)
client = runledger.Client("127.0.0.1:1", batch_interval=30.0, batch_points=1_000_000)  # nothing listens there
main = threading.main_thread().ident
outcomes = collections.Counter()
for trial in range(int(sys.argv[1])):
    run = runledger.Run(client, tracking_pb2.Run(run_id=f"r{trial}"), writer_id=None, owns_status=False)
    run.log_metrics({"loss": 0.5, "lr": 1.0}, step=0)  # the stream is open before the interrupt can come
    step = 1
    interrupted = threading.Event()

    def interrupt(delay):
        threading.Event().wait(delay)
        while not interrupted.is_set():
            signal.pthread_kill(main, signal.SIGINT)
            # A KeyboardInterrupt raised inside a weakref callback or a __del__ (the garbage of earlier trials)
            # is dropped by Python ("Exception ignored"): the loop goes on, and the Ctrl-C is sent again.
            interrupted.wait(0.5)

    timer = threading.Thread(target=interrupt, args=(random.uniform(0.002, 0.02),))
    try:
        timer.start()
        while True:  # every other value a numpy scalar: the Python path too, where the C buffer's rows are added
            run.log_metrics({"loss": 0.5 if step % 2 else numpy.float64(0.5), "lr": 1.0}, step=step)
            step += 1
            if step % 64 == 0:  # a flush cuts batches on this thread: the interrupt may land in a cut
                try:
                    run.flush(timeout=0.0001)
                except runledger.errors.DeadlineExceeded:
                    pass
    except KeyboardInterrupt:
        interrupted.set()
    timer.join()
    stream = run._stream
    if not stream._lock.acquire(timeout=1.0):
        outcomes["lock left held"] += 1
        continue
    try:
        groups = stream._buffer._groups
        rows = sum(g.rows * len(g.keys) for g in groups)
        # Python groups hold three lists appended one after the other; C groups append a row in one step.
        ragged = any(len(g.values) != len(g.steps) * len(g.keys) or len(g.stamps) != len(g.steps)
                     for g in groups if isinstance(getattr(g, "steps", None), list))
        # Steps 0..step-1 were logged, and step itself if the interrupt came after its row was added.
        lost = stream.logged_points not in (2 * step, 2 * step + 2)
        outcomes["ragged" if ragged else "miscounted" if rows != stream._buffer.points else "lost" if lost
                 else "consistent"] += 1
    finally:
        stream._lock.release()
    stream.abandon()
print(dict(outcomes), flush=True)
os._exit(0)  # a writer left locked would hang the exit flush: report rather than hang
"""


@pytest.mark.slow
@pytest.mark.parametrize("buffer", ["c", "python"])
def test_ctrl_c_while_logging_never_leaves_the_writer_locked_or_inconsistent(tmp_path: Path, buffer: str) -> None:
    """A real SIGINT at a random moment of a log_metrics loop with a flush now and then, 300 times: the lock taken
    right before an interrupt was left held in 3% of trials (finish and the exit flush then waited forever), and
    an interrupt inside a flush's cut lost the rows it had taken."""
    script = tmp_path / "interrupted.py"
    script.write_text(CTRL_C_WHILE_LOGGING)
    env = {**os.environ, "RUNLEDGER_PURE_PYTHON": "1" if buffer == "python" else ""}
    done = subprocess.run([sys.executable, str(script), "300"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "{'consistent': 300}", done.stdout


def test_a_named_writer_against_a_server_without_get_metric_writer_numbers_from_zero() -> None:
    """A server from before GetMetricWriter answers it UNIMPLEMENTED: a named writer then numbers its batches from
    0, as it did with such servers, instead of failing its metric stream for good."""
    from runledger.v1 import tracking_service_pb2 as tpb

    stored: list[tuple[str, int]] = []

    def stream_metrics(requests: Any, context: grpc.ServicerContext) -> Any:
        for raw in requests:
            request = tpb.StreamMetricsRequest.FromString(raw)
            stored.append((request.writer_id, request.seq))
            yield tpb.StreamMetricsResponse(writer_id=request.writer_id, seq=request.seq).SerializeToString()

    class OldServer(grpc.GenericRpcHandler):  # StreamMetrics only; every other method is UNIMPLEMENTED
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if details.method.endswith("/StreamMetrics"):
                return grpc.stream_stream_rpc_method_handler(stream_metrics)
            return None

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[OldServer()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with runledger.Client(f"127.0.0.1:{port}", writer_id="rank0") as client:
            run = runledger.Run(client, tracking_pb2.Run(run_id="r1"), writer_id="rank0", owns_status=False)
            for step in range(10):
                run.log_metrics({"loss": float(step)}, step=step)
            run.flush(timeout=30)
            assert run.acked_points == 10 and run._stream is not None and run._stream.error is None
            run._stream.close(timeout=30)
        assert stored and stored[0] == ("rank0", 0)
    finally:
        server.stop(None)


def test_log_artifact_waits_for_a_restarting_server_and_a_directory_conflict_is_refused_before_sending(
    tmp_path: Path,
) -> None:
    """An upload met a server restarting and failed at once (UNAVAILABLE), where every other call waits for it;
    and a changed directory uploaded again over a recorded one recorded its new files before the first conflict
    refused it, leaving a mix of both."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    client = runledger.Client(server.start(), timeout=60, retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5))
    restarted = threading.Timer(1.0, server.start)
    try:
        weights = tmp_path / "weights.bin"
        weights.write_bytes(os.urandom(3 << 20))
        run = client.start_run(experiment="restart-upload")
        server.stop()
        restarted.start()
        recorded = run.log_artifact(weights, "weights.bin")  # sent once the server is back
        restarted.join()
        assert [(a.path, a.size) for a in recorded] == [("weights.bin", 3 << 20)]
        assert [a.path for a in client.list_artifacts(run.run_id)] == ["weights.bin"]

        first = tmp_path / "adapter-1"
        first.mkdir()
        (first / "b_weights.bin").write_bytes(b"one")
        run.log_artifact(first, "adapter")
        second = tmp_path / "adapter-2"
        second.mkdir()
        (second / "a_readme.md").write_text("new")  # sorts first: it was sent before the conflict was found
        (second / "b_weights.bin").write_bytes(b"two")
        with pytest.raises(errors.AlreadyExists) as refused:
            run.log_artifact(second, "adapter")
        assert refused.value.reason == "ARTIFACT_IMMUTABLE" and "adapter/b_weights.bin" in str(refused.value)
        assert [a.path for a in client.list_artifacts(run.run_id, prefix="adapter/")] == ["adapter/b_weights.bin"]
        again = run.log_artifact(first, "adapter")  # the same directory again: nothing new, nothing refused
        assert [a.path for a in again] == ["adapter/b_weights.bin"]
        run.finish()
    finally:
        restarted.cancel()  # a failure before the restart: it must not start a server after the test
        if restarted.is_alive():
            restarted.join()
        client.close()
        server.stop()


def test_an_interrupted_run_with_the_server_away_says_what_it_waits_for_and_gives_up_promptly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C with the server unreachable waited silently for the flush and then 30 s more (the client's
    timeout) to mark the run FAILED; now it says what it waits for, and the status gets a brief try, as KILLED."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    client = runledger.Client(server.start(), timeout=30, finish_timeout=0.5)
    try:
        run = client.start_run(experiment="interrupted")
        server.stop()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt), run:
            for step in range(1_000):
                run.log_metrics({"loss": 1.0}, step=step)
            raise KeyboardInterrupt
        waited = time.monotonic() - start
        said = capsys.readouterr().err
        assert f"runledger: run {run.run_id} stopped; storing up to" in said and "interrupt again" in said
        assert waited < 15, f"the interrupted exit took {waited:.1f} s"  # 0.5 s flush + 2 s status, not 30
    finally:
        with contextlib.suppress(errors.RunledgerError):  # the server is gone: nothing left to send matters
            client.close(timeout=1)
        server.stop()


@pytest.mark.slow
def test_a_colliding_batch_re_sent_after_a_restart_is_refused_not_counted_as_stored(tmp_path: Path) -> None:
    """Another writer under the same writer_id stored a batch under the number this writer's next batch takes,
    which is in flight when the server dies. Re-sent after the restart, it must be refused as WRITER_ID_REUSED,
    not acknowledged as already stored (its points were never stored)."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    address = server.start()
    client = runledger.Client(address, retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5))
    try:
        first = client.start_run(experiment="fault", name="shared-writer", writer_id="rank0")
        first.log_metrics({"first": 0.0}, step=0)
        first.flush(timeout=30)
        _take_next_batch_number(address, server.data_dir, first.run_id, "rank0")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # the colliding batch is sent, and never acknowledged
        first.log_metrics({"first": 1.0}, step=1)
        wait_until(lambda: first.in_flight_batches > 0)
        server.kill()
        server.start()
        with pytest.raises(errors.AlreadyExists) as info:
            first.flush(timeout=60)
        assert info.value.reason == "WRITER_ID_REUSED" and first.resent_batches >= 1
        assert (first.logged_points, first.acked_points) == (2, 1)
        assert client.metric_history(first.run_id, "first").values.tolist() == [0.0]
        assert client.metric_history(first.run_id, "other").values.tolist() == [9.0]
    finally:
        client.close()
        server.stop()


def test_finishing_with_the_server_away_says_what_it_waits_for_and_a_timeout_says_the_points_are_given_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `with` block's normal end waits for the server (finish_timeout None): silently, it looked hung. After a
    few seconds it now says on stderr what it holds. A close() that times out gives the points up, and says so
    (its error said they were kept and still being sent)."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    client = runledger.Client(server.start(), timeout=30)
    try:
        run = client.start_run(experiment="away")
        run.log_metrics({"loss": 1.0}, step=0)
        run.flush(timeout=30)
        server.stop()
        for step in range(1, 1_000):
            run.log_metrics({"loss": 1.0}, step=step)
        with pytest.raises(errors.DeadlineExceeded) as timed_out:
            run.finish(timeout=4.0)
        said = capsys.readouterr().err
        assert f"runledger: run {run.run_id} (finishing): storing 999 points it still holds" in said, said
        # A Ctrl-C in a finish keeps the points for the exit flush: the notice promises nothing of the kind.
        assert "up to 1 s more" in said and "Ctrl-C" not in said, said
        assert timed_out.value.reason == "FLUSH_TIMEOUT" and "given up" in str(timed_out.value)
        assert "timed out after 4.0 s" in str(timed_out.value)  # the whole timeout, not the part after the notice
        assert "kept and still being sent" not in str(timed_out.value)
        assert timed_out.value.metadata["pendingPoints"] == "999"
    finally:
        with contextlib.suppress(errors.RunledgerError):
            client.close(timeout=1)
        server.stop()


EXIT_WITH_THE_SERVER_AWAY = """
import sys
import runledger
from runledger import _process

_process.EXIT_FLUSH_TIMEOUT = 5.0  # 30 s by default
client = runledger.Client(sys.argv[1])
run = client.start_run(experiment="exit-away")
run.log_metrics({"loss": 1.0}, step=0)
run.flush(timeout=30)
print(run.run_id, flush=True)
sys.stdin.readline()  # the server is gone now
for step in range(1, 500):
    run.log_metrics({"loss": 1.0}, step=step)
"""


def _run_losing_the_server(tmp_path: Path, source: str) -> tuple[str, str, float]:
    """Run a trainer script that prints its run ID and then waits for a line; the server is stopped before the line
    is sent. Returns the run ID, the script's stderr and the seconds it took to end after the server was gone."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    script = tmp_path / "trainer.py"
    script.write_text(source)
    proc = subprocess.Popen(
        [sys.executable, str(script), server.start()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        run_id = proc.stdout.readline().strip()
        server.stop()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        started = time.monotonic()
        _, err = proc.communicate(timeout=120)
        return run_id, err, time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.stop()


@pytest.mark.slow
def test_a_script_exiting_with_the_server_away_says_what_its_exit_waits_for(tmp_path: Path) -> None:
    run_id, err, _ = _run_losing_the_server(tmp_path, EXIT_WITH_THE_SERVER_AWAY)
    expected = f"runledger: run {run_id} (the process is exiting): storing 499 points it still holds; waiting up to"
    assert expected in err and "Ctrl-C gives them up" in err, err


INTERRUPTED_TWICE = """
import signal, sys, threading, time
import runledger

client = runledger.Client(sys.argv[1], timeout=30)
run = client.start_run(experiment="interrupted-twice")
print(run.run_id, flush=True)
sys.stdin.readline()  # the server is gone now
main = threading.get_ident()

def second_ctrl_c():
    time.sleep(1.0)  # while the first one's exit waits to store the points
    signal.pthread_kill(main, signal.SIGINT)

with run:
    for step in range(1_000):
        run.log_metrics({"loss": 1.0}, step=step)
    threading.Thread(target=second_ctrl_c, daemon=True).start()
    raise KeyboardInterrupt
"""


@pytest.mark.slow
def test_a_second_ctrl_c_gives_the_points_up_as_the_notice_says(tmp_path: Path) -> None:
    """The first Ctrl-C's notice says "interrupt again to give them up"; the second one ended the finish, but the
    exit flush then waited for the same points for up to 30 s more, without a word."""
    run_id, err, took = _run_losing_the_server(tmp_path, INTERRUPTED_TWICE)
    assert f"runledger: run {run_id} stopped; storing up to 1,000 points" in err, err
    assert f"runledger: run {run_id}: gave up 1,000 points" in err, err
    assert took < 15, f"the process took {took:.1f} s to end after the second Ctrl-C"  # 1 s + 2 s status try


def test_closing_the_client_gives_up_every_run_s_points_not_only_the_first(tmp_path: Path) -> None:
    """close() with two runs holding points and the server gone: the first failure is raised, and every sender
    is stopped (the second one's kept running after close() had returned)."""
    server = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    client = runledger.Client(server.start(), timeout=30)
    try:
        runs = [client.start_run(experiment="close-two") for _ in range(2)]
        for run in runs:
            run.log_metrics({"loss": 1.0}, step=0)
            run.flush(timeout=30)
        server.stop()
        for run in runs:
            run.log_metrics({"loss": 2.0}, step=1)
        with pytest.raises(errors.DeadlineExceeded) as info:
            client.close(timeout=2)
        assert "given up" in str(info.value)
        streams = [run._stream for run in runs]
        assert all(stream is not None and stream._stop_now for stream in streams)  # both given up at once
    finally:
        server.stop()
