"""A runledger server on a background thread of this process: for notebooks, demos and tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future

from runledger_server.app import Server, build_server
from runledger_server.config import Settings

START_TIMEOUT_S = 60.0
GIVE_UP_WAIT_S = 120.0  # how long a start given up on is waited for, to stop what it built


class EmbeddedServer:
    """`with EmbeddedServer(settings) as srv: Client(srv.address)`; stops gracefully on exit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="runledger-server", daemon=True)
        self._server: Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> EmbeddedServer:
        """Start serving; a server that cannot start (its port taken, its database refused) raises, and leaves
        no thread behind."""
        self._thread.start()
        fut: Future[tuple[Server, int]] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            self._server, self.port = fut.result(timeout=START_TIMEOUT_S)
        except BaseException:  # failed, timed out, or interrupted (Ctrl-C)
            # A start still under way is let finish and then stopped: cancelled inside gRPC's own start, a
            # server can no longer be stopped, and what it opened would stay.
            with contextlib.suppress(BaseException):
                self._server, self.port = fut.result(timeout=GIVE_UP_WAIT_S)
            self.stop()
            raise
        return self

    async def _start(self) -> tuple[Server, int]:
        server, port = await build_server(self.settings)
        try:
            await server.start()
        except Exception:
            await server.stop(0)  # closes what the build opened
            raise
        return server, port

    def stop(self, grace: float | None = 1.0) -> None:
        # The gRPC server is let go only once its loop has stopped: the last reference going tears down gRPC's
        # asyncio poller on this thread, and with the loop still running, the loop read a closed socket
        # ("OSError: [Errno 9] Bad file descriptor" printed by asyncio, on about one stop in four).
        server, self._server = self._server, None
        try:
            if server is not None:
                asyncio.run_coroutine_threadsafe(server.stop(grace), self._loop).result(timeout=120)
        finally:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=30)
                self._loop.close()
            del server

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
