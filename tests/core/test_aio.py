"""core.aio. wait_event: a background loop waiting on an event always stops when cancelled,
whenever in the loop's iterations the cancel lands (asyncio.wait_for on Python 3.11 lost it
when it landed just as the event fired: python/cpython#86296). stop_within: a shutdown step
that hangs is left behind by name."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest
from structlog.testing import capture_logs

from core.aio import stop_within, wait_event


async def forever(event: asyncio.Event, wait: Callable[[asyncio.Event], Awaitable[object]]) -> None:
    """The shape of the stream hub's reader and the outcome signaller: wait, clear, work."""
    while True:
        await wait(event)
        event.clear()
        await asyncio.sleep(0)


async def stops_when_cancelled(wait: Callable[[asyncio.Event], Awaitable[object]]) -> list[int]:
    """The offsets (loop iterations after the event is set) at which a cancel was lost."""
    lost = []
    for offset in range(8):
        event = asyncio.Event()
        task = asyncio.create_task(forever(event, wait))
        for _ in range(3):
            await asyncio.sleep(0)  # the task waits
        event.set()
        for _ in range(offset):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done:
            lost.append(offset)
            task.cancel()  # the first was swallowed; this one lands while it only waits
            done, _ = await asyncio.wait({task}, timeout=0.5)
            assert done, "the lost task did not end on a second cancel"
        elif not task.cancelled():
            lost.append(offset)
    return lost


async def test_a_cancel_is_never_lost() -> None:
    assert await stops_when_cancelled(lambda event: wait_event(event, 5)) == []


async def test_the_check_sees_asyncio_wait_for_lose_one() -> None:
    """The same check finds the lost cancel in the helper this replaced (3.11 only)."""
    old = vars(asyncio)["wait_for"]  # kept out of the code base (tests/test_architecture.py)
    lost = await stops_when_cancelled(lambda event: old(event.wait(), 5))
    if sys.version_info < (3, 12):
        assert lost != []
    else:
        assert lost == []


@pytest.mark.parametrize(("fire", "expected"), [(True, True), (False, False)])
async def test_it_answers_whether_the_event_fired(fire: bool, expected: bool) -> None:
    event = asyncio.Event()
    if fire:
        asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 0.2) is expected


async def test_no_limit_waits_for_the_event() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, None) is True


async def test_a_shutdown_step_that_hangs_is_left_behind_by_name() -> None:
    ran: list[str] = []

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ran.append("hang cancelled")

    async def fails() -> None:
        raise RuntimeError("pool already gone")

    async def works() -> None:
        ran.append("works")

    with capture_logs() as logs:
        assert await stop_within("stream hub", hangs, seconds=0.2) is False
        assert await stop_within("database pool", fails, seconds=0.2) is True
        assert await stop_within("token verifier", works, seconds=0.2) is True
        await asyncio.sleep(0)  # the abandoned step's cancel lands
    assert sorted(ran) == ["hang cancelled", "works"]
    events = [(e["event"], e["step"]) for e in logs]
    assert events == [
        ("shutdown step did not finish", "stream hub"),
        ("shutdown step failed", "database pool"),
    ]
