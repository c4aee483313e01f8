"""Blocking file work in a worker thread, with the least trio machinery per call.

Every request opens a file in a worker thread (the FUSE tree can block on a disk), so for the
small configs firmware fetches by the dozen the thread hop is a large share of the request.
``trio.to_thread.run_sync`` is general: it copies the context, names the OS thread for the
call and back (two ``prctl`` system calls), tracks the thread for ``from_thread`` and wraps the
call in a generator of its own.  None of that is needed to run ``os.open``/``pread`` and hand
back the result, so :func:`run_sync` uses trio's thread cache directly
(:func:`trio.lowlevel.start_thread_soon`) and reschedules the waiting task itself.

Semantics are those of ``trio.to_thread.run_sync(fn, limiter=limiter,
abandon_on_cancel=True)``: the call takes one token of ``limiter`` for as long as the thread
runs (also after the caller gave up waiting: an abandoned read still occupies a thread), a
cancelled caller returns at once, and the thread's result is then dropped.

:func:`start` is the same hop without a waiting task: the result comes back as a call on the
event loop.  A transfer's read-ahead uses it -- one chunk per 256 KiB of every transfer, so in a
boot storm a task, a cancel scope and an event per chunk were a fifth of the server's CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    import outcome

T = TypeVar("T")


class Borrower:
    """One call's claim on the limiter (a fresh object: the limiter tracks who holds what)."""

    __slots__ = ()


async def borrow(limiter: trio.CapacityLimiter) -> Borrower:
    """One token of ``limiter`` for a new :class:`Borrower` (give it back with
    ``limiter.release_on_behalf_of``).  A free token is taken without the scheduler round
    trip ``acquire_on_behalf_of`` makes even when it need not wait; only a wait for one is a
    checkpoint."""
    borrower = Borrower()
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except trio.WouldBlock:
        await limiter.acquire_on_behalf_of(borrower)
    return borrower


#: Hands a call to the event loop's thread from a worker thread; False if it cannot (closed).
Post = Callable[[Callable[[], None]], bool]


def _in_thread(fn: Callable[[], T], limiter: trio.CapacityLimiter, borrower: Borrower,
               back: Callable[[outcome.Outcome[T]], None], post: Post | None = None) -> None:
    """Run ``fn()`` in a worker thread on ``borrower``'s token (already taken); ``back`` gets
    the outcome on the event loop once the token is given back.  The one home of the hop
    both calls below make.  ``post``: how the result reaches the loop, when not through
    trio's ``run_sync_soon`` (the transfer pump's, see :func:`start`)."""
    token = trio.lowlevel.current_trio_token()

    def on_loop(result: outcome.Outcome[T]) -> None:
        limiter.release_on_behalf_of(borrower)
        back(result)

    def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
        if post is not None and post(lambda: on_loop(result)):
            return
        # A loop that is gone has nobody waiting for this result any more.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(on_loop, result)

    try:
        trio.lowlevel.start_thread_soon(fn, deliver)
    except BaseException:
        limiter.release_on_behalf_of(borrower)
        raise


async def run_sync(fn: Callable[[], T], limiter: trio.CapacityLimiter) -> T:
    """``fn()`` in a worker thread under ``limiter``; its result or its exception."""
    borrower = await borrow(limiter)
    task = trio.lowlevel.current_task()
    abandoned = False

    def back(result: outcome.Outcome[T]) -> None:
        if not abandoned:
            trio.lowlevel.reschedule(task, result)

    _in_thread(fn, limiter, borrower, back)

    def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
        nonlocal abandoned
        abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]


def start(fn: Callable[[], T], limiter: trio.CapacityLimiter,
          on_done: Callable[[outcome.Outcome[T]], None], post: Post | None = None) -> bool:
    """Start ``fn()`` in a worker thread under ``limiter`` if a token is free; ``on_done``
    gets its outcome on the event loop, after the token is given back.  Returns False (and
    starts nothing) when every token is taken: the caller then waits for one with
    :func:`run_sync`.  The caller drops a result it no longer wants in ``on_done``.

    ``post`` (the transfer pump's :meth:`tftpd.pump.Pump.post`) brings the result back
    through the pump's own wake-up instead of trio's: the pump may be waiting in ``epoll``
    itself, where a call queued with trio would wait until its next checkpoint.
    """
    borrower = Borrower()
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except trio.WouldBlock:
        return False
    _in_thread(fn, limiter, borrower, on_done, post)
    return True
