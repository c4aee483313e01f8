"""GuestProcess.call's bound, without an appliance: a worker that never answers.

The disk's status is read while a timed-out call kills its worker (that takes an await), so
the reason must already say "timed out" then; "was cancelled" is only for a call cancelled
from outside (a launch made pointless by a changed config).
"""

from __future__ import annotations

import errno
import subprocess

import pytest
import trio

from vfsroot.guest_process import AttachOptions, GuestProcess, GuestProcessError


async def _silent_worker() -> GuestProcess:
    gp = GuestProcess("t", AttachOptions(call_timeout=0.2))
    gp.proc = await trio.lowlevel.open_process(
        ["sleep", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return gp


def _record_reason_at_kill(gp: GuestProcess, monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    seen: list[str | None] = []
    real_kill = gp.kill

    async def kill() -> None:
        seen.append(gp.dead_reason)
        await real_kill()

    monkeypatch.setattr(gp, "kill", kill)
    return seen


async def test_a_call_past_its_timeout_says_so_while_the_worker_is_killed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gp = await _silent_worker()
    seen = _record_reason_at_kill(gp, monkeypatch)
    with pytest.raises(GuestProcessError) as e:
        await gp.call("refresh", what="remount")
    assert e.value.errno == errno.ETIMEDOUT
    assert seen and all(r == "remount timed out after 0.2 s" for r in seen), seen
    assert gp.dead_reason == "remount timed out after 0.2 s"


async def test_a_call_cancelled_from_outside_says_cancelled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gp = await _silent_worker()
    seen = _record_reason_at_kill(gp, monkeypatch)
    with trio.move_on_after(0.1):
        await gp.call("launch", timeout=30, what="appliance launch", cancellable=True)
    assert seen == ["appliance launch was cancelled"]
    assert gp.dead_reason == "appliance launch was cancelled"
