"""The in-memory chunk cache of the SQL tracking store: reads served from memory equal reads from the database,
whatever the cache holds (everything, a part, nothing), and the cache stays within its byte budget."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from runledger_server.backends.sql import migrate
from runledger_server.backends.sql.chunk_cache import ENTRY_OVERHEAD, ChunkCache
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.tracking_store import SqlTrackingStore
from runledger_server.domain import ids
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.metrics import Batch, Series, joined


def series(key: str, steps: np.ndarray, seed: int) -> Series:
    values = np.random.default_rng(seed).normal(size=steps.shape[0])
    values[::7] = np.nan
    return Series(key, steps.astype(np.int64), values, 1_700_000_000_000 + steps.astype(np.int64) * 3)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'meta.db'}")
    migrate.upgrade(database)
    return database


def logged_run(store: SqlTrackingStore) -> str:
    exp = store.create_experiment("cache", "", {})
    run_id = ids.new_id()
    store.create_run(run_id, exp.experiment_id, "", {}, {}, Lineage(), None)
    batches = [
        Batch(run_id, "w0", seq, (series("loss", np.arange(seq * 1000, seq * 1000 + 1000), seq),)) for seq in range(12)
    ]
    batches.append(Batch(run_id, "w1", 0, (series("loss", np.array([5, 3, 4000, 4]), 99),)))  # irregular steps
    assert store.commit_metric_batches(batches) == [False] * len(batches)
    return run_id


def same(a: list[Series], b: list[Series]) -> None:
    x, y = joined(a), joined(b)
    assert np.array_equal(x.steps, y.steps) and np.array_equal(x.timestamps_ms, y.timestamps_ms)
    assert np.array_equal(x.values.view(np.int64), y.values.view(np.int64))  # bit-exact, NaN included


@pytest.mark.parametrize("cache_bytes", [0, 40_000, 128 << 20])
def test_reads_through_the_cache_equal_reads_from_the_database(db: Database, cache_bytes: int) -> None:
    writer = SqlTrackingStore(db, chunk_cache_bytes=cache_bytes)
    run_id = logged_run(writer)
    cold = SqlTrackingStore(db, chunk_cache_bytes=0)  # another replica: nothing in memory
    for start, end in [(None, None), (2_500, 7_000), (4, 4)]:
        expected = cold.metric_chunks(run_id, "loss", start, end)
        same(writer.metric_chunks(run_id, "loss", start, end), expected)
        same(writer.metric_chunks(run_id, "loss", start, end), expected)  # again, after the read filled the cache
    assert writer._chunks.nbytes <= cache_bytes


def test_cache_evicts_least_recently_used_within_its_budget() -> None:
    one = Series("k", np.arange(10), np.zeros(10), np.arange(10))  # 240 bytes of points
    entry = ENTRY_OVERHEAD + 240
    cache = ChunkCache(max_bytes=2 * entry + 100)
    cache.put(("r", "k", "w", 0), one)
    cache.put(("r", "k", "w", 1), one)
    assert cache.get(("r", "k", "w", 0)) is one  # now the most recently used
    cache.put(("r", "k", "w", 2), one)
    assert cache.get(("r", "k", "w", 1)) is None and cache.get(("r", "k", "w", 0)) is one
    assert cache.nbytes == 2 * entry
    big = Series("k", np.arange(100), np.zeros(100), np.arange(100))  # over the budget alone
    cache.put(("r", "k", "w", 3), big)
    assert cache.get(("r", "k", "w", 3)) is None and cache.nbytes == 2 * entry


@pytest.mark.parametrize("points", [1, 1000])
def test_the_budget_bounds_real_memory_even_for_one_point_chunks(points: int) -> None:
    """A trainer flushing every step makes chunks of one point per key: each entry's own overhead counts."""
    budget = 4 << 20
    cache = ChunkCache(max_bytes=budget)
    tracemalloc.start()
    try:
        for seq in range(4 * budget // (24 * points + 100)):  # enough to fill the budget several times over
            run, writer = f"run-{seq % 7:028d}", f"writer-{seq % 3:025d}"  # distinct string objects, as in requests
            steps = np.arange(seq * points, (seq + 1) * points, dtype=np.int64)
            cache.put((run, "train/loss", writer, seq), Series("train/loss", steps, steps * 0.5, steps.copy()))
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cache.nbytes <= budget
    assert used <= 1.25 * budget, f"{used / 2**20:.1f} MiB held for a {budget >> 20} MiB budget"


def test_committed_chunks_cached_from_request_views_own_their_memory(db: Database) -> None:
    """The server ingests series as read-only views of the request bytes; the cache must not keep those alive."""
    store = SqlTrackingStore(db)
    exp = store.create_experiment("views", "", {})
    run_id = ids.new_id()
    store.create_run(run_id, exp.experiment_id, "", {}, {}, Lineage(), None)
    request = np.arange(3000, dtype=np.int64).tobytes() + np.linspace(0, 1, 1000).tobytes()
    steps = np.frombuffer(request, np.int64, 1000, 0)
    stamps = np.frombuffer(request, np.int64, 1000, 8000)
    values = np.frombuffer(request, np.float64, 1000, 24000)
    store.commit_metric_batches([Batch(run_id, "w", 0, (Series("loss", steps, values, stamps),))])
    cached = store._chunks.get((run_id, "loss", "w", 0))
    assert cached is not None
    for a in (cached.steps, cached.values, cached.timestamps_ms):
        assert a.flags.owndata and a.base is None
    same([cached], [Series("loss", steps.copy(), values.copy(), stamps.copy())])
