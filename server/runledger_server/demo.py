"""`runledger demo`: a simulated GRPO sweep against a real server, showing what runledger records and refuses.

Four trainers stream loss/reward/KL/entropy concurrently; one diverges (its NaN loss is kept, not
hidden). The honest runs are scored on one eval suite, a phantom run reports a flattering score on
another suite, and winner selection refuses the mixed cohort before picking the honest winner.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer

SUITE = "mmlu-pro@9f3c2e1"  # the fingerprint of the frozen eval suite every honest run is scored on
PHANTOM_SUITE = "easyeval@zzzz"
STEPS = 2_000
TRIALS = [  # (name, learning rate, KL beta, final eval score, diverges)
    ("grpo-lr1e-6-b0.04", 1e-6, 0.04, 0.612, False),
    ("grpo-lr2e-6-b0.04", 2e-6, 0.04, 0.664, False),
    ("grpo-lr5e-6-b0.02", 5e-6, 0.02, 0.641, False),
    ("grpo-lr1e-5-b0.01", 1e-5, 0.01, 0.587, True),
]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    _say("  " + line)
    _say("  " + "  ".join("-" * w for w in widths))
    for r in rows:
        _say("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def _sparkline(values: np.ndarray, width: int = 48) -> str:
    bars = "▁▂▃▄▅▆▇█"
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "(no finite values)"
    idx = np.linspace(0, len(values) - 1, min(width, len(values))).astype(int)
    lo, hi = float(finite.min()), float(finite.max())
    out = []
    for v in values[idx]:
        if not math.isfinite(v):
            out.append("!")
        else:
            out.append(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))])
    return "".join(out)


def _train(run, lr: float, beta: float, diverges: bool, seed: int) -> None:
    """A stand-in for a GRPO trainer: per step, reward rises, KL grows with the learning rate, entropy falls."""
    rng = np.random.default_rng(seed)
    speed = lr / 2e-6
    for step in range(STEPS):
        t = step / STEPS
        reward = 1.2 * (1 - math.exp(-3 * speed * t)) + rng.normal(0, 0.05)
        kl = 0.02 * speed * t * (0.04 / beta) ** 0.5 + abs(rng.normal(0, 0.002))  # a weaker penalty drifts further
        loss = 0.9 * math.exp(-2 * speed * t) + 0.1 + rng.normal(0, 0.01)
        entropy = 2.0 - 0.8 * t * speed**0.5 + rng.normal(0, 0.02)
        if diverges and step >= int(STEPS * 0.7):
            loss, reward = math.nan, -math.inf if step == int(STEPS * 0.7) else math.nan
        run.log_metrics({"train/loss": loss, "rl/reward": reward, "rl/kl": kl, "rl/entropy": entropy}, step=step)


@contextmanager
def _server(data_dir: str | None, address: str | None) -> Iterator[str]:
    if address:
        yield address
        return
    with tempfile.TemporaryDirectory(prefix="runledger-demo-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp) / "runledger-data"
        settings = Settings(port=0, data_dir=root)
        with EmbeddedServer(settings) as srv:
            _say(f"runledger server listening on {srv.address}")
            _say(f"  metadata: SQLite (WAL) at {root / 'runledger.db'}")
            _say(f"  artifacts: local directory {root / 'artifacts'}")
            yield srv.address


def run_demo(*, data_dir: str | None = None, server: str | None = None) -> int:
    from runledger import Client, FailedPrecondition

    with _server(data_dir, server) as address, Client(address) as client:
        experiment = client.get_or_create_experiment(f"qwen3-8b-grpo-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
        _say(f"\n== 1. A GRPO sweep of {len(TRIALS)} runs streams metrics concurrently ({experiment.display_name})")
        runs = {}
        for i, (name, lr, beta, _, _) in enumerate(TRIALS):
            runs[name] = client.start_run(
                experiment=experiment,
                name=name,
                params={"lr": lr, "kl_beta": beta, "group_size": 8, "max_new_tokens": 1024},
                tags={"stage": "grpo", "team": "post-training"},
                lineage={
                    "data_version": "math-rl-v2",
                    "code_commit": "4be1f0c",
                    "config": {"lr": lr, "kl_beta": beta, "lora_r": 16, "group_size": 8},
                    "base_model": "Qwen/Qwen3-8B",
                    "seed": i,
                },
            )
        start = time.perf_counter()
        threads = [
            threading.Thread(target=_train, args=(runs[name], lr, beta, diverges, i))
            for i, (name, lr, beta, _, diverges) in enumerate(TRIALS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for run in runs.values():
            run.flush()
        elapsed = time.perf_counter() - start
        points = STEPS * 4 * len(TRIALS)
        _say(f"  {points:,} points from {len(TRIALS)} trainers acknowledged (durably committed) in {elapsed:.2f} s")
        rows = []
        for name, run in runs.items():
            h = client.metric_history(run.run_id, "rl/reward", max_points=48)
            loss = client.metric_history(run.run_id, "train/loss")
            nan = int(np.isnan(loss.values).sum())
            rows.append([name, _sparkline(h.values), f"{nan} NaN" if nan else "finite", run.lineage_fingerprint[:12]])
        _table(rows, ["run", "rl/reward (downsampled, ! = NaN/Inf)", "train/loss", "lineage fp"])
        diverged = runs[TRIALS[3][0]]
        diverged.finish("FAILED")
        for run in runs.values():
            if run is not diverged:
                run.finish()
        _say("  the diverged run is marked FAILED; its NaN losses are stored exactly, not dropped or clipped")

        _say("\n== 2. Eval results: honest runs on one frozen suite, plus a phantom with a flattering score")
        for name, _, _, score, _ in TRIALS:
            client.log_eval_result(runs[name].run_id, suite_fingerprint=SUITE, metrics={"accuracy": score})
        phantom = client.start_run(experiment=experiment, name="phantom-self-eval", params={"lr": 3e-6})
        phantom.finish()
        client.log_eval_result(phantom.run_id, suite_fingerprint=PHANTOM_SUITE, metrics={"accuracy": 0.99})
        _table(
            [[n, SUITE, f"{s:.3f}"] for n, _, _, s, _ in TRIALS] + [["phantom-self-eval", PHANTOM_SUITE, "0.990"]],
            ["run", "suite fingerprint", "accuracy"],
        )

        _say("\n== 3. Winner selection refuses to rank across eval suites")
        try:
            client.select_winner(experiment=experiment, metric="accuracy", direction="MAXIMIZE")
            _say("  UNEXPECTED: a mixed cohort was ranked")
            return 1
        except FailedPrecondition as exc:
            _say(f"  refused: {exc.code.name} {exc.reason}")
            _say(f"  {exc.message}")
        result = client.select_winner(
            experiment=experiment, metric="accuracy", direction="MAXIMIZE", suite_fingerprint=SUITE
        )
        names = {r.run_id: n for n, r in runs.items()} | {phantom.run_id: "phantom-self-eval"}
        _say(f"  with suite {SUITE} named, the cohort is ranked:")
        _table(
            [[str(i + 1), names[c.run_id], f"{c.score:.3f}"] for i, c in enumerate(result.cohort)],
            ["rank", "run", "accuracy"],
        )
        for e in result.excluded:
            _say(f"  excluded: {names[e.run_id]} ({e.reason}, scored on {', '.join(e.suite_fingerprints)})")
        _say(f"  winner: {names[result.winner_run_id]} with accuracy {result.score:.3f}")
        winner = client.get_run(result.winner_run_id)
        _say(f"  its lineage fingerprint: {winner.lineage_fingerprint}")
        _say(f"  its config: {json.loads(winner.lineage.config)}")
        if names[result.winner_run_id] != TRIALS[1][0]:
            _say("  UNEXPECTED winner")
            return 1
    _say("\ndemo finished: every step above ran against a real runledger server over gRPC")
    return 0
