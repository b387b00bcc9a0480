"""A forked child (e.g. a DataLoader worker) does not inherit the parent's metric sender, channel or writer ID."""

from __future__ import annotations

import os

import pytest

import runledger
from runledger.v1 import tracking_pb2

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def test_child_gets_a_fresh_writer_and_no_inherited_points() -> None:
    # Nothing listens on port 1: the parent's sender keeps its point and retries in the background.
    client = runledger.Client("127.0.0.1:1", writer_id="rank0")
    run = runledger.Run(client, tracking_pb2.Run(run_id="r1", name="runs/r1"), writer_id="rank0", owns_status=True)
    run.log_metrics({"loss": 1.0}, step=0)
    assert client.channel is not None and run.logged_points == 1
    pid = os.fork()
    if pid == 0:  # the child: check without touching gRPC, report through the exit code
        ok = (
            run._stream is None
            and run.logged_points == 0
            and run.writer_id.startswith("rank0-fork-")
            and not run.owns_status
            and client._channel is None
            # runs the child starts or attaches through the inherited client are new writers too
            and client.writer_id is not None
            and client.writer_id.startswith("rank0-fork-")
        )
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent is untouched
    assert run.writer_id == "rank0" and run.logged_points == 1 and run.owns_status and client.writer_id == "rank0"
    stream = run._stream
    assert stream is not None
    stream.abandon()
    client.close()


def test_a_client_or_run_sent_to_a_spawned_worker_says_what_to_do_instead() -> None:
    import pickle

    client = runledger.Client("127.0.0.1:1")
    run = runledger.Run(client, tracking_pb2.Run(run_id="r1", name="runs/r1"), writer_id=None, owns_status=False)
    with pytest.raises(TypeError, match=r"attach_run\(run_id\)"):
        pickle.dumps(client)
    with pytest.raises(TypeError, match="'r1'"):
        pickle.dumps(run)
    client.close()
