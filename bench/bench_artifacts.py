"""Artifact upload and download throughput through runledger (S3 backend) next to the minio SDK talking to
the same S3 server directly, in the same run; and the runledger server's peak memory.

Both paths move the same file between the local disk and one moto server (a separate process on
loopback). The direct path is the minio SDK with its defaults (`fput_object` / `fget_object`); the
runledger path is the Python client helpers (`upload_file` hashes the file, then streams it to the
server, which hashes it again and streams it as a multipart upload; `download` verifies the sha256 at
the end, once streamed through the server and once fetched through the presigned URL the server signs)
against a `runledger serve --artifacts s3://...` subprocess. Each round uses fresh content (so
deduplication cannot skip the upload), the order of the paths rotates from round to round, and every transfer
starts without a previous output file; medians are printed, with the
ratio runledger / direct, and the server's VmHWM (peak resident memory) after all rounds.

Run: .venv/bin/python bench/bench_artifacts.py [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from minio import Minio

sys.path.insert(0, str(Path(__file__).parent))
import contextlib

from _server import free_port, peak_rss_mib, runledger_server

from runledger import artifacts as client_artifacts
from runledger.v1 import tracking_service_pb2 as tpb, tracking_service_pb2_grpc

T = TypeVar("T")
MiB = 1 << 20
BUCKET = "bench-artifacts"
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


def start_moto(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Running on" in line:
            break
    else:
        raise RuntimeError("moto did not start")
    # Keep draining its request log so that a full pipe never stalls it.
    threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True).start()
    return proc


def current_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> None:
    """Restart VmHWM from the current RSS (Linux: write 5 to clear_refs), to measure one phase's peak."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def fill(path: Path, mib: int, seed: int) -> None:
    """Fresh incompressible content for each round."""
    with path.open("wb") as f:
        block = os.urandom(MiB)
        for i in range(mib):
            f.write(seed.to_bytes(8, "little") + i.to_bytes(8, "little") + block[16:])


def rotate(items: list[T], by: int) -> list[T]:
    k = by % len(items)
    return items[k:] + items[:k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per path (default 3)")
    args = parser.parse_args()

    port = free_port()
    moto = start_moto(port)
    endpoint = f"127.0.0.1:{port}"
    os.environ.update(KEYS)
    direct = Minio(
        endpoint, access_key=KEYS["AWS_ACCESS_KEY_ID"], secret_key=KEYS["AWS_SECRET_ACCESS_KEY"], secure=False
    )
    direct.make_bucket(BUCKET)
    rates: dict[str, list[float]] = {"direct_up": [], "direct_down": [], "rl_up": [], "rl_down": [], "rl_fast": []}
    peaks: dict[str, float] = {"upload": 0.0, "download": 0.0}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp:
            work = Path(tmp)
            src, out = work / "checkpoint.bin", work / "downloaded.bin"
            with (
                runledger_server(work / "server", "--artifacts", f"s3://{BUCKET}/rl", "--s3-endpoint", endpoint) as (
                    address,
                    pid,
                ),
                grpc.insecure_channel(address) as channel,
            ):
                tracking = tracking_service_pb2_grpc.TrackingServiceStub(channel)
                exp = tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name="bench-artifacts"))
                run_id = tracking.CreateRun(tpb.CreateRunRequest(experiment=exp.name)).run_id
                idle_rss = peak_rss_mib(pid)
                uploaded: dict[int, Any] = {}
                for r in range(args.rounds):
                    # Every transfer starts from the same state (no output file, nothing else running), and the
                    # order of the paths rotates from round to round: on this kind of machine a transfer's rate
                    # depends on what ran just before it, so a fixed order would favour whichever goes first.
                    fill(src, args.mib, seed=r)  # the same bytes for both paths; runledger's key is new per round

                    def up_direct(r: int = r) -> None:
                        direct.fput_object(BUCKET, f"direct/{r}", str(src))

                    def up_runledger(r: int = r) -> None:
                        reset_peak(pid)
                        uploaded[r] = client_artifacts.upload_file(
                            channel, run_id, src, f"round-{r}/model.bin", progress=False
                        )
                        peaks["upload"] = max(peaks["upload"], peak_rss_mib(pid))

                    ups: list[tuple[str, Callable[[], None]]] = [("direct_up", up_direct), ("rl_up", up_runledger)]
                    for name, upload in rotate(ups, r):
                        t = time.perf_counter()
                        upload()
                        rates[name].append(args.mib / (time.perf_counter() - t))
                    art = uploaded[r]
                    assert art.size == args.mib * MiB

                    def down_direct(r: int = r) -> None:
                        direct.fget_object(BUCKET, f"direct/{r}", str(out))

                    def down_server(path: str = art.path) -> None:
                        reset_peak(pid)
                        client_artifacts.download(channel, run_id, path, out, presigned=False, progress=False)
                        peaks["download"] = max(peaks["download"], peak_rss_mib(pid))

                    def down_presigned(path: str = art.path) -> None:
                        client_artifacts.download(channel, run_id, path, out, progress=False)

                    downs: list[tuple[str, Callable[[], None]]] = [
                        ("direct_down", down_direct),
                        ("rl_down", down_server),
                        ("rl_fast", down_presigned),
                    ]
                    for name, download in rotate(downs, r):
                        t = time.perf_counter()
                        download()
                        rates[name].append(args.mib / (time.perf_counter() - t))
                        assert out.stat().st_size == args.mib * MiB
                        out.unlink()
                    direct.remove_object(BUCKET, f"direct/{r}")  # keep moto's memory flat
                    direct.remove_object(BUCKET, art.uri.removeprefix(f"s3://{BUCKET}/"))
                    print(
                        f"round {r}: direct up {rates['direct_up'][-1]:.0f} down {rates['direct_down'][-1]:.0f} | "
                        f"runledger up {rates['rl_up'][-1]:.0f} down {rates['rl_down'][-1]:.0f} "
                        f"(presigned {rates['rl_fast'][-1]:.0f}) MiB/s",
                        flush=True,
                    )
                final_rss = current_rss_mib(pid)
    finally:
        moto.terminate()
        moto.wait(timeout=30)

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{args.mib} MiB file, {args.rounds} rounds, medians (S3 server: moto on loopback, 2 cores shared):")
    print(
        f"  upload    direct minio SDK {med['direct_up']:7.1f} MiB/s   runledger {med['rl_up']:7.1f} MiB/s   "
        f"ratio {med['rl_up'] / med['direct_up']:.2f} (target >= 0.70)"
    )
    print(
        f"  download  direct minio SDK {med['direct_down']:7.1f} MiB/s   runledger {med['rl_down']:7.1f} MiB/s   "
        f"ratio {med['rl_down'] / med['direct_down']:.2f} (target >= 0.70), through the server"
    )
    print(
        f"  download  direct minio SDK {med['direct_down']:7.1f} MiB/s   runledger {med['rl_fast']:7.1f} MiB/s   "
        f"ratio {med['rl_fast'] / med['direct_down']:.2f} (target >= 0.70), presigned URL, verified by the client"
    )
    print(
        f"  runledger server RSS: idle {idle_rss:.0f} MiB, peak during uploads {peaks['upload']:.0f} MiB, "
        f"during downloads {peaks['download']:.0f} MiB, after {final_rss:.0f} MiB (target < 200 MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
