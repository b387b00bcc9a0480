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
from typing import Any, Literal

import numpy as np

from runledger import Client, FailedPrecondition, PromotionRefused, Run
from runledger.v1 import registry_pb2
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
    with (
        _server(data_dir, server) as address,
        Client(address) as client,
        tempfile.TemporaryDirectory(prefix="runledger-demo-files-") as files,
    ):
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
        for i, (name, run) in enumerate(runs.items()):
            run.log_artifact(_fake_adapter(Path(files) / name, seed=i), "adapter")
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
        if _registry_part(address, client, runs, phantom, Path(files)) != 0:
            return 1
    _say("\ndemo finished: every step above ran against a real runledger server over gRPC")
    return 0


def _fake_adapter(directory: Path, *, seed: int) -> Path:
    """A stand-in LoRA adapter folder: a config and some weight bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32, "seed": seed}))
    (directory / "adapter_model.safetensors").write_bytes(np.random.default_rng(seed).bytes(256 * 1024))
    return directory


def _registry_part(address: str, client: Client, runs: dict[str, Run], phantom: Run, files: Path) -> int:

    model = f"qwen3-8b-grpo-{time.strftime('%H%M%S')}"
    _say(f"\n== 4. Registry: versions point back to run, artifact digest and lineage fingerprint ({model})")
    try:
        client.register(phantom, model=model, artifact_path="adapter")
        _say("  UNEXPECTED: a run without lineage was registered")
        return 1
    except FailedPrecondition as exc:
        _say(f"  phantom-self-eval refused: {exc.reason}: {exc.message}")
    order = [TRIALS[2][0], TRIALS[1][0], TRIALS[1][0], TRIALS[3][0]]  # champion, winner, tied re-run, failing
    rerun = client.start_run(
        experiment=runs[order[1]].experiment,
        name=f"{order[1]}-rerun",
        lineage={**_lineage_of(client, runs[order[1]].run_id), "seed": 99},
    )
    rerun.log_artifact(_fake_adapter(files / "rerun", seed=99), "adapter")
    rerun.finish()
    sources = [runs[order[0]], runs[order[1]], rerun, runs[order[3]]]
    labels = [order[0], order[1], f"{order[1]}-rerun", order[3]]
    versions = [client.register(r, model=model, artifact_path="adapter").version for r in sources]
    _table(
        [
            [str(v), label, mv.artifact_sha256[:12], f"{mv.artifact_size:,}", mv.lineage_fingerprint[:12]]
            for v, label, mv in (
                (v, label, client.registry.get_version(model, v)) for v, label in zip(versions, labels, strict=True)
            )
        ],
        ["version", "from run", "adapter sha256", "bytes", "lineage fp"],
    )

    _say("\n== 5. A frozen eval gate scores each version; only the gate's own scores count")
    gate = client.create_gate(model, "mmlu-pro-gate", suite_fingerprint=SUITE, metric="accuracy", threshold=0.60)
    _say(f"  gate {gate.gate_id}: suite {gate.suite_fingerprint}, accuracy >= {gate.threshold}, frozen")
    with Client(address, metadata=[("x-runledger-actor", "mmlu-pro-gate")]) as gatekeeper:
        for v, score in zip(versions, (0.641, 0.664, 0.664, 0.587), strict=True):
            gatekeeper.record_gate_result(model, gate.gate_id, v, score)
            _say(f"  version {v}: gate score {score:.3f}")

    _say("\n== 6. Promotions through SetAlias (atomic: gate, threshold and strictly-better in one transaction)")
    with Client(address, metadata=[("x-runledger-actor", "release-manager")]) as release:
        for v, why in zip(
            versions, ("first champion", "the sweep winner", "a tied re-run", "below the gate"), strict=True
        ):
            try:
                out = release.set_alias(model, "production", v, gate=gate.gate_id)
                _say(f"  version {v} ({why}): PROMOTED, production now at revision {out.alias.revision}")
            except PromotionRefused as exc:
                _say(
                    f"  version {v} ({why}): refused {exc.reason} (candidate {exc.candidate_score}, "
                    f"incumbent {exc.incumbent_score})"
                )
        alias = release.rollback_alias(model, "production")
        _say(
            f"  incident on version {versions[1]}: rollback restores version {alias.version} "
            f"(revision {alias.revision})"
        )
        served = release.registry.lookup(model, "production")
        timings = []
        for _ in range(500):
            t = time.perf_counter()
            release.registry.lookup(model, "production")
            timings.append(time.perf_counter() - t)
        timings.sort()
        mv = served.model_version
        _say(f"\n== 7. Serving lookup {model}@production -> version {mv.version}, revision {served.alias.revision}")
        _say(f"  artifact {mv.artifact_uri}")
        _say(f"  sha256 {mv.artifact_sha256}, lineage fingerprint {mv.lineage_fingerprint}")
        _say(f"  500 lookups over gRPC: p50 {1000 * timings[250]:.2f} ms, p99 {1000 * timings[494]:.2f} ms")
        if mv.version != versions[0]:
            _say("  UNEXPECTED serving target")
            return 1
        _say("\n== 8. The audit history of production: every decision, promoted or refused")
        _table(
            [
                [
                    str(e.sequence),
                    registry_action(e.action),
                    f"{e.from_version or '-'} -> {e.to_version}",
                    _score(e, "candidate_score"),
                    _score(e, "incumbent_score"),
                    e.reason,
                    e.actor,
                    str(e.revision),
                ]
                for e in release.alias_history(model, "production")
            ],
            ["#", "action", "version", "candidate", "incumbent", "reason", "actor", "revision"],
        )
    return 0


def registry_action(value: registry_pb2.AliasAction.ValueType) -> str:
    return registry_pb2.AliasAction.Name(value).removeprefix("ALIAS_ACTION_")


def _score(entry: registry_pb2.AliasHistoryEntry, field: Literal["candidate_score", "incumbent_score"]) -> str:
    return f"{getattr(entry, field):.3f}" if entry.HasField(field) else "-"


def _lineage_of(client: Client, run_id: str) -> dict[str, Any]:
    lineage = client.get_run(run_id).lineage
    return {
        "data_version": lineage.data_version,
        "code_commit": lineage.code_commit,
        "config": json.loads(lineage.config),
        "base_model": lineage.base_model,
        "seed": lineage.seed,
    }
