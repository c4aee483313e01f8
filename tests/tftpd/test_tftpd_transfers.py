"""Transfers through our own client and raw packets: options, windows, rollover, retransmission
rules, probes, limits, isolation."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from tftpd import packets
from tftpd.client import TftpError, fetch
from tftpd.packets import Data, Error, OptionAck
from tftpd.server import ListenSpec
from tftpd.session import TransferPolicy

from .conftest import CLIENT_A, CLIENT_B, LOCAL
from .helpers import FAST, RawClient, file_sha256, running

SLOW_RETRANSMIT = replace(FAST, retransmit_timeout=5.0)


@pytest.mark.parametrize(("name", "blksize", "windowsize"), [
    ("1m.bin", None, None), ("secret-a", 8, None), ("1m.bin", 1428, None),
    ("1m.bin", 1468, 16), ("1m.bin", 512, 64), ("1m.bin", 1024, 7), ("secret-a", 8, 64),
])
async def test_fetch_with_options(tree: Path, name: str, blksize: int | None,
                                  windowsize: int | None) -> None:
    path = tree / CLIENT_A / name
    want, size = file_sha256(path), path.stat().st_size
    async with running(tree) as (server, addr):
        res = await fetch(addr, name, blksize=blksize, windowsize=windowsize, tsize=True,
                          bind=CLIENT_A)
    assert (res.size, res.sha256) == (size, want)
    assert res.options["tsize"] == str(size)
    if blksize:
        assert res.options["blksize"] == str(blksize)
    if windowsize:
        assert res.options["windowsize"] == str(windowsize)
    assert server.stats.completed == 1
    assert server.stats.retransmits == 0


async def test_spinning_for_acks_changes_nothing_but_timing(tree: Path) -> None:
    want = file_sha256(tree / CLIENT_A / "1m.bin")
    policy = replace(FAST, spin_seconds=0.0002)
    async with running(tree, policy=policy) as (server, addr):
        for w in (None, 8):
            res = await fetch(addr, "1m.bin", blksize=1024, windowsize=w, bind=CLIENT_A)
            assert res.sha256 == want
    assert server.stats.completed == 2


async def test_small_edge_sizes(tree: Path) -> None:
    async with running(tree) as (server, addr):
        empty = await fetch(addr, "empty", bind=CLIENT_A)
        exact = await fetch(addr, "exact512", bind=CLIENT_A)
        exact_w = await fetch(addr, "exact512", bind=CLIENT_A, windowsize=4)
    assert (empty.size, empty.blocks) == (0, 1)  # one empty DATA ends it
    assert (exact.size, exact.blocks) == (512, 2)  # full block, then an empty one
    assert (exact_w.size, exact_w.blocks) == (512, 2)
    assert server.stats.completed == 3


async def test_blksize_is_capped_by_the_operator(tree: Path) -> None:
    async with running(tree) as (_server, addr):
        res = await fetch(addr, "1m.bin", blksize=65464, windowsize=1000, bind=CLIENT_A)
    assert res.options == {"blksize": "1468", "windowsize": "64"}
    assert (res.size, res.sha256) == (1 << 20, file_sha256(tree / CLIENT_A / "1m.bin"))


async def test_unknown_and_malformed_options_are_not_answered(tree: Path) -> None:
    async with running(tree) as (_server, addr):
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("whoami", **{"BLKSIZE": 600, "x-vendor": 1, "timeout": 0, "TSize": 0})
            oack = await c.expect(OptionAck)
            assert oack.options == {"blksize": "600", "tsize": str(len(CLIENT_A) + 1)}
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("whoami", **{"x-vendor": 1, "blksize": 4})
            data = await c.expect(Data)  # nothing acceptable asked: plain RFC 1350
            assert data == Data(1, (CLIENT_A + "\n").encode())


async def test_netascii_is_converted(tree: Path) -> None:
    text = b"line one\nline two\r\nbare cr\r end\n"
    (tree / CLIENT_A / "text.cfg").write_bytes(text)
    want = text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    got = bytearray()
    async with running(tree) as (_server, addr):
        res = await fetch(addr, "text.cfg", mode="netascii", tsize=True, bind=CLIENT_A,
                          sink=got.extend)
    assert bytes(got) == want
    assert res.options["tsize"] == str(len(want))


async def test_netascii_large_file_across_chunks(tree: Path) -> None:
    lines = b"".join(b"%06d\n" % i for i in range(60000))  # 420 kB, > read-ahead chunk
    (tree / CLIENT_A / "lines.txt").write_bytes(lines)
    got = bytearray()
    async with running(tree) as (_server, addr):
        await fetch(addr, "lines.txt", mode="netascii", blksize=1000, windowsize=4,
                    bind=CLIENT_A, sink=got.extend)
    assert bytes(got) == lines.replace(b"\n", b"\r\n")


async def test_rollover_lockstep_512(rollover_tree: tuple[Path, str]) -> None:
    root, digest = rollover_tree
    async with running(root) as (server, addr):
        res = await fetch(addr, "33m.bin", blksize=512, bind=LOCAL)
    assert res.sha256 == digest
    assert res.blocks > 65536
    assert server.stats.completed == 1


async def test_rollover_inside_windows(rollover_tree: tuple[Path, str]) -> None:
    """Window 48 at 512 bytes: windows start at multiples of 48, so one spans 65535 -> 0."""
    root, digest = rollover_tree
    async with running(root) as (server, addr):
        res = await fetch(addr, "33m.bin", blksize=512, windowsize=48, bind=LOCAL)
    assert 65536 % 48 != 0  # the wrap falls inside a window ...
    assert res.options["windowsize"] == "48"  # ... of 48, as negotiated ...
    assert res.blocks > 65536  # ... and the transfer went past it
    assert res.sha256 == digest
    assert server.stats.completed == 1


async def test_errors_are_clear(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tftpd")
    async with running(tree) as (server, addr):
        with pytest.raises(TftpError) as exc:
            await fetch(addr, "no-such-file", bind=CLIENT_A)
        assert exc.value.code == 1
        with pytest.raises(TftpError) as exc:
            await fetch(addr, "subdir", bind=CLIENT_A)
        assert exc.value.code == 2 and "directory" in exc.value.message
        with pytest.raises(TftpError) as exc:
            await fetch(addr, "whoami", mode="mail", bind=CLIENT_A)
        assert exc.value.code == 4 and "mode" in exc.value.message
        with RawClient(addr, CLIENT_A) as c:  # a mode of 60 KB: echoed neither whole nor raw
            c.send_raw(b"\x00\x01whoami\x00" + b"\x01" * 60000 + b"\x00")
            err = await c.expect(Error)
            assert err.code == 4 and len(err.message) < 100 and "\\x01" in err.message
        with RawClient(addr, CLIENT_A) as c:
            c.send_raw(packets.encode_request(packets.OP_WRQ, "upload", "octet", {}))
            err = await c.expect(Error)
            assert err.code == 2 and "uploads are not supported" in err.message
    assert server.stats.not_found == 1
    assert server.stats.refused == 4
    assert max(len(r.getMessage()) for r in caplog.records) < 2000
    nf = [r for r in caplog.records if "no-such-file" in r.getMessage()]
    assert len(nf) == 1 and nf[0].levelno == logging.INFO  # probes are normal


async def test_one_log_line_per_transfer(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tftpd")
    # A 5 s retransmission timer: on a loaded machine the 0.1 s one of FAST fires during a
    # clean transfer and 'retransmits=0' would be about the machine, not the server.  The
    # server logs when it has seen the last ACK: wait for that (running() waits 0.5 s only,
    # then ends the transfer as 'shutdown').
    async with running(tree, policy=SLOW_RETRANSMIT) as (server, addr):
        await fetch(addr, "1m.bin", blksize=1428, windowsize=8, bind=CLIENT_A, retransmit=5.0)
        with trio.fail_after(10):
            await server.wait_idle()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("transfer ")]
    assert len(lines) == 1
    line = lines[0]
    for part in (f"client={CLIENT_A}", "file='1m.bin'", f"bytes={1 << 20}", "seconds=", "MB/s=",
                 "options=blksize=1428,windowsize=8", "retransmits=0", "outcome=ok"):
        assert part in line, (part, line)


async def test_clients_are_isolated(tree: Path) -> None:
    """127.0.0.10 never reads 127.0.0.11's directory, however it spells the name."""
    async with running(tree) as (server, addr):
        got = bytearray()
        await fetch(addr, "whoami", bind=CLIENT_A, sink=got.extend)
        assert bytes(got) == f"{CLIENT_A}\n".encode()
        got.clear()
        await fetch(addr, "/whoami", bind=CLIENT_B, sink=got.extend)  # iPXE's leading slash
        assert bytes(got) == f"{CLIENT_B}\n".encode()
        got.clear()
        await fetch(addr, "\\pxelinux.cfg\\default", bind=CLIENT_B, sink=got.extend)
        assert bytes(got) == f"DEFAULT {CLIENT_B}\n".encode()
        escapes = {
            "secret-b": 1,
            f"../{CLIENT_B}/secret-b": 2,
            f"/../{CLIENT_B}/secret-b": 2,
            f"..\\{CLIENT_B}\\secret-b": 2,
            f"pxelinux.cfg/../../{CLIENT_B}/secret-b": 2,
            f"{CLIENT_B}/secret-b": 1,
            "secret-b\n": 2,
            "\x01": 2,
        }
        for name, code in escapes.items():
            with pytest.raises(TftpError) as exc:
                await fetch(addr, name, bind=CLIENT_A)
            assert exc.value.code == code, name
        (tree / CLIENT_A / "evil").symlink_to(f"../{CLIENT_B}/secret-b")
        with pytest.raises(TftpError) as exc:
            await fetch(addr, "evil", bind=CLIENT_A)
        assert exc.value.code == 2
        # NUL inside the name: the name ends there and "b\0octet" is not a mode we serve.
        with RawClient(addr, CLIENT_A) as c:
            c.send_raw(b"\x00\x01secret-a\x00b\x00octet\x00")
            err = await c.expect(Error)
            assert err.code == 4
    assert server.stats.completed == 3


async def test_duplicate_ack_resends_exactly_once(tree: Path) -> None:
    """U-Boot re-sends its last ACK after its own timeout: one resend per duplicate."""
    async with running(tree, policy=SLOW_RETRANSMIT) as (server, addr):
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("secret-a")
            assert (await c.expect(Data)).block == 1
            c.ack(1)
            d2 = await c.expect(Data)
            assert d2.block == 2
            for _ in range(3):  # three U-Boot timeouts in a row
                await trio.sleep(0.05)
                c.ack(1)
                again = await c.expect(Data, timeout=1.0)
                assert again == d2
                assert await c.quiet(0.15) == []  # exactly one, no storm
            c.ack(2)
            assert (await c.expect(Data)).block == 3
            c.send_peer(packets.encode_error(0, "done"))
    assert server.stats.duplicate_acks == 3
    assert server.stats.retransmits == 3
    assert server.stats.aborted_by_client == 1


async def test_sorcerers_apprentice_is_not_amplified(tree: Path) -> None:
    """A client that ACKs every DATA twice must not make us send every block twice."""
    async with running(tree, policy=SLOW_RETRANSMIT) as (server, addr):
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("secret-a")  # 70000 bytes: 137 blocks
            received = 0
            while True:
                d = await c.expect(Data)
                received += 1
                c.ack(d.block)
                c.ack(d.block)
                if len(d.payload) < 512:
                    break
    blocks = 70000 // 512 + 1
    assert received <= blocks * 1.1, (received, blocks)
    assert server.stats.duplicate_acks >= blocks - 2


async def test_stale_and_future_acks_are_ignored(tree: Path) -> None:
    async with running(tree, policy=SLOW_RETRANSMIT) as (server, addr):
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("secret-a")
            await c.expect(Data)
            c.ack(1)
            await c.expect(Data)
            c.ack(2)
            assert (await c.expect(Data)).block == 3
            for odd in (40000, 9, 0, 65535, 1):  # never sent, or long acknowledged
                c.ack(odd)
            assert await c.quiet(0.2) == []
            c.ack(3)
            assert (await c.expect(Data)).block == 4
            c.send_peer(packets.encode_error(0, "enough"))
    assert server.stats.aborted_by_client == 1


async def test_windowed_mid_window_ack_restarts_after_it(tree: Path) -> None:
    async with running(tree, policy=SLOW_RETRANSMIT) as (_server, addr):
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("secret-a", windowsize=4)
            await c.expect(OptionAck)
            c.ack(0)
            assert [(await c.expect(Data)).block for _ in range(4)] == [1, 2, 3, 4]
            await trio.sleep(0.05)
            c.ack(2)  # "I lost 3"
            assert [(await c.expect(Data)).block for _ in range(4)] == [3, 4, 5, 6]
            assert await c.quiet(0.1) == []
            c.send_peer(packets.encode_error(0, "enough"))


async def test_timeout_retransmits_then_gives_up(tree: Path) -> None:
    policy = TransferPolicy(retransmit_timeout=0.05, retries=3)
    async with running(tree, policy=policy) as (server, addr):
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("secret-a")
            seen = [await c.expect(Data) for _ in range(4)]  # first + 3 retransmissions
            assert {d.block for d in seen} == {1}
            err = await c.expect(Error)
            assert "timed out" in err.message
    assert server.stats.timeouts == 1
    assert server.stats.retransmits == 3


async def test_client_timeout_option_sets_the_retransmit_interval(tree: Path) -> None:
    async with running(tree, policy=replace(FAST, retransmit_timeout=0.05)) as (_s, addr):
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("secret-a", timeout=1)
            await c.expect(OptionAck)
            assert await c.quiet(0.5) == []  # 1 s asked: no resend at 0.05 s
            assert isinstance((await c.recv(1.0))[0], OptionAck)


async def test_tsize_probe_then_abort_is_quiet(tree: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """PXE/UEFI/RPi: tsize, read the OACK, ERROR, then fetch again from a new port."""
    caplog.set_level(logging.DEBUG, logger="tftpd")
    async with running(tree) as (server, addr):
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("secret-a", tsize=0, blksize=1468)
            oack = await c.expect(OptionAck)
            assert oack.options == {"tsize": "70000", "blksize": "1468"}
            c.send_peer(packets.encode_error(8, "User aborted the transfer"))
            assert await c.quiet(0.5) == []  # never answer an ERROR
        res = await fetch(addr, "secret-a", tsize=True, blksize=1468, bind=CLIENT_A)
        assert (res.size, res.sha256) == (70000, file_sha256(tree / CLIENT_A / "secret-a"))
    assert server.stats.aborted_by_client == 1
    assert server.stats.completed == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_retransmitted_rrq_does_not_start_a_second_transfer(tree: Path) -> None:
    async with running(tree, policy=SLOW_RETRANSMIT) as (server, addr):
        with RawClient(addr, CLIENT_A) as c:
            for _ in range(3):
                c.rrq("secret-a", blksize=1024)
            oack = await c.expect(OptionAck)
            assert oack.options == {"blksize": "1024"}
            assert await c.quiet(0.3) == []  # one session, one OACK
            assert server.stats.active == 1
            c.ack(0)
            assert (await c.expect(Data)).block == 1
            c.send_peer(packets.encode_error(0, "done"))
    assert server.stats.duplicate_requests == 2
    assert server.stats.requests == 3


async def test_session_limits(tree: Path) -> None:
    async with running(tree, policy=SLOW_RETRANSMIT, max_sessions=3,
                       max_sessions_per_ip=2) as (server, addr):
        held = [RawClient(addr, CLIENT_A) for _ in range(2)]
        for c in held:
            c.rrq("secret-a")
            await c.expect(Data)
        with RawClient(addr, CLIENT_A) as third:
            third.rrq("secret-a")
            err = await third.expect(Error)
            assert "too many transfers" in err.message and "limit 2" in err.message
        res = await fetch(addr, "secret-b", bind=CLIENT_B)  # other clients still served
        assert (res.size, res.sha256) == (70000, file_sha256(tree / CLIENT_B / "secret-b"))
        with trio.fail_after(2):
            while server.stats.active > 2:  # the server has yet to see the final ACK
                await trio.sleep(0.01)
        held.append(RawClient(addr, CLIENT_B))
        held[-1].rrq("secret-b")
        await held[-1].expect(Data)
        with RawClient(addr, "127.0.0.12") as fourth:
            fourth.rrq("x")
            err = await fourth.expect(Error)
            assert "server busy" in err.message
        for c in held:
            c.close()
    assert server.stats.busy_rejections == 2


async def test_memory_per_session_is_bounded(tree: Path) -> None:
    """The block source never holds more than the window plus one read-ahead chunk (as DATA
    frames: 4 header bytes per block)."""

    from tftpd.session import BlockSource, FileHandle

    path = tree / CLIENT_A / "big.bin"
    want = file_sha256(path)
    for prefetch in (False, True):
        fd = os.open(path, os.O_RDONLY)
        handle = FileHandle(fd)
        source = BlockSource(handle, 1024, 64 * 1024, trio.CapacityLimiter(1))
        peak = 0
        seq = 1
        got = hashlib.sha256()
        async with trio.open_nursery() as nursery:
            if prefetch:
                source.start_prefetch(nursery.start_soon)
            try:
                while True:
                    data = await source.block(seq)
                    got.update(data)
                    source.release_before(max(1, seq - 15))  # a 16-block window
                    held = source.held_bytes()
                    peak = max(peak, held)
                    if len(data) < 1024:
                        break
                    seq += 1
            finally:
                source.close()
                handle.close()
        assert got.hexdigest() == want
        # window + the chunk being sent + (with read-ahead) the next chunk
        assert peak <= (16 + (2 if prefetch else 1) * 64 + 1) * 1028, (prefetch, peak)


async def test_dual_stack_socket_normalises_mapped_clients(tree: Path) -> None:
    """An IPv4 client on an IPv6 socket arrives as ::ffff:a.b.c.d and gets its own tree."""
    listen = (ListenSpec("::ffff:127.0.0.1", 0, socket.AF_INET6),)
    async with running(tree, listen=listen) as (_server, addr):
        got = bytearray()
        res = await fetch(("127.0.0.1", addr[1]), "whoami", bind=CLIENT_B, sink=got.extend)
    assert bytes(got) == f"{CLIENT_B}\n".encode()
    assert (res.size, res.sha256) == (len(got), hashlib.sha256(got).hexdigest())


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4", "dual-stack"])
async def test_replies_come_from_the_address_the_request_went_to(tree: Path,
                                                                 dual_stack: bool) -> None:
    """IP_PKTINFO: a wildcard listener (confined to lo) answers each request from the address
    it was sent to, as multi-homed boot servers must -- also the default listener, dual-stack
    ``[::]``, to IPv4 clients (IPV6_PKTINFO with the v4-mapped address)."""
    if dual_stack:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    sock.bind(("::" if dual_stack else "0.0.0.0", 0))
    port = sock.getsockname()[1]
    async with running(tree, listen=(), inherited_fds=(sock.detach(),)) as (_server, _addr):
        for dest in ("127.0.0.2", "127.0.0.3"):
            with RawClient((dest, port), CLIENT_A) as c:
                c.rrq("whoami")
                got = await c.recv()
                assert got is not None
                packet, source = got
                assert isinstance(packet, Data)
                assert source[0] == dest
                c.ack(1)
            with RawClient((dest, port), CLIENT_A) as c:  # errors from the listen socket too
                c.send_raw(b"\x00\x09junk")
                got = await c.recv()
                assert got is not None and isinstance(got[0], Error)
                assert got[1] == (dest, port)


async def test_refusals_before_any_file_share_the_error_rate_limit(tree: Path) -> None:
    """Uploads, modes and paths are refused from a session socket, and such a session ends at
    once (no per-client limit holds them): from a spoofed source they would make us a
    reflector, so their ERRORs take from the listen sockets' rate limit (1/s, burst 2 here).
    Every refusal is still logged and counted."""
    async with running(tree, error_replies_per_second=1.0) as (server, addr):
        with RawClient(addr, CLIENT_A) as c:
            for i in range(30):
                c.send_raw(b"\x00\x02a\x00octet\x00" if i % 2 else b"\x00\x01a\x00\x00")
                await trio.sleep(0.005)
            errors = [p for p in await c.quiet(1.0) if isinstance(p, Error)]
        assert 1 <= len(errors) <= 3
        with pytest.raises(TftpError) as exc:  # "file not found" is never held back
            await fetch(addr, "no-such-file", bind=CLIENT_A)
        assert exc.value.code == 1
    assert server.stats.refused == 30


async def test_what_is_refused_or_ignored_at_the_listen_port_is_logged_within_bounds(
        tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every refused or ignored datagram reaches the log, but a flood of them does not fill
    it: 10 lines a second per kind, then the next line says how many were left out.  A
    request that comes while the server stops is not answered (firmware would give up the
    boot on an ERROR, and its retry reaches the restarted server), but it is logged."""
    caplog.set_level(logging.INFO, logger="tftpd")
    async with running(tree, error_replies_per_second=1e6) as (server, addr):
        with RawClient(addr, CLIENT_A) as c:
            for _ in range(30):
                c.send_raw(b"\x00\x09junk")
            c.send_raw(packets.encode_ack(1))  # an ACK at the listen port: ignored, said
            await c.quiet(0.3)
            malformed = [r.getMessage() for r in caplog.records
                         if r.getMessage().startswith("malformed request")]
            assert len(malformed) == 10
            await trio.sleep(1.1)
            c.send_raw(b"\x00\x09junk")
            await c.quiet(0.2)
        last = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("malformed request")][-1]
        assert last.endswith("(20 similar lines left out)")
        assert any("Ack at the listen port ignored" in r.getMessage() for r in caplog.records)
        server.limits.stop()
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("whoami")
            assert await c.quiet(0.3) == []
    assert server.stats.malformed == 31
    assert any("the server is stopping" in r.getMessage() for r in caplog.records)


async def test_no_descriptor_leaks_whatever_the_outcome(tree: Path) -> None:
    """Completed, timed out, aborted, refused, client gone: every file and socket is closed."""
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    policy = TransferPolicy(retransmit_timeout=0.05, retries=1)
    async with running(tree, policy=policy) as (server, addr):
        before = open_fds()
        await fetch(addr, "1m.bin", blksize=1468, windowsize=8, bind=CLIENT_A)
        with RawClient(addr, CLIENT_A) as c:  # times out
            c.rrq("secret-a")
            assert [type(await c.expect(object)) for _ in range(3)] == [Data, Data, Error]
        with RawClient(addr, CLIENT_A) as c:  # aborts after the OACK
            c.rrq("secret-a", tsize=0)
            await c.expect(OptionAck)
            c.send_peer(packets.encode_error(8, "probe"))
        with RawClient(addr, CLIENT_A) as c:  # goes away mid-transfer
            c.rrq("big.bin")
            await c.expect(Data)
        with pytest.raises(TftpError):
            await fetch(addr, "../x", bind=CLIENT_A)
        with trio.fail_after(5):
            await server.wait_idle()
        assert open_fds() == before
    assert server.stats.timeouts == 1
    assert server.stats.aborted_by_client == 1
    assert server.stats.client_gone + server.stats.timeouts == 2


async def test_a_blocked_read_does_not_stall_other_clients(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FUSE tree can block on a disk: reads run in worker threads, so one client's stuck
    read leaves everybody else's transfers running."""
    import threading
    import time

    from tftpd import session as session_mod

    gate = threading.Event()
    real = session_mod.FileHandle.readinto_frames

    def readinto_frames(self, frames: object, n: int, offset: int) -> int:
        if threading.current_thread() is not threading.main_thread() and offset > 0 and (
                getattr(self, "_slow", False)):
            gate.wait(10)
        return real(self, frames, n, offset)

    real_init = session_mod.FileHandle.__init__

    def init(self, fd: int, expect: tuple[int, int] | None = None) -> None:
        real_init(self, fd, expect)
        self._slow = os.readlink(f"/proc/self/fd/{fd}").endswith("1m.bin")

    monkeypatch.setattr(session_mod.FileHandle, "readinto_frames", readinto_frames)
    monkeypatch.setattr(session_mod.FileHandle, "__init__", init)
    async with running(tree) as (server, addr), trio.open_nursery() as nursery:
        slow_done = trio.Event()

        async def slow() -> None:
            res = await fetch(addr, "1m.bin", blksize=1024, bind=CLIENT_A, retransmit=5)
            assert res.sha256 == file_sha256(tree / CLIENT_A / "1m.bin")
            slow_done.set()

        nursery.start_soon(slow)
        await trio.sleep(0.2)  # the slow transfer is now stuck on its second read
        t0 = time.monotonic()
        for _ in range(3):
            res = await fetch(addr, "secret-b", windowsize=4, bind=CLIENT_B)
            assert (res.size, res.sha256) == (70000, file_sha256(tree / CLIENT_B / "secret-b"))
        assert time.monotonic() - t0 < 5
        assert not slow_done.is_set()
        gate.set()
    assert server.stats.completed == 4


async def test_read_errors_end_only_that_transfer(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import errno

    from tftpd import session as session_mod

    real = session_mod.FileHandle.readinto_frames

    def failing(self, frames: object, n: int, offset: int) -> int:
        if offset > 0:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, frames, n, offset)

    caplog.set_level(logging.INFO, logger="tftpd")
    async with running(tree, policy=replace(FAST, read_ahead=65536)) as (server, addr):
        monkeypatch.setattr(session_mod.FileHandle, "readinto_frames", failing)
        with pytest.raises(TftpError) as exc:
            await fetch(addr, "big.bin", blksize=1024, bind=CLIENT_A)
        assert "Input/output error" in exc.value.message
        monkeypatch.undo()
        res = await fetch(addr, "big.bin", blksize=1024, bind=CLIENT_A)
        assert (res.size, res.sha256) == (3_000_000, file_sha256(tree / CLIENT_A / "big.bin"))
    assert server.stats.errors == 1 and server.stats.completed == 1
    line = next(r for r in caplog.records if "outcome=read-error" in r.getMessage())
    assert line.levelno == logging.WARNING and not line.exc_info


async def test_port_range_and_several_listen_addresses(tree: Path) -> None:
    """--port-range confines transfer sockets (firewalls); running out of ports is a clear
    ERROR, not a hang; every --listen address serves."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    lo = probe.getsockname()[1]
    probe.close()
    listen = (ListenSpec("127.0.0.1", 0, socket.AF_INET), ListenSpec("127.0.0.2", 0,
                                                                     socket.AF_INET))
    async with running(tree, listen=listen, port_range=(lo, lo),
                       policy=SLOW_RETRANSMIT) as (server, _addr):
        a1, a2 = server.addresses
        with RawClient(a1, CLIENT_A) as c:
            c.rrq("secret-a")
            got = await c.recv()
            assert got is not None and isinstance(got[0], Data)
            assert got[1] == ("127.0.0.1", lo)  # the one port of the range
            with RawClient(a1, CLIENT_B) as other:  # the range is used up on 127.0.0.1 ...
                other.rrq("secret-b")
                err = await other.expect(Error)
                assert "transfer port" in err.message
            # ... but not on 127.0.0.2: sessions bind the address the request was sent to.
            res = await fetch(a2, "whoami", bind=CLIENT_B)
            assert res.server_port == lo
            c.send_peer(packets.encode_error(0, "done"))
        await server.wait_idle()
        res = await fetch(a1, "whoami", bind=CLIENT_B)  # the port is free again
        assert res.server_port == lo
