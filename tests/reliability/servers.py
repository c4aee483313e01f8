"""The TFTP daemons the reliability tests and benches run as separate processes, so their
memory, descriptors and threads are their own: ``vfsroot-tftpd`` with its default flags (the
operator's first run) and Debian's tftpd-hpa (unpacked, never installed: tests/e2e/harness.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.harness import stop_process
from tftpd import packets

REPO = Path(__file__).resolve().parents[2]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int, bind: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    """True once the server on ``port`` answers an RRQ (for anything: an ERROR will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((bind, 0))
        s.settimeout(timeout)
        s.sendto(packets.encode_request(packets.OP_RRQ, "no-such-file-ready-probe", "octet", {}),
                 ("127.0.0.1", port))
        try:
            s.recvfrom(packets.MAX_DATAGRAM)
            return True
        except OSError:
            return False


class Daemon:
    """A TFTP server subprocess on 127.0.0.1:<port>, logging to ``log``."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 15.0) -> Daemon:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            if answers(self.port):
                return self
        self.stop()
        raise AssertionError(f"{self.name} did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 15 s); the exit status."""
        if self.proc is None:
            return None
        stop_process(self.proc, grace=15)
        return self.proc.returncode


def vfsroot_tftpd(root: Path, log: Path, *extra: str) -> Daemon:
    """``vfsroot-tftpd --root ROOT --listen 127.0.0.1:PORT`` and nothing else (default limits,
    default workers = one per CPU) unless ``extra`` says so."""
    port = free_udp_port()
    return Daemon("vfsroot-tftpd", [sys.executable, "-m", "tftpd.cli", "--root", str(root),
                                    "--listen", f"127.0.0.1:{port}", *extra], port, log)


#: tftpd-hpa's per-client roots (docs/recipes.md): ``..`` refused, then ``<ip>/`` prefixed.
HPA_MAP = "a (^|/)\\.\\.(/|$)\nr ^/+\nr ^ \\i/\n"


def tftpd_hpa(root: Path, log: Path, map_file: Path) -> Daemon:
    """tftpd-hpa over ``root`` laid out per client IP (``root/<ip>/...``) through its map file,
    in the foreground; it forks one process per transfer."""
    from tests.e2e.harness import tftpd_hpa as binary

    map_file.write_text(HPA_MAP)
    port = free_udp_port()
    return Daemon("tftpd-hpa", [str(binary()), "--foreground", "--address", f"127.0.0.1:{port}",
                                "--secure", "--user", "root", "--map-file", str(map_file),
                                str(root)], port, log)
