"""An embedded server (notebooks, demos, tests) starts and stops cleanly in one process, again and again, and
one that cannot start leaves nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer

START_STOP_CYCLES = """
import sys, tempfile
from pathlib import Path
import runledger
from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer

with tempfile.TemporaryDirectory() as d:
    for i in range(int(sys.argv[1])):
        with EmbeddedServer(Settings(host="127.0.0.1", port=0, data_dir=Path(d) / str(i))) as srv:
            with runledger.Client(srv.address) as client, client.start_run(experiment="cycle") as run:
                for step in range(3):
                    run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
print("done", flush=True)
"""


def test_stopping_prints_nothing(tmp_path: Path) -> None:
    """The gRPC server was let go while its loop still ran: asyncio then printed "Exception in callback ...
    OSError: [Errno 9] Bad file descriptor" on about one stop in four."""
    script = tmp_path / "cycles.py"
    script.write_text(START_STOP_CYCLES)
    done = subprocess.run([sys.executable, str(script), "20"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert "Bad file descriptor" not in done.stderr and "Exception in callback" not in done.stderr, done.stderr


def _server_threads() -> list[str]:
    prefixes = ("runledger-server", "metric-group-commit", "runledger-worker", "runledger-artifacts")
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(prefixes))


def test_a_server_that_cannot_start_leaves_no_thread_behind(tmp_path: Path) -> None:
    before = _server_threads()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for _ in range(3):
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
                EmbeddedServer(Settings(host="127.0.0.1", port=port, data_dir=tmp_path / "data")).start()
    assert _server_threads() == before


def test_a_start_refused_by_its_database_closes_what_it_opened(tmp_path: Path) -> None:
    """A database the server refuses (here: a file that is not SQLite) fails the start once the database and
    the commit thread exist: they are closed again, and the port is free for the next server."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "runledger.db").write_bytes(b"this is not a database" * 100)
    before = _server_threads()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(Exception):  # noqa: B017 - whichever error the driver gives; what matters is below
        EmbeddedServer(Settings(host="127.0.0.1", port=port, data_dir=data)).start()
    assert _server_threads() == before
    with EmbeddedServer(Settings(host="127.0.0.1", port=port, data_dir=tmp_path / "other")) as srv:
        assert srv.port == port


def test_a_start_given_up_on_stops_what_it_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that takes longer than start() waits (slow migrations on a big database) went on building after
    start() had raised: its commit thread and its bound port stayed, with its loop closed under it."""
    from runledger_server import app, embedded

    real_upgrade = app.migrate.upgrade

    def slow_upgrade(db: object) -> None:
        threading.Event().wait(1.5)
        real_upgrade(db)  # type: ignore[arg-type]

    monkeypatch.setattr(embedded, "START_TIMEOUT_S", 0.3)
    monkeypatch.setattr(app.migrate, "upgrade", slow_upgrade)
    before = _server_threads()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TimeoutError):
        EmbeddedServer(Settings(host="127.0.0.1", port=port, data_dir=tmp_path / "data")).start()
    assert _server_threads() == before
    monkeypatch.setattr(app.migrate, "upgrade", real_upgrade)
    with EmbeddedServer(Settings(host="127.0.0.1", port=port, data_dir=tmp_path / "again")) as srv:
        assert srv.port == port  # the port was given back
