"""`tenancy.session.Deadline`, the request deadline's one timer per tenant connection, on the
event loops the API runs on: it cancels the request at its deadline, once, without spinning
when a deadline falls between two ticks of the loop's millisecond clock (uvloop rounds timers
to the millisecond), and waits on for a later request's deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from fluxbase.tenancy.session import Deadline

_LOOPS = pytest.mark.parametrize(
    "factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


class _Counted(Deadline):
    __slots__ = ("fired",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.fired = 0

    def _fire(self) -> None:
        self.fired += 1
        super()._fire()


def _run(factory: Callable[[], asyncio.AbstractEventLoop], main: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@_LOOPS
def test_a_deadline_between_clock_ticks_fires_without_spinning(
    factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> list[tuple[bool, int, float]]:
        loop = asyncio.get_running_loop()
        out = []
        for n in range(8):  # deadlines at several fractions of a millisecond
            watch = _Counted(loop)
            request = asyncio.create_task(asyncio.sleep(5))
            await asyncio.sleep(0.0003 * n)
            t0 = loop.time()
            watch.start(request, 0.0201 + 0.0001 * n)
            with pytest.raises(asyncio.CancelledError):
                await request
            out.append((watch.expired, watch.fired, loop.time() - t0))
        return out

    for expired, fired, took in _run(factory, main):
        assert expired and 0.015 <= took < 1.0
        # Not one firing per loop iteration until the clock ticks (without the millisecond's
        # tolerance: 3 to 256 firings in about half the runs).
        assert fired <= 2, fired


@_LOOPS
def test_a_later_request_runs_to_its_own_deadline(factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        watch = Deadline(loop)
        first = asyncio.create_task(asyncio.sleep(0.01))
        await asyncio.sleep(0)
        watch.start(first, 0.2)  # arms the timer for 0.2 s
        await first
        watch.task = None
        await asyncio.sleep(0.1)
        second = asyncio.create_task(asyncio.sleep(5))
        await asyncio.sleep(0)
        t0 = loop.time()
        watch.start(second, 0.3)  # the timer fires 0.1 s in, and must wait on
        with pytest.raises(asyncio.CancelledError):
            await second
        return watch.expired, loop.time() - t0

    expired, took = _run(factory, main)
    assert expired and 0.28 <= took < 1.0
