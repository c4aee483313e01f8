"""The file opener: helper processes that open (and read small files whole) for the sessions.

The message format is tested as a pure function; the pool with real helper processes: what
comes back for every kind of file, and what happens when a helper dies, hangs or cannot be
started -- the server must keep serving in every case.  The servers here open nothing inline
(``inline_open=False``): the test tree is on a local filesystem, where the inline open
(tftpd/inline_open.py) would take every file before the helper is asked.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


@given(st.integers(0, 2**32 - 1), no_nul, no_nul, st.integers(0, 2**32 - 1))
def test_request_round_trip(ident: int, client: str, relpath: str, small: int) -> None:
    assert decode_request(encode_request(ident, client, relpath, small)) == (
        ident, client, relpath, min(small, WHOLE_MAX))


@given(st.binary(max_size=100).filter(lambda b: b"\0" not in b))
def test_request_names_that_are_not_utf8_survive(raw: bytes) -> None:
    """A request name is bytes in the packet: what is not UTF-8 arrives as surrogate escapes
    and must reach the helper unchanged."""
    relpath = raw.decode("utf-8", "surrogateescape")
    assert decode_request(encode_request(7, CLIENT_A, relpath, 10))[2] == relpath


def _kind(reply: bytes) -> tuple[int, int, int, int]:
    """(kind, code, size or errno, mtime) of a reply to request id 7."""
    ident, *rest = REPLY.unpack_from(reply)
    assert ident == 7
    return tuple(rest)  # type: ignore[return-value]


def test_answer_reads_small_files_whole_and_passes_big_ones_as_descriptors(
        tree: Path) -> None:
    roots = ClientRoots(tree)
    reply, fd = answer(roots, encode_request(7, CLIENT_A, "whoami", 1024))
    assert fd is None
    kind, _code, size, mtime = _kind(reply)
    st_ = os.stat(tree / CLIENT_A / "whoami")
    assert (kind, size, mtime) == (WHOLE, st_.st_size, st_.st_mtime_ns)
    assert reply[REPLY.size:] == f"{CLIENT_A}\n".encode()

    reply, fd = answer(roots, encode_request(7, CLIENT_A, "1m.bin", 1024))
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
    reply, fd = answer(ClientRoots(tree), encode_request(7, client, name, 1024))
    assert fd is None
    assert _kind(reply)[:2] == (REFUSED, code)
    assert reply[REPLY.size:]  # a message for the ERROR packet and the log


def test_answer_reports_a_read_error_as_failed(tree: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    def pread(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pread", pread)
    reply, fd = answer(ClientRoots(tree), encode_request(7, CLIENT_A, "whoami", 1024))
    assert fd is None
    kind, _code, err, _ = _kind(reply)
    assert (kind, err) == (FAILED, errno.EIO)
    assert reply[REPLY.size:] == b"Input/output error"


@asynccontextmanager
async def pool_running(tree: Path, boot: str | None = None,
                       threads: int = 4) -> AsyncIterator[OpenerPool]:
    pool = OpenerPool(ClientRoots(tree), trio.CapacityLimiter(threads))
    pool.start()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            yield pool
            nursery.cancel_scope.cancel()
    finally:
        pool.close()


#: A helper whose opens of "stall" wait until the file "go" exists (a disk that hangs).
STALLING = ("import sys, os, time; sys.path.insert(0, {parent!r}); "
            "import tftpd.roots as r; real = r.ClientRoots.open\n"
            "def stall(self, client, rel):\n"
            "    while rel == 'stall' and not os.path.exists(os.path.join(str(self.root), 'go')):"
            " time.sleep(0.01)\n"
            "    return real(self, client, rel)\n"
            "r.ClientRoots.open = stall\n"
            "from tftpd.opener_process import main; main(sys.argv[1:])")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_pool_opens_reads_and_refuses(tree: Path) -> None:
    async with pool_running(tree) as pool:
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
        # A burst: more requests at once than the helper's socket queues (ten).
        async with trio.open_nursery() as nursery:
            for i in range(40):
                client = CLIENT_A if i % 2 else CLIENT_B

                async def one(client: str = client) -> None:
                    _, data = await pool.open(client, "whoami", 1024)
                    assert data == f"{client}\n".encode()

                nursery.start_soon(one)
        assert pool.spawned == 1


async def test_a_dead_helper_is_replaced(tree: Path) -> None:
    """Killed (the OOM killer, an operator): a new helper starts at once and the next
    request does not notice."""
    async with pool_running(tree) as pool:
        assert pool._helper is not None
        pid = pool._helper.proc.pid
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(10):
            _, data = await pool.open(CLIENT_A, "whoami", 1024)
        assert data == f"{CLIENT_A}\n".encode()
        assert pool.spawned == 2 and pool._helper.proc.pid != pid


async def test_a_stuck_open_holds_back_only_its_own_request(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An open stuck on its disk holds one of the helper's threads: other requests are
    answered meanwhile.  A request that stops waiting drops its late reply, descriptor
    included."""
    monkeypatch.setattr(opener_mod, "_BOOT", STALLING)
    (tree / CLIENT_A / "stall").write_bytes(b"x" * 300_000)  # comes back as a descriptor
    before = _open_fds()
    async with pool_running(tree) as pool:
        with trio.move_on_after(0.3) as scope:
            await pool.open(CLIENT_A, "stall", 1024)
        assert scope.cancelled_caught
        with trio.fail_after(10):
            _, data = await pool.open(CLIENT_B, "whoami", 1024)
        assert data == f"{CLIENT_B}\n".encode()
        (tree / "go").write_bytes(b"")
        with trio.fail_after(10):
            opened, _ = await pool.open(CLIENT_A, "stall", 1024)
        os.close(opened.fd)
        await trio.sleep(0.1)
        assert not pool._waiting
        assert pool.spawned == 1
    assert _open_fds() == before


async def test_helpers_that_cannot_run_leave_opens_to_threads(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A helper that exits with an error before its first answer (a broken installation):
    one warning, and that request and every later one open in a worker thread."""
    monkeypatch.setattr(opener_mod, "_BOOT", "import sys; sys.exit(3)  # {parent}")
    async with running(tree, inline_open=False) as (server, addr):
        for name in ("whoami", "secret-a", "whoami"):
            res = await fetch(addr, name, bind=CLIENT_A)
            assert res.sha256 == file_sha256(tree / CLIENT_A / name)
        assert server.opener is not None and not server.opener.available
    assert server.stats.completed == 3 and server.stats.errors == 0
    warnings = [r for r in caplog.records if "worker threads" in r.getMessage()]
    assert len(warnings) == 1 and "status 3" in warnings[0].getMessage()


async def test_server_keeps_serving_when_its_helper_dies(tree: Path) -> None:
    async with running(tree, inline_open=False) as (server, addr):
        res = await fetch(addr, "1m.bin", bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "1m.bin")
        assert server.opener is not None and server.opener._helper is not None
        os.kill(server.opener._helper.proc.pid, signal.SIGKILL)
        res = await fetch(addr, "whoami", bind=CLIENT_B)
        assert res.size == len(CLIENT_B) + 1
    assert server.stats.completed == 2 and server.stats.errors == 0


async def test_without_helpers_opens_run_in_threads(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No interpreter to start helpers with (an embedding application): a warning, and the
    server opens files in worker threads as before."""
    monkeypatch.setattr(opener_mod.sys, "executable", "/nonexistent/python")
    async with running(tree, inline_open=False) as (server, addr):
        res = await fetch(addr, "secret-a", bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "secret-a")
        res = await fetch(addr, "whoami", bind=CLIENT_A)
        assert res.size == len(CLIENT_A) + 1
        assert server.opener is not None and not server.opener.available
    assert server.stats.completed == 2
    assert any("worker threads" in r.getMessage() for r in caplog.records)


async def test_the_helper_ends_with_the_server(tree: Path) -> None:
    """No helper outlives its server: stopping closes its socket, and it is reaped."""
    async with running(tree, inline_open=False) as (server, addr):
        await fetch(addr, "whoami", bind=CLIENT_A)
        assert server.opener is not None and server.opener._helper is not None
        pid = server.opener._helper.proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
