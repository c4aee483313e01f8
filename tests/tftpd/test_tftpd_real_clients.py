"""Real TFTP clients (curl, tftp-hpa, atftp, busybox) against the server, bytes checked by
sha256.  tftp-hpa, atftp and busybox cannot choose their source address, so they are the
127.0.0.1 client; curl's --interface makes it any 127.0.0.x machine."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tftpd.session import TransferPolicy

from .conftest import CLIENT_A, CLIENT_B, LOCAL
from .helpers import file_sha256, running


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/debian-packages.txt lists it)")
    return path


async def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(cmd, check=False, capture_stdout=True,
                                      capture_stderr=True)


@pytest.mark.parametrize("blksize", [None, 1428, 8192])
async def test_curl(tree: Path, tmp_path: Path, blksize: int | None) -> None:
    curl = need("curl")
    out = tmp_path / "out"
    extra = ["--tftp-blksize", str(blksize)] if blksize else []
    policy = TransferPolicy(blksize_max=65464, retransmit_timeout=0.2)
    async with running(tree, policy=policy) as (server, (host, port)):
        proc = await run([curl, "-sS", "--interface", CLIENT_A, *extra, "-o", str(out),
                          f"tftp://{host}:{port}/big.bin"])
        assert proc.returncode == 0, proc.stderr
        assert file_sha256(out) == file_sha256(tree / CLIENT_A / "big.bin")
    assert server.stats.completed == 1


async def test_curl_is_isolated_per_client(tree: Path, tmp_path: Path) -> None:
    curl = need("curl")
    async with running(tree) as (server, (host, port)):
        for me, other in ((CLIENT_A, CLIENT_B), (CLIENT_B, CLIENT_A)):
            proc = await run([curl, "-sS", "--interface", me, f"tftp://{host}:{port}/whoami"])
            assert proc.returncode == 0 and proc.stdout == f"{me}\n".encode()
            secret = "secret-b" if other == CLIENT_B else "secret-a"
            proc = await run([curl, "-sS", "--interface", me,
                              f"tftp://{host}:{port}/{secret}"])
            assert proc.returncode == 68  # CURLE_TFTP_NOTFOUND
            proc = await run([curl, "-sS", "--path-as-is", "--interface", me,
                              f"tftp://{host}:{port}/../{other}/{secret}"])
            assert proc.returncode == 69, proc  # CURLE_TFTP_PERM: access violation
            assert proc.stdout == b""
    assert server.stats.not_found == 2
    assert server.stats.refused == 2


async def test_tftp_hpa_octet_and_netascii(tree: Path, tmp_path: Path) -> None:
    tftp = need("tftp")
    text = b"DEFAULT linux\nLABEL linux\r\n  KERNEL vmlinuz\n\rodd\n"
    (tree / LOCAL / "text.cfg").write_bytes(text)
    async with running(tree) as (server, (host, port)):
        out = tmp_path / "big"
        proc = await run([tftp, "-m", "binary", host, str(port), "-c", "get", "big.bin",
                          str(out)])
        assert file_sha256(out) == file_sha256(tree / LOCAL / "big.bin"), proc
        out = tmp_path / "text"
        proc = await run([tftp, "-m", "ascii", host, str(port), "-c", "get", "text.cfg",
                          str(out)])
        # tftp-hpa decodes netascii back to local text: we must have encoded it exactly.
        assert out.read_bytes() == text, proc
        proc = await run([tftp, "-m", "binary", host, str(port), "-c", "get", "nothing",
                          str(tmp_path / "nothing")])
        assert b"File not found" in proc.stdout + proc.stderr or b"not found" in (
            proc.stdout + proc.stderr)
    assert server.stats.completed == 2
    assert server.stats.not_found == 1


@pytest.mark.parametrize("options", [
    [],
    ["blksize 1428", "tsize 0"],
    ["blksize 1468", "windowsize 16"],
    ["blksize 512", "windowsize 64", "timeout 2"],
])
async def test_atftp(tree: Path, tmp_path: Path, options: list[str],
                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tftpd")
    atftp = need("atftp")
    out = tmp_path / "out"
    opt_args = [a for o in options for a in ("--option", o)]
    async with running(tree) as (server, (host, port)):
        proc = await run([atftp, "-g", "-r", "big.bin", "-l", str(out), *opt_args, host,
                          str(port)])
        assert proc.returncode == 0, proc.stderr
        assert file_sha256(out) == file_sha256(tree / LOCAL / "big.bin")
    assert server.stats.completed == 1
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("transfer"))
    for option in options:  # atftp really negotiated what we asked it to
        name, value = option.split()
        assert f"{name}={value if name != 'tsize' else 3_000_000}" in line, line


async def test_busybox(tree: Path, tmp_path: Path) -> None:
    busybox = need("busybox")
    out = tmp_path / "out"
    async with running(tree) as (server, (host, port)):
        proc = await run([busybox, "tftp", "-g", "-r", "big.bin", "-l", str(out), "-b", "1428",
                          host, str(port)])
        assert proc.returncode == 0, proc.stderr
        assert file_sha256(out) == file_sha256(tree / LOCAL / "big.bin")
    assert server.stats.completed == 1
