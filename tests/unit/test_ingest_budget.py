"""The server-wide budget of metric points between receipt and commit: first come, first served, never
exceeded (except by one batch larger than the whole budget, alone), and nothing leaks when a waiter leaves."""

from __future__ import annotations

import asyncio

import pytest

from runledger_server.transport.ingest_budget import PointBudget


def test_waiters_are_served_in_order_within_the_limit() -> None:
    async def scenario() -> list[str]:
        budget = PointBudget(100)
        order: list[str] = []
        assert await budget.acquire(60) == 60

        async def take(name: str, points: int) -> None:
            await budget.acquire(points)
            order.append(name)

        big = asyncio.create_task(take("big", 50))  # does not fit until the 60 are released
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # would fit now, but waits its turn behind "big"
        await asyncio.sleep(0.01)
        assert order == [] and budget.used == 60
        budget.release(60)
        await asyncio.gather(big, small)
        assert budget.used == 60 and budget.peak <= 100
        return order

    assert asyncio.run(scenario()) == ["big", "small"]


def test_a_batch_larger_than_the_budget_passes_alone() -> None:
    async def scenario() -> None:
        budget = PointBudget(100)
        assert await budget.acquire(5_000) == 100  # takes the whole budget instead of waiting forever
        waiter = asyncio.create_task(budget.acquire(1))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        budget.release(100)
        assert await waiter == 1 and budget.used == 1

    asyncio.run(scenario())


def test_a_waiter_that_leaves_takes_nothing_and_holds_nobody_back() -> None:
    async def scenario() -> None:
        budget = PointBudget(100)
        await budget.acquire(90)
        leaving = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0)
        behind = asyncio.create_task(budget.acquire(10))  # fits, but queued behind the one that leaves
        await asyncio.sleep(0.01)
        assert not behind.done()
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert await asyncio.wait_for(behind, 1) == 10 and budget.used == 100
        budget.release(100)
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_waiter_cancelled_just_as_it_is_granted_hands_its_points_on() -> None:
    async def scenario() -> None:
        budget = PointBudget(100)
        await budget.acquire(100)
        granted_late = asyncio.create_task(budget.acquire(40))
        await asyncio.sleep(0)
        budget.release(100)  # grants the 40 ...
        granted_late.cancel()  # ... before the waiter runs again
        with pytest.raises(asyncio.CancelledError):
            await granted_late
        assert budget.used == 0

    asyncio.run(scenario())


def test_waiting_counts_what_the_queued_callers_ask_for_until_granted_or_gone() -> None:
    """`waiting` bounds how much unary callers may hold while they wait (the servicer refuses beyond it)."""

    async def scenario() -> None:
        budget = PointBudget(100)
        await budget.acquire(100)
        first = asyncio.create_task(budget.acquire(30))
        middle = asyncio.create_task(budget.acquire(500))  # counted at most the whole budget
        last = asyncio.create_task(budget.acquire(20))
        await asyncio.sleep(0.01)
        assert budget.waiting == 30 + 100 + 20
        middle.cancel()  # leaves from the middle of the queue: no longer counted, though still queued
        with pytest.raises(asyncio.CancelledError):
            await middle
        assert budget.waiting == 50
        budget.release(100)
        assert await first == 30 and await last == 20
        assert budget.waiting == 0 and budget.used == 50

    asyncio.run(scenario())
