"""tftpd.offload.run_sync: the lean thread hop keeps trio.to_thread's contract (result,
exception, abandon on cancel, limiter held while the thread runs)."""

from __future__ import annotations

import os
import threading

import pytest
import trio

from tftpd import offload


async def test_result_and_exception_come_back() -> None:
    limiter = trio.CapacityLimiter(2)
    ident = await offload.run_sync(threading.get_ident, limiter)
    assert ident != threading.get_ident()  # it ran in another thread
    with pytest.raises(FileNotFoundError):
        await offload.run_sync(lambda: os.stat("/nonexistent/x"), limiter)
    assert limiter.borrowed_tokens == 0


async def test_cancel_abandons_the_thread_but_keeps_its_token_until_it_ends() -> None:
    limiter = trio.CapacityLimiter(1)
    release = threading.Event()
    ran = threading.Event()

    def blocked() -> str:
        ran.set()
        release.wait(10)
        return "late"

    with trio.move_on_after(0.2) as scope:
        await offload.run_sync(blocked, limiter)
    assert scope.cancelled_caught  # the caller got out although the thread still runs
    assert ran.is_set()
    assert limiter.borrowed_tokens == 1  # a blocked read still occupies its thread
    with trio.move_on_after(0.2) as second:
        await offload.run_sync(lambda: "never", limiter)  # no token free: waits
    assert second.cancelled_caught
    release.set()
    with trio.fail_after(5):
        while limiter.borrowed_tokens:
            await trio.sleep(0.01)
        assert await offload.run_sync(lambda: "next", limiter) == "next"


async def test_a_call_without_a_free_token_waits_for_one_then_runs() -> None:
    limiter = trio.CapacityLimiter(1)
    release = threading.Event()
    results: list[str] = []

    async def call(fn) -> None:
        results.append(await offload.run_sync(fn, limiter))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, lambda: release.wait(10) and "first")
        await trio.sleep(0.05)
        nursery.start_soon(call, lambda: "second")
        await trio.sleep(0.05)
        assert results == []  # the second waits for the first's token
        release.set()
    assert results == ["first", "second"]
    assert limiter.borrowed_tokens == 0
