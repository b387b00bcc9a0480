"""The `runledger` command: `serve` runs the server; `demo` runs a simulated post-training sweep."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from runledger_server import config, malloc_arenas
from runledger_server.app import build_server, own_process
from runledger_server.backends.sql import migrate
from runledger_server.domain.errors import DomainError

_LOGGER = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


async def serve(settings: config.Settings) -> None:
    own_process()  # process-wide tuning is the process owner's call: `serve` owns its process
    server, port = await build_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"runledger listening on {settings.host}:{port}", flush=True)
    await stop.wait()
    _LOGGER.info(
        "shutting down: finishing in-flight requests (up to %g s; a second signal cuts them short) and "
        "acknowledged writes",
        settings.grace_seconds,
    )
    hurry = asyncio.Event()  # a second Ctrl-C or SIGTERM: the operator will not wait out the grace period
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hurry.set)
    stopping = asyncio.ensure_future(server.stop())
    hurried = asyncio.ensure_future(hurry.wait())
    try:
        await asyncio.wait({stopping, hurried}, return_when=asyncio.FIRST_COMPLETED)
        if hurried.done() and not stopping.done():
            _LOGGER.warning("second signal: cancelling the requests still running; acknowledged writes are kept")
            await server.cut_short()
        await stopping
    finally:
        hurried.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    # --log-level is taken before and after the command (`runledger serve --log-level DEBUG`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="INFO for serve, WARNING for demo by default",
    )
    parser = argparse.ArgumentParser(prog="runledger", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the gRPC server", parents=[common])
    config.add_arguments(p_serve)
    p_demo = sub.add_parser(
        "demo", help="start an embedded server and run a simulated post-training sweep", parents=[common]
    )
    p_demo.add_argument("--data-dir", default=None, help="data directory (default: a fresh temporary one)")
    p_demo.add_argument("--server", default=None, help="use a running server at HOST:PORT instead")
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", None) or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        try:
            settings = config.from_args(args)
        except config.ConfigError as exc:
            parser.error(str(exc))  # exits with status 2
        malloc_arenas.limit()  # before any thread of the server exists
        try:
            asyncio.run(serve(settings))
        except (OSError, migrate.DatabaseTooNew, DomainError, SQLAlchemyError) as exc:  # said plainly, without a
            # traceback: the port taken, the data directory or the artifact store unusable, the database
            # unreachable or refusing, a database that a newer runledger migrated
            print(f"runledger serve: {_one_line(exc)}", file=sys.stderr)
            _LOGGER.debug("start-up failed", exc_info=exc)
            return 1
        return 0
    from runledger.errors import RunledgerError
    from runledger_server.demo import run_demo

    try:
        return run_demo(data_dir=args.data_dir, server=args.server)
    except RunledgerError as exc:  # e.g. --server unreachable: said plainly, as serve says its failures
        print(f"runledger demo: {exc}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The failure's own message: a driver's first line, without SQLAlchemy's statement and help link."""
    if isinstance(exc, DomainError):
        return exc.message or type(exc).__name__
    if isinstance(exc, SQLAlchemyError):
        orig = getattr(exc, "orig", None)
        lines = (str(orig) if orig is not None else str(exc)).strip().splitlines()
        first = lines[0] if lines else type(orig if orig is not None else exc).__name__
        return f"the metadata database refused the connection or the schema: {first}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
