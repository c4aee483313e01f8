"""The vfsroot-tftpd command: exit codes, SIGTERM grace, systemd socket activation, IPv4
fallback."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tftpd import packets
from tftpd import server as server_mod
from tftpd.client import fetch
from tftpd.server import ServerConfig, TftpServer

from .conftest import CLIENT_A
from .helpers import FAST, DaemonProcess, RawClient, file_sha256, io_uring_refused

PY = sys.executable


class Cli(DaemonProcess):
    """vfsroot-tftpd in a subprocess; knows its port from the 'listening' log line."""

    port = 0


async def start_cli(args: list[str], **kw: object) -> Cli:
    proc = await trio.lowlevel.open_process(
        [PY, "-c", "import sys; from tftpd.cli import main; sys.exit(main())", *args],
        stderr=subprocess.PIPE, **kw)
    cli = Cli(proc)
    m = await cli.read_until(rb"listening addresses=[^ ]*:(\d+)")
    cli.port = int(m.group(1))
    return cli


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-c", "import sys; from tftpd.cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True, timeout=30)


def test_usage_errors_exit_2() -> None:
    for args in (["--port-range", "9:1"], ["--blksize-max", "7"], ["--windowsize-max", "0"],
                 ["-4", "-6"], ["--bogus"]):
        proc = run_cli(args)
        assert proc.returncode == 2, (args, proc.stderr)


def test_operator_mistakes_exit_1_with_one_line(tmp_path: Path) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        for args, words in (
            (["--listen", f"127.0.0.1:{port}"], "Address already in use"),
            (["--listen", "nothost:69"], "numeric IP address"),
            (["--listen", "[::1]:69", "-4"], "-4 given"),
            (["--listen", "systemd"], "no socket passed"),
        ):
            proc = run_cli(["--root", str(tmp_path), *args])
            assert proc.returncode == 1, (args, proc.stderr)
            assert words in proc.stderr
            assert "Traceback" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finally:
        busy.close()


async def test_serves_and_stops_on_sigterm(tree: Path) -> None:
    cli = await start_cli(["--root", str(tree), "--listen", "127.0.0.1:0"])
    try:
        res = await fetch(("127.0.0.1", cli.port), "1m.bin", blksize=1428, windowsize=16,
                          bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "1m.bin")
        await cli.read_until(rb"transfer client=127\.0\.0\.10 .*outcome=ok")
        cli.proc.send_signal(signal.SIGTERM)
        assert await cli.wait() == 0
        assert b"stopped" in cli.log
    finally:
        cli.proc.kill()


@pytest.mark.parametrize(("flag", "lane"), [([], rb"compiled\+io_uring"),
                                            (["--no-batch-sends"], rb"compiled"),
                                            (["--python-lane"], rb"python")])
async def test_the_lock_step_lane_is_compiled_unless_asked_for_python(
        tree: Path, flag: list[str], lane: bytes) -> None:
    """The compiled lane is built by the install (CI included) and sends its batches through
    io_uring (this kernel has it): the daemon says which lane answers lock-step ACKs;
    ``--no-batch-sends`` makes it send one send() per ACK, ``--python-lane`` chooses the
    Python one."""
    if lane.endswith(rb"io_uring") and (reason := io_uring_refused()) is not None:
        pytest.skip(f"no io_uring: {reason}")
    cli = await start_cli(["--root", str(tree), "--listen", "127.0.0.1:0", *flag])
    try:
        assert re.search(rb"listening .* lane=" + lane + rb"(\s|$)", cli.log)
        res = await fetch(("127.0.0.1", cli.port), "1m.bin", blksize=1428, bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "1m.bin")
        cli.proc.send_signal(signal.SIGTERM)
        assert await cli.wait() == 0
    finally:
        cli.proc.kill()


async def test_a_missing_compiled_lane_is_warned_about_and_python_serves(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An install without a compiler has no tftpd._lane: the server says so once and the
    Python lane serves lock-step transfers."""
    from tftpd import lane

    monkeypatch.setattr(lane, "AVAILABLE", False)
    caplog.set_level(logging.INFO, logger="tftpd.server")
    server = TftpServer(ServerConfig(root=tree, listen=(server_mod.ListenSpec(
        "127.0.0.1", 0, socket.AF_INET),), policy=FAST, grace=1.0))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(server.run)
        res = await fetch(addrs[0], "1m.bin", blksize=1428, bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "1m.bin")
        assert server.pump is not None and not server.pump.compiled_lane
        nursery.cancel_scope.cancel()
    warned = [r for r in caplog.records if "compiled lock-step lane" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert any("lane=python" in r.getMessage() for r in caplog.records)


async def test_sigterm_lets_a_running_transfer_finish(tree: Path) -> None:
    cli = await start_cli(["--root", str(tree), "--listen", "127.0.0.1:0", "--retransmit", "5",
                           "--grace", "10"])
    try:
        with RawClient(("127.0.0.1", cli.port), CLIENT_A) as c:
            c.rrq("secret-a", blksize=1468)
            await c.expect(packets.OptionAck)
            cli.proc.send_signal(signal.SIGTERM)
            await cli.read_until(rb"stopping")
            # New requests are no longer accepted ...
            with RawClient(("127.0.0.1", cli.port), CLIENT_A) as late:
                late.rrq("whoami")
                assert await late.quiet(0.3) == []
            # ... but the running transfer completes.
            block, got = 0, bytearray()
            c.ack(0)
            while True:
                d = await c.expect(packets.Data)
                assert d.block == block + 1
                block = d.block
                got += d.payload
                c.ack(block)
                if len(d.payload) < 1468:
                    break
        assert bytes(got) == (tree / CLIENT_A / "secret-a").read_bytes()
        assert await cli.wait() == 0
        assert re.search(rb"file='secret-a' bytes=70000 .*outcome=ok", cli.log)
    finally:
        cli.proc.kill()


async def test_grace_period_ends_stuck_transfers(tree: Path) -> None:
    cli = await start_cli(["--root", str(tree), "--listen", "127.0.0.1:0", "--retransmit", "30",
                           "--grace", "0.5"])
    try:
        with RawClient(("127.0.0.1", cli.port), CLIENT_A) as c:
            c.rrq("secret-a")
            await c.expect(packets.Data)
            started = trio.current_time()
            cli.proc.send_signal(signal.SIGTERM)
            err = await c.expect(packets.Error, timeout=5)
            assert "shutting down" in err.message
            assert trio.current_time() - started < 3
        assert await cli.wait() == 0
    finally:
        cli.proc.kill()


async def test_systemd_socket_activation(tree: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(tree.parent / "notify.sock")
    notify.bind(notify_path)
    notify.setblocking(False)
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
        "from tftpd.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    proc = await trio.lowlevel.open_process(
        [PY, "-c", launcher, str(sock.fileno()), "--root", str(tree), "--listen", "systemd"],
        pass_fds=(sock.fileno(),), stderr=subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": notify_path})
    cli = Cli(proc)
    sock.close()
    try:
        await cli.read_until(rb"listening addresses=127\.0\.0\.1:%d" % port)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(notify)
        assert notify.recv(100) == b"READY=1"
        res = await fetch(("127.0.0.1", port), "whoami", bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "whoami")  # "127.0.0.10\n"
        proc.send_signal(signal.SIGTERM)
        assert await cli.wait() == 0
    finally:
        proc.kill()
        notify.close()


async def test_falls_back_to_ipv4_when_ipv6_is_disabled(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """tftpd-hpa's classic failure: with IPv6 disabled the default [::] listener must turn into
    an IPv4 one by itself, with one warning."""
    real_socket = socket.socket
    asked: list[tuple] = []

    class NoV6(real_socket):  # type: ignore[misc,valid-type]
        def __init__(self, family: int = -1, *args: object, **kw: object) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kw)  # type: ignore[arg-type]

        def bind(self, address: tuple) -> None:
            asked.append(address)
            # Tests may bind loopback only: the wildcard the server asked for becomes 127.0.0.1.
            super().bind(("127.0.0.1", address[1]) if address[0] == "0.0.0.0" else address)

    monkeypatch.setattr(server_mod.socket, "socket", NoV6)
    caplog.set_level(logging.WARNING, logger="tftpd")
    server = TftpServer(ServerConfig(root=tree, default_port=0, policy=FAST))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(server.run)
        monkeypatch.undo()
        res = await fetch(("127.0.0.1", addrs[0][1]), "whoami", bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "whoami")  # "127.0.0.10\n"
        nursery.cancel_scope.cancel()
    assert asked[0] == ("0.0.0.0", 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "IPv4 only" in warnings[0], warnings


async def test_workers_share_a_burst_of_transfers_evenly(tree: Path) -> None:
    """Eight transfers at once over two workers run four on each, whatever the kernel's hash
    of the client ports said: a busier worker passes the request on (tftpd/handoff.py)."""
    cli = await start_cli(["--root", str(tree), "--listen", "127.0.0.1:0", "--workers", "2",
                           "--retransmit", "5"])
    try:
        await cli.read_until(rb"worker=2/2")
        addr = ("127.0.0.1", cli.port)
        clients = [RawClient(addr, CLIENT_A) for _ in range(8)]
        try:
            for c in clients:
                c.rrq("secret-a", blksize=1024)
            for c in clients:  # all eight are running now: none is acknowledged
                await c.expect(packets.OptionAck)
            for c in clients:
                c.send_peer(packets.encode_error(0, "enough"))
        finally:
            for c in clients:
                c.close()
        cli.proc.send_signal(signal.SIGTERM)
        assert await cli.wait() == 0, cli.log.decode()
        ran = re.findall(rb"stopped worker=\d/2 stats=.* aborted_by_client=(\d+)", cli.log)
        assert sorted(int(n) for n in ran) == [4, 4], cli.log.decode()
    finally:
        cli.proc.kill()


async def test_workers_share_the_port_and_keep_dedupe(tree: Path) -> None:
    """--workers 2: both processes serve one address; a retransmitted RRQ still reaches the
    same worker (SO_REUSEPORT hashes the client's address), so it is still deduplicated."""
    cli = await start_cli(["--root", str(tree), "--listen", "127.0.0.1:0", "--workers", "2",
                           "--retransmit", "5"])
    try:
        await cli.read_until(rb"worker=2/2")
        addr = ("127.0.0.1", cli.port)
        want = file_sha256(tree / CLIENT_A / "secret-a")
        for _ in range(12):  # new client ports: the kernel spreads them over both workers
            res = await fetch(addr, "secret-a", blksize=1468, bind=CLIENT_A)
            assert res.sha256 == want
        for _ in range(3):
            with RawClient(addr, CLIENT_A) as c:
                for _ in range(3):
                    c.rrq("secret-a", blksize=1024)
                await c.expect(packets.OptionAck)
                assert await c.quiet(0.2) == []
                c.send_peer(packets.encode_error(0, "enough"))
        cli.proc.send_signal(signal.SIGTERM)
        assert await cli.wait() == 0, cli.log.decode()
        stopped = re.findall(rb"stopped worker=(\d)/2 stats=requests=(\d+) .*"
                             rb"duplicate_requests=(\d+)", cli.log)
        assert sorted(w for w, _, _ in stopped) == [b"1", b"2"], cli.log.decode()
        assert sum(int(n) for _, n, _ in stopped) == 12 + 9
        assert sum(int(d) for _, _, d in stopped) == 6
        assert all(int(n) > 0 for _, n, _ in stopped), "one worker got no request at all"
    finally:
        cli.proc.kill()
