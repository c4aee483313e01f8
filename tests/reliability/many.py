"""Many clients (issue 11): a source root with N client directories and N `.nbd` configs,
served by one `vfsroot serve` (disks on), and the operator's everyday reads timed.

The disk configs point at an NBD port on 127.0.0.1 that nothing listens on.  The daemon
queues every config at start (proactive attach, docs/disks.md); each batch is probed (a TCP
connect, refused at once) before any appliance is launched, so every disk fails fast with
"attach failed: ... NBD server ...", no appliance starts, and the retries back off (10 s
doubling to 300 s).  What is measured is that this costs the daemon little: that it does not
melt down trying N unreachable disks.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import procs

CONFIG = "pxelinux.cfg/default"
REPO = Path(__file__).resolve().parents[2]


def dir_clients(n: int) -> list[str]:
    return [f"127.88.{i // 250}.{i % 250 + 1}" for i in range(n)]


def disk_clients(n: int) -> list[str]:
    return [f"127.89.{i // 250}.{i % 250 + 1}" for i in range(n)]


def dead_tcp_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then closed: connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_bytes(ip: str) -> bytes:
    return f"DEFAULT linux\nLABEL linux\n  KERNEL vmlinuz\n  APPEND ip={ip}\n".encode()


def build_source(source: Path, n: int) -> dict[str, str]:
    """``n`` client dirs with a config each, ``n`` disk configs; returns ip -> config sha256."""
    (source / "default" / "pxelinux.cfg").mkdir(parents=True)
    (source / "default" / CONFIG).write_bytes(b"DEFAULT local\n")
    expected = {}
    for ip in dir_clients(n):
        (source / ip / "pxelinux.cfg").mkdir(parents=True)
        data = config_bytes(ip)
        (source / ip / CONFIG).write_bytes(data)
        expected[ip] = hashlib.sha256(data).hexdigest()
    port = dead_tcp_port()
    for i, ip in enumerate(disk_clients(n)):
        (source / f"{ip}.nbd").write_text(json.dumps({
            "url": f"nbd://127.0.0.1:{port}/disk{i}",
            "mounts": [{"partition": 1, "mountpoint": "/"}]}))
    return expected


def vfsroot_status(mount: Path) -> tuple[float, dict]:
    """(seconds, parsed JSON) of ``vfsroot status --json``, the command an operator types
    (its Python start-up included)."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "vfsroot.cli", "status", "--json", "--mount",
                          str(mount)], capture_output=True, check=True, cwd=REPO, timeout=60)
    dt = time.monotonic() - t0
    return dt, json.loads(out.stdout)


def vfsroot_status_text(mount: Path) -> tuple[float, int]:
    """(seconds, lines) of plain ``vfsroot status``."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "vfsroot.cli", "status", "--mount", str(mount)],
                         capture_output=True, check=True, cwd=REPO, timeout=60)
    return time.monotonic() - t0, len(out.stdout.splitlines())


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in procs.tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class ManyFigures:
    n: int
    all_failed_after: float = 0.0  # seconds from mount up until no disk is attaching
    ls_cold: float = 0.0
    ls_warm: float = 0.0
    entries: int = 0
    reads: float = 0.0
    reads_bad: list[str] = field(default_factory=list)
    reads_warm: float = 0.0
    status_json: list[float] = field(default_factory=list)
    status_text: list[float] = field(default_factory=list)
    status_disks: int = 0
    states: dict[str, int] = field(default_factory=dict)
    idle_cpu: float = 0.0  # daemon CPU seconds per second while the disks back off
    idle_seconds: float = 0.0
    sample: procs.Sample | None = None
    qemu: int = 0

    def lines(self) -> list[str]:
        assert self.sample is not None
        return [
            f"{self.n} client dirs + {self.n} .nbd configs (unreachable NBD port)",
            f"every disk out of 'attaching' {self.all_failed_after:.1f} s after the mount was up;"
            f" states {self.states}; qemu processes {self.qemu}",
            f"ls MOUNT: {self.entries} entries, cold {self.ls_cold * 1000:.0f} ms, "
            f"warm {self.ls_warm * 1000:.0f} ms",
            f"{self.n} config reads (cat MOUNT/<ip>/{CONFIG}, sha256 each): cold "
            f"{self.reads:.2f} s, warm {self.reads_warm:.2f} s, {len(self.reads_bad)} bad",
            "vfsroot status --json: " + ", ".join(f"{t * 1000:.0f}" for t in self.status_json)
            + f" ms ({self.status_disks} disks); vfsroot status: "
            + ", ".join(f"{t * 1000:.0f}" for t in self.status_text) + " ms",
            f"daemon: {self.sample.line()}; CPU while the disks back off "
            f"{self.idle_cpu * 100:.1f} % over {self.idle_seconds:.0f} s",
        ]


def measure(mount: Path, pid: int, expected: dict[str, str], n: int,
            idle_seconds: float = 10.0, settle_timeout: float = 120.0) -> ManyFigures:
    """Time what an operator does on a mount that is up; see the module docstring."""
    fig = ManyFigures(n)
    t0 = time.monotonic()
    states: dict[str, int] = {}
    while time.monotonic() - t0 < settle_timeout:
        _, st = vfsroot_status(mount)
        states = {}
        for d in st["disks"].values():
            states[d["state"]] = states.get(d["state"], 0) + 1
        if not states.get("attaching") and len(st["disks"]) == n:
            break
        time.sleep(0.5)
    fig.all_failed_after = time.monotonic() - t0
    fig.states = states
    t = time.monotonic()
    entries = os.listdir(mount)
    fig.ls_cold = time.monotonic() - t
    t = time.monotonic()
    entries = os.listdir(mount)
    fig.ls_warm = time.monotonic() - t
    fig.entries = len(entries)
    for attr, label in (("reads", "cold"), ("reads_warm", "warm")):
        t = time.monotonic()
        for ip, digest in expected.items():
            with open(mount / ip / CONFIG, "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
            if got != digest:
                fig.reads_bad.append(f"{ip} ({label})")
        setattr(fig, attr, time.monotonic() - t)
    for _ in range(3):
        dt, st = vfsroot_status(mount)
        fig.status_json.append(dt)
        fig.status_disks = len(st["disks"])
        fig.status_text.append(vfsroot_status_text(mount)[0])
    c0, w0 = cpu_seconds(pid), time.monotonic()
    time.sleep(idle_seconds)
    fig.idle_seconds = time.monotonic() - w0
    fig.idle_cpu = (cpu_seconds(pid) - c0) / fig.idle_seconds
    fig.sample = procs.sample(pid)
    fig.qemu = procs.count_named(pid, "qemu")
    return fig
