"""A forked child (e.g. a DataLoader worker) does not inherit the parent's metric sender, channel or writer ID."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_a_child_forked_during_a_download_does_not_keep_its_lock(tmp_path: Path) -> None:
    """A DataLoader worker forked while another thread downloads: the child's copy of the lock must not keep
    the next download of that file waiting until the child exits."""
    import threading
    import time

    from runledger import artifacts as client_artifacts

    target = tmp_path / "ckpt.bin"
    with client_artifacts._one_download_at_a_time(target):
        pid = os.fork()
        if pid == 0:  # the child lives on for a while, as a worker does
            time.sleep(5)
            os._exit(0)
    took: list[float] = []

    def next_download() -> None:
        start = time.monotonic()
        with client_artifacts._one_download_at_a_time(target):
            took.append(time.monotonic() - start)

    follower = threading.Thread(target=next_download, daemon=True)
    follower.start()
    follower.join(3)
    try:
        assert took and took[0] < 1.0, "the next download waited for the forked child"
        assert not list(tmp_path.iterdir())  # the lock file is gone with its holder
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_downloads_of_different_files_into_one_directory_do_not_wait_for_each_other(tmp_path: Path) -> None:
    import threading

    from runledger import artifacts as client_artifacts

    entered = threading.Event()
    with client_artifacts._one_download_at_a_time(tmp_path / "a.bin"):  # a long download of a.bin under way

        def other() -> None:
            with client_artifacts._one_download_at_a_time(tmp_path / "b.bin"):
                entered.set()

        threading.Thread(target=other, daemon=True).start()
        assert entered.wait(3), "b.bin waited for a.bin"
