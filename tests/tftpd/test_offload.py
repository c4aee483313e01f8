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


async def test_start_hands_the_outcome_back_on_the_loop_after_the_token() -> None:
    """offload.start (read-ahead: no task per chunk): the outcome -- value or exception --
    arrives as a call on the event loop thread, with the token already given back."""
    limiter = trio.CapacityLimiter(2)
    loop_thread = threading.get_ident()
    got: list[tuple[object, int, int]] = []
    done = trio.Event()

    def on_done(result) -> None:
        try:
            value: object = result.unwrap()
        except OSError as exc:
            value = type(exc)
        got.append((value, threading.get_ident(), limiter.borrowed_tokens))
        if len(got) == 2:
            done.set()

    assert offload.start(threading.get_ident, limiter, on_done)
    assert offload.start(lambda: os.stat("/nonexistent/x"), limiter, on_done)
    with trio.fail_after(5):
        await done.wait()
    values = {v for v, _, _ in got}
    assert FileNotFoundError in values
    idents = [v for v in values if isinstance(v, int)]
    assert idents and idents[0] != loop_thread  # fn ran in a worker thread
    assert all(thread == loop_thread for _, thread, _ in got)  # on_done on the loop
    assert got[-1][2] == 0  # every token back by the time the last on_done runs


async def test_start_refuses_without_a_free_token_and_starts_nothing() -> None:
    limiter = trio.CapacityLimiter(1)
    release = threading.Event()
    ran: list[str] = []
    results: list[object] = []
    assert offload.start(lambda: release.wait(10), limiter, results.append)
    assert not offload.start(lambda: ran.append("second"), limiter, results.append)
    release.set()
    with trio.fail_after(5):
        while not results:
            await trio.sleep(0.01)
    assert ran == []  # the refused call never ran
    assert limiter.borrowed_tokens == 0
