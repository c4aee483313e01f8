"""The file opener: helper processes that open (and read small files whole) for the sessions.

The message format is tested as a pure function; the pool with real helper processes: what
comes back for every kind of file, and what happens when a helper dies, hangs or cannot be
started -- the server must keep serving in every case.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tftpd import opener as opener_mod
from tftpd.client import fetch
from tftpd.opener import OpenerPool
from tftpd.opener_process import (
    FAILED,
    OPENED,
    REFUSED,
    REPLY,
    WHOLE,
    WHOLE_MAX,
    answer,
    decode_request,
    encode_request,
)
from tftpd.roots import ClientRoots, OpenRefused

from .conftest import CLIENT_A, CLIENT_B
from .helpers import file_sha256, running

no_nul = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                 max_size=200)


@given(no_nul, no_nul, st.integers(0, 2**32 - 1))
def test_request_round_trip(client: str, relpath: str, small: int) -> None:
    assert decode_request(encode_request(client, relpath, small)) == (
        client, relpath, min(small, WHOLE_MAX))


@given(st.binary(max_size=100).filter(lambda b: b"\0" not in b))
def test_request_names_that_are_not_utf8_survive(raw: bytes) -> None:
    """A request name is bytes in the packet: what is not UTF-8 arrives as surrogate escapes
    and must reach the helper unchanged."""
    relpath = raw.decode("utf-8", "surrogateescape")
    assert decode_request(encode_request(CLIENT_A, relpath, 10))[1] == relpath


def _kind(reply: bytes) -> tuple[int, int, int, int]:
    return REPLY.unpack_from(reply)


def test_answer_reads_small_files_whole_and_passes_big_ones_as_descriptors(
        tree: Path) -> None:
    roots = ClientRoots(tree)
    reply, fd = answer(roots, encode_request(CLIENT_A, "whoami", 1024))
    assert fd is None
    kind, _code, size, mtime = _kind(reply)
    st_ = os.stat(tree / CLIENT_A / "whoami")
    assert (kind, size, mtime) == (WHOLE, st_.st_size, st_.st_mtime_ns)
    assert reply[REPLY.size:] == f"{CLIENT_A}\n".encode()

    reply, fd = answer(roots, encode_request(CLIENT_A, "1m.bin", 1024))
    assert fd is not None
    try:
        assert _kind(reply)[:3] == (OPENED, 0, 1 << 20)
        assert os.pread(fd, 16, 0) == (tree / CLIENT_A / "1m.bin").read_bytes()[:16]
    finally:
        os.close(fd)


@pytest.mark.parametrize(("client", "name", "code"), [
    (CLIENT_A, "missing", 1),
    (CLIENT_A, "subdir", 2),
    (CLIENT_B, "secret-a", 1),  # another client's file is simply not there
    (CLIENT_A, "escape", 2),  # a symlink out of the client's directory
])
def test_answer_refusals_carry_the_tftp_code(tree: Path, client: str, name: str,
                                             code: int) -> None:
    (tree / CLIENT_A / "escape").symlink_to(tree / CLIENT_B / "secret-b")
    reply, fd = answer(ClientRoots(tree), encode_request(client, name, 1024))
    assert fd is None
    assert _kind(reply)[:2] == (REFUSED, code)
    assert reply[REPLY.size:]  # a message for the ERROR packet and the log


def test_answer_reports_a_read_error_as_failed(tree: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    def pread(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pread", pread)
    reply, fd = answer(ClientRoots(tree), encode_request(CLIENT_A, "whoami", 1024))
    assert fd is None
    kind, _code, err, _ = _kind(reply)
    assert (kind, err) == (FAILED, errno.EIO)
    assert reply[REPLY.size:] == b"Input/output error"


def _pids(pool: OpenerPool) -> list[int]:
    return [h.proc.pid for h in pool._idle]


async def test_pool_opens_reads_and_refuses(tree: Path) -> None:
    pool = OpenerPool(ClientRoots(tree), trio.CapacityLimiter(4))
    pool.start()
    try:
        opened, data = await pool.open(CLIENT_A, "pxelinux.cfg/default", 1024)
        assert data == f"DEFAULT {CLIENT_A}\n".encode() and opened.fd == -1
        assert opened.path == f"{tree}/{CLIENT_A}/pxelinux.cfg/default"
        opened, data = await pool.open(CLIENT_A, "big.bin", 1024)
        assert data is None and opened.size == 3_000_000
        with os.fdopen(opened.fd, "rb") as f:
            assert f.read() == (tree / CLIENT_A / "big.bin").read_bytes()
        with pytest.raises(OpenRefused) as exc:
            await pool.open(CLIENT_B, "secret-a", 1024)
        assert exc.value.code == 1
        assert pool.spawned == 1  # one helper did all of it
    finally:
        pool.close()


async def test_a_dead_helper_is_replaced(tree: Path) -> None:
    """Killed while idle (the OOM killer, an operator): the next request gets a new helper
    and does not notice."""
    pool = OpenerPool(ClientRoots(tree), trio.CapacityLimiter(4))
    pool.start()
    try:
        (pid,) = _pids(pool)
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(10):
            _, data = await pool.open(CLIENT_A, "whoami", 1024)
        assert data == f"{CLIENT_A}\n".encode()
        assert pool.spawned == 2 and _pids(pool) != [pid]
    finally:
        pool.close()


async def test_a_stuck_helper_holds_back_only_its_own_request(tree: Path) -> None:
    """A helper stuck in an open (a FUSE tree waiting on its disk; here: stopped) does not
    stop the others: after ``spawn_after`` the next request starts another helper.  The stuck
    request, once abandoned, kills its helper."""
    pool = OpenerPool(ClientRoots(tree), trio.CapacityLimiter(4), spawn_after=0.05)
    pool.start()
    try:
        (pid,) = _pids(pool)
        os.kill(pid, signal.SIGSTOP)
        async with trio.open_nursery() as nursery:
            stuck = trio.CancelScope()

            async def stuck_request() -> None:
                with stuck:
                    await pool.open(CLIENT_A, "whoami", 1024)
                    raise AssertionError("a stopped helper answered")

            nursery.start_soon(stuck_request)
            await trio.sleep(0.1)
            with trio.fail_after(10):
                _, data = await pool.open(CLIENT_B, "whoami", 1024)
            assert data == f"{CLIENT_B}\n".encode()
            stuck.cancel()
        assert pool.spawned == 2
        with trio.fail_after(5):
            while True:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break  # reaped by the pool
                if done:
                    assert os.WIFSIGNALED(status)
                    break
                await trio.sleep(0.02)
    finally:
        pool.close()


async def test_helpers_that_cannot_run_leave_opens_to_threads(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A helper that exits with an error before its first answer (a broken installation):
    one warning, and that request and every later one open in a worker thread."""
    monkeypatch.setattr(opener_mod, "_BOOT", "import sys; sys.exit(3)  # {parent}")
    async with running(tree) as (server, addr):
        for name in ("whoami", "secret-a", "whoami"):
            res = await fetch(addr, name, bind=CLIENT_A)
            assert res.sha256 == file_sha256(tree / CLIENT_A / name)
        assert server.opener is not None and not server.opener.available
        assert server.opener.spawned == 1
    assert server.stats.completed == 3 and server.stats.errors == 0
    warnings = [r for r in caplog.records if "worker threads" in r.getMessage()]
    assert len(warnings) == 1 and "status 3" in warnings[0].getMessage()


async def test_server_keeps_serving_when_its_helper_dies(tree: Path) -> None:
    async with running(tree) as (server, addr):
        res = await fetch(addr, "1m.bin", bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "1m.bin")
        assert server.opener is not None
        for pid in _pids(server.opener):
            os.kill(pid, signal.SIGKILL)
        res = await fetch(addr, "whoami", bind=CLIENT_B)
        assert res.size == len(CLIENT_B) + 1
    assert server.stats.completed == 2 and server.stats.errors == 0


async def test_without_helpers_opens_run_in_threads(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No interpreter to start helpers with (an embedding application): a warning, and the
    server opens files in worker threads as before."""
    monkeypatch.setattr(opener_mod.sys, "executable", "/nonexistent/python")
    async with running(tree) as (server, addr):
        res = await fetch(addr, "secret-a", bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "secret-a")
        res = await fetch(addr, "whoami", bind=CLIENT_A)
        assert res.size == len(CLIENT_A) + 1
        assert server.opener is not None and not server.opener.available
    assert server.stats.completed == 2
    assert any("worker threads" in r.getMessage() for r in caplog.records)
