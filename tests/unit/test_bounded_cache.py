"""BoundedCache: the last value per key, bounded by entries and by size."""

from __future__ import annotations

from runledger_server.bounded_cache import BoundedCache


def test_values_are_kept_per_key_and_replaced() -> None:
    cache: BoundedCache[str, int] = BoundedCache(max_entries=10, max_size=800)
    cache.put("a", 1, 10)
    cache.put("b", 2, 20)
    cache.put("a", 3, 30)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache), cache.size) == (3, 2, None, 2, 50)


def test_past_either_bound_it_starts_over() -> None:
    by_count: BoundedCache[int, int] = BoundedCache(max_entries=3, max_size=10**9)
    for i in range(4):
        by_count.put(i, i, 1)
    assert (len(by_count), by_count.get(3), by_count.get(0)) == (1, 3, None)
    by_size: BoundedCache[int, int] = BoundedCache(max_entries=100, max_size=800)
    for i in range(9):
        by_size.put(i, i, 100)  # the ninth would take it to 900
    assert (len(by_size), by_size.size, by_size.get(8), by_size.get(0)) == (1, 100, 8, None)


def test_a_value_over_an_eighth_of_the_budget_is_not_kept_and_drops_the_old_one() -> None:
    cache: BoundedCache[str, str] = BoundedCache(max_entries=10, max_size=800)
    cache.put("small", "x", 10)
    cache.put("k", "old", 10)
    cache.put("k", "huge", 101)
    assert (cache.get("k"), cache.get("small"), cache.size) == (None, "x", 10)
