"""Concurrent registry calls against two server replicas sharing one database behave as if run one at a time.

Each test runs on SQLite (two servers on one database file) and on PostgreSQL (two servers on one database).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from runledger.v1 import registry_pb2, registry_service_pb2 as pb, registry_service_pb2_grpc
from runledger_server.config import Settings
from runledger_server.domain import gates
from runledger_server.domain.gates import GateSpec
from runledger_server.domain.sweeps import Direction
from runledger_server.embedded import EmbeddedServer
from tests.integration.test_registry import GATE, MODEL, SUITE, Registry, Watcher

T = TypeVar("T")
THRESHOLD = 0.5
SPEC = GateSpec(GATE, SUITE, "mmlu", Direction.MAXIMIZE, THRESHOLD)


@pytest.fixture(params=["sqlite", "postgres"])
def replicas(request: pytest.FixtureRequest, settings: Settings) -> Iterator[list[EmbeddedServer]]:
    """Two servers on one metadata database and one artifact directory."""
    shared = settings if request.param == "sqlite" else request.getfixturevalue("pg_settings")
    servers: list[EmbeddedServer] = []
    try:
        for _ in range(2):
            servers.append(EmbeddedServer(shared).start())
        yield servers
    finally:
        for srv in servers:
            srv.stop()


@pytest.fixture
def channels(replicas: list[EmbeddedServer]) -> Iterator[list[grpc.Channel]]:
    """Eight channels, alternating between the replicas."""
    chans = [grpc.insecure_channel(replicas[i % 2].address) for i in range(8)]
    yield chans
    for ch in chans:
        ch.close()


def race(n: int, call: Callable[[int], T]) -> list[T]:
    """Run call(0..n-1) on n threads released together; return results in index order."""
    barrier = threading.Barrier(n)

    def one(i: int) -> T:
        barrier.wait(timeout=30)
        return call(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_version_numbers_under_eight_threads(channels: list[grpc.Channel]) -> None:
    setup = Registry(channels[0])
    setup.model()
    per_thread = 4
    runs = [setup.run(seed=i) for i in range(8 * per_thread)]
    for i, run_id in enumerate(runs):
        setup.upload(run_id, "model.bin", f"weights {i}".encode())

    def register(t: int) -> list[int]:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channels[t])
        return [
            stub.CreateModelVersion(
                pb.CreateModelVersionRequest(model=MODEL, run_id=runs[t * per_thread + k], artifact_path="model.bin")
            ).version
            for k in range(per_thread)
        ]

    numbers = [v for got in race(8, register) for v in got]
    total = 8 * per_thread
    assert sorted(numbers) == list(range(1, total + 1))  # no gaps, no duplicates
    listed = setup.stub.ListModelVersions(pb.ListModelVersionsRequest(model=MODEL, page_size=1000)).model_versions
    assert [v.version for v in listed] == list(range(total, 0, -1))
    assert {v.run_id for v in listed} == set(runs)
    assert setup.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=f"models/{MODEL}")).latest_version == total


def test_racing_creates_of_one_model_make_one_and_refuse_the_rest_alike(channels: list[grpc.Channel]) -> None:
    stubs = [registry_service_pb2_grpc.RegistryServiceStub(ch) for ch in channels]
    for attempt in range(5):  # a check-then-insert race shows within a few rounds on PostgreSQL
        model = f"raced-{attempt}"

        def create(t: int, model: str = model) -> str:
            try:
                stubs[t].CreateRegisteredModel(pb.CreateRegisteredModelRequest(model_id=model))
                return "created"
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc
                assert f"models/{model} already exists" in (exc.details() or ""), exc.details()
                return error_reason(exc)

        outcomes = race(8, create)
        assert sorted(outcomes) == ["ALREADY_EXISTS"] * 7 + ["created"], outcomes  # never a generic CONFLICT


@dataclass
class Call:
    version: int
    expected_revision: int | None
    promoted: bool = False
    revision: int = 0
    reason: str = ""


def replay(
    entries: list[registry_pb2.AliasHistoryEntry],
    calls: dict[int, Call],
    scores: dict[int, float],
    start: tuple[int, int],
) -> tuple[int, int]:
    """Check each recorded decision against the pure rule applied to the state the history implies."""
    version, revision = start
    for e in entries:
        call = calls[e.to_version]
        d = gates.decide(
            SPEC,
            candidate_version=e.to_version,
            candidate_score=scores.get(e.to_version),
            incumbent_version=version or None,
            incumbent_score=scores.get(version) if version else None,
            current_revision=revision,
            expected_revision=call.expected_revision,
        )
        assert e.from_version == version, e
        assert (e.action == registry_pb2.ALIAS_ACTION_PROMOTED, e.reason) == (d.promoted, d.reason), e
        assert (e.candidate_score if e.HasField("candidate_score") else None) == d.candidate_score
        assert (e.incumbent_score if e.HasField("incumbent_score") else None) == d.incumbent_score
        if d.promoted:
            version, revision = e.to_version, revision + 1
        assert e.revision == revision
        # What the caller was told agrees with what the history recorded.
        assert (call.promoted, call.reason) == (d.promoted, d.reason), call
        if call.promoted:
            assert call.revision == revision
    return version, revision


def test_racing_set_alias_is_serializable(channels: list[grpc.Channel]) -> None:
    setup = Registry(channels[0])
    setup.model()
    setup.gate(threshold=THRESHOLD)
    n = 16
    # Gate scores per round (None: never scored). Round 1 holds gate failures, the threshold itself and
    # tied pairs; round 2 mostly beats round 1's best (0.7), again with ties. Shuffled onto versions.
    round1 = [None, None, 0.3, 0.45, 0.499, 0.5, 0.55, 0.6, 0.6, 0.65, 0.7, 0.7, 0.5, 0.62, None, 0.58]
    round2 = [0.75, 0.8, 0.8, 0.9, 0.95, 0.72, 0.71, None, 0.2, 0.85, 0.85, 0.99, 0.7, 0.6, 0.91, 0.93]
    rng = random.Random(4)
    rng.shuffle(round1)
    rng.shuffle(round2)
    versions = [setup.version(seed=i).version for i in range(2 * n)]
    scores: dict[int, float] = {}
    for v, score in zip(versions, round1 + round2, strict=True):
        if score is not None:
            scores[v] = score
            setup.score(v, score)
    reasons: set[str] = set()

    def run_round(alias: str, candidates: list[int], expected: list[int | None], start: tuple[int, int]) -> None:
        calls = {v: Call(v, e) for v, e in zip(candidates, expected, strict=True)}

        def attempt(i: int) -> None:
            call = calls[candidates[i]]
            stub = registry_service_pb2_grpc.RegistryServiceStub(channels[i % len(channels)])
            req = pb.SetAliasRequest(model=MODEL, alias=alias, version=call.version, gate_id=GATE)
            if call.expected_revision is not None:
                req.expected_revision = call.expected_revision
            try:
                resp = stub.SetAlias(req, metadata=(("x-runledger-actor", f"thread-{i}"),))
            except grpc.RpcError as exc:
                call.reason = error_reason(exc)
                stale = call.reason == gates.STALE_REVISION
                assert exc.code() == (grpc.StatusCode.ABORTED if stale else grpc.StatusCode.FAILED_PRECONDITION)
                return
            call.promoted, call.revision, call.reason = True, resp.alias.revision, resp.decision.reason

        race(n, attempt)
        history = [e for e in setup.history(alias) if e.to_version in calls]
        assert sorted(e.to_version for e in history) == sorted(candidates)  # every call recorded exactly once
        assert len({e.actor for e in history}) == n
        final = replay(history, calls, scores, start)
        assert setup.state(alias) == final
        served = setup.serving(alias)
        assert (served.alias.version, served.alias.revision, served.model_version.version) == (*final, final[0])
        assert served.model_version.aliases == [alias]
        reasons.update(c.reason for c in calls.values())

    # Round 1: sixteen first promotions of a new alias race to create it.
    run_round("production", versions[:n], [None] * n, (0, 0))
    # Round 2: the alias is set; some callers use compare-and-swap with the revision they saw (current
    # until the first change lands) and some with an older one (always stale).
    seen_version, seen_revision = setup.state("production")
    assert seen_version != 0
    before = len(setup.history("production"))
    cas = {1: seen_revision, 3: seen_revision - 1}
    expected: list[int | None] = [cas.get(i % 4) for i in range(n)]
    run_round("production", versions[n:], expected, (seen_version, seen_revision))
    assert len(setup.history("production")) == before + n
    # The race exercised promotions and refusals of every kind, not one trivial path.
    assert {gates.PROMOTED, gates.GATE_FAILED, gates.NOT_BETTER_THAN_INCUMBENT, gates.STALE_REVISION} <= reasons
    assert gates.GATE_NOT_RECORDED in reasons


def error_reason(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, exc
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError(f"no ErrorInfo on {exc}")


def test_watch_sees_changes_made_through_another_replica(replicas: list[EmbeddedServer]) -> None:
    with grpc.insecure_channel(replicas[0].address) as ch:
        writer = Registry(ch)
        writer.model()
        writer.gate()
        v = writer.version().version
        writer.score(v, 0.9)
        watcher = Watcher(replicas[1].address)  # the other replica: no local notification, only its poll
        try:
            assert watcher.next().alias.revision == 0
            writer.set_alias(v)
            msg = watcher.next(timeout=15)
            assert (msg.alias.version, msg.alias.revision) == (v, 1) and msg.model_version.version == v
            writer.stub.DeleteAlias(pb.DeleteAliasRequest(model=MODEL, alias="production"))
            gone = watcher.next(timeout=15)
            assert (gone.alias.version, gone.alias.revision) == (0, 2)
        finally:
            watcher.close()


def test_a_watcher_on_another_replica_receives_every_change_made_between_its_polls(
    replicas: list[EmbeddedServer],
) -> None:
    """Changes land on replica A faster than replica B polls (0.5 s): B's watcher once saw only the newest
    revision of each burst, so a version promoted and rolled back at once never reached the fleet."""
    with grpc.insecure_channel(replicas[0].address) as ch:
        writer = Registry(ch)
        writer.model()
        writer.gate()
        v = [writer.version(seed).version for seed in range(2)]
        writer.score(v[0], 0.7)
        writer.score(v[1], 0.9)
        writer.set_alias(v[0])  # revision 1
        watcher = Watcher(replicas[1].address)
        try:
            assert (watcher.next().alias.revision, watcher.messages.empty()) == (1, True)
            for _ in range(3):  # each burst: promote v1, roll back to v0, well within one poll interval
                writer.set_alias(v[1])
                writer.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production"))
            writer.stub.DeleteAlias(pb.DeleteAliasRequest(model=MODEL, alias="production"))
            got = [watcher.next(timeout=15) for _ in range(7)]
            assert [m.alias.revision for m in got] == list(range(2, 9))
            assert [m.alias.version for m in got] == [v[1], v[0]] * 3 + [0]
            assert [m.model_version.version for m in got] == [v[1], v[0]] * 3 + [0]
            assert all(list(m.model_version.aliases) == ["production"] for m in got[:-1])
            time.sleep(1.2)  # two more polls: nothing is sent twice
            assert watcher.messages.empty()
        finally:
            watcher.close()


def test_the_serving_lookup_on_one_replica_answers_every_change_made_through_the_other(
    replicas: list[EmbeddedServer],
) -> None:
    """Replica B has just answered the alias (whatever it keeps in memory is warm) when each change through
    replica A returns: B's next answer is already the new one, including which aliases share the version."""
    with grpc.insecure_channel(replicas[0].address) as a_ch, grpc.insecure_channel(replicas[1].address) as b_ch:
        a, b = Registry(a_ch), Registry(b_ch)
        a.model()
        a.gate()
        versions = [a.version(seed).version for seed in range(3)]
        for i, v in enumerate(versions):
            a.score(v, 0.7 + 0.1 * i)

        def served(alias: str = "production") -> tuple[int, int, list[str]]:
            r = b.serving(alias)
            assert r.model_version.version == r.alias.version
            # The same lookup spelled as a version name (what the Python client's resolve sends) agrees.
            named = b.stub.GetModelVersion(pb.GetModelVersionRequest(name=f"models/{MODEL}@{alias}"))
            assert (named.version, list(named.aliases)) == (r.model_version.version, list(r.model_version.aliases))
            return r.alias.version, r.alias.revision, list(r.model_version.aliases)

        a.set_alias(versions[0])
        assert served() == (versions[0], 1, ["production"])
        a.set_alias(versions[0], alias="champion")  # another alias on the same version: only its row changed
        assert served() == (versions[0], 1, ["champion", "production"])
        a.set_alias(versions[1], alias="champion")
        assert served() == (versions[0], 1, ["production"])
        a.set_alias(versions[2])
        assert served() == (versions[2], 2, ["production"])
        a.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production"))
        assert served() == (versions[0], 3, ["production"])
        a.set_alias(versions[2], alias="champion")
        a.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="champion"))
        assert served("champion") == (versions[1], 4, ["champion"])
        a.stub.DeleteAlias(pb.DeleteAliasRequest(model=MODEL, alias="production"))
        with pytest.raises(grpc.RpcError) as gone:
            b.serving()
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as gone:
            b.stub.GetModelVersion(pb.GetModelVersionRequest(name=f"models/{MODEL}@production"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        a.set_alias(versions[1])
        assert served() == (versions[1], 5, ["champion", "production"])


def test_the_serving_path_never_waits_for_a_pooled_connection(settings: Settings) -> None:
    """The lookup runs on the event loop: every read it makes (the alias rows, whether the model exists, a
    version not yet in memory) uses a connection of its own, so a pool with no free connection (writers
    queued on another replica's lock) cannot stall the replica."""
    from runledger_server.backends.sql.database import Database
    from runledger_server.backends.sql.registry_store import SqlRegistryStore
    from runledger_server.domain.errors import NotFound

    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        reg = Registry(ch)
        reg.model()
        reg.gate()
        v = reg.version().version
        reg.score(v, 0.9)
        reg.set_alias(v)
    db = Database(settings.database_url, pool_timeout=0.3)
    try:
        store = SqlRegistryStore(db)  # nothing in memory yet: the version is read on first use
        held = [db.engine.raw_connection() for _ in range(32)]  # the pool's every connection
        try:
            assert store.serving_target(MODEL, "production").alias.version == v
            unset = store.serving_target(MODEL, "staging")
            assert (unset.version, unset.alias.revision) == (None, 0)
            with pytest.raises(NotFound):
                store.serving_target("no-such-model", "production")
        finally:
            for conn in held:
                conn.close()
    finally:
        db.dispose()
