"""The units in systemd/: `systemd-analyze verify` is silent on them, they say what docs/systemd.md
promises, and vfsroot-tftpd really runs from a socket handed over the systemd way.

`systemd-analyze verify` checks units offline (no running systemd needed, so it works in a
container), including that every ExecStart binary exists: the test points the units' install
prefix (/opt/vfsroot/bin) at this checkout's venv.  It exits 0 even on unknown keys, so the test
demands that it prints nothing, and shows that a planted typo is caught.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import stop_process, tail

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
UNIT_NAMES = ("vfsroot.service", "vfsroot-tftpd.socket", "vfsroot-tftpd.service")
PREFIX = "/opt/vfsroot/bin/"
#: Directives that give a service its own mount namespace (the FUSE mount would vanish in it).
MOUNT_NS = ("PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "ReadOnlyPaths",
            "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
            "BindReadOnlyPaths", "PrivateMounts", "MountFlags", "RootDirectory", "RootImage",
            "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
            "ProtectProc", "ProcSubset", "PrivateUsers")


def directives(name: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value (keys may repeat), from one unit file."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: scripts/debian-packages.txt installs `systemd`"
    return exe


def verify(tmp_path: Path, edit: dict[str, tuple[str, str]] | None = None) -> str:
    """Copy the units (prefix -> this venv), apply `edit`, verify; return everything printed."""
    bindir = str(Path(sys.executable).parent) + "/"
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text().replace(PREFIX, bindir)
        if edit and name in edit:
            old, new = edit[name]
            assert old in text
            text = text.replace(old, new)
        (tmp_path / name).write_text(text)
    cp = subprocess.run([analyze(), "verify", "--man=no", *UNIT_NAMES], cwd=tmp_path,
                        capture_output=True, timeout=120,
                        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    out = (cp.stdout + cp.stderr).decode(errors="replace").strip()
    return f"exit {cp.returncode}: {out}" if cp.returncode else out


def test_units_verify_silently(tmp_path: Path) -> None:
    assert verify(tmp_path) == ""


def test_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing binary are both reported."""
    out = verify(tmp_path, {"vfsroot.service": ("Type=notify", "Type=notify\nTipe=simple")})
    assert "Unknown key" in out and "Tipe" in out
    out = verify(tmp_path, {"vfsroot-tftpd.service": ("vfsroot-tftpd --root", "nope --root")})
    assert "nope" in out


def test_vfsroot_service_shape() -> None:
    d = directives("vfsroot.service")
    assert d["Service.Type"] == ["notify"]
    assert "-/etc/default/vfsroot" in d["Service.EnvironmentFile"]
    stale = "-/usr/bin/fusermount3 -u -z ${VFSROOT_MOUNT}"
    assert stale in d["Service.ExecStartPre"]
    assert d["Service.ExecStopPost"] == [stale]
    (start,) = d["Service.ExecStart"]
    assert start.startswith(PREFIX + "vfsroot serve --source ${VFSROOT_SOURCE}")
    assert "--mount ${VFSROOT_MOUNT}" in start
    assert not [k for k in d if k.split(".", 1)[1] in MOUNT_NS], "mount namespace: the mount " \
        "would be invisible outside the service"
    assert "Service.User" not in d and "Service.DynamicUser" not in d  # root: FUSE, appliances


def test_tftpd_units_shape() -> None:
    sock = directives("vfsroot-tftpd.socket")
    assert sock["Socket.ListenDatagram"] == ["69"]
    d = directives("vfsroot-tftpd.service")
    assert d["Service.DynamicUser"] == ["yes"]
    assert d["Service.CapabilityBoundingSet"] == [""]
    assert d["Service.NoNewPrivileges"] == ["yes"]
    assert d["Service.ProtectSystem"] == ["strict"]
    assert "-/etc/default/vfsroot" in d["Service.EnvironmentFile"]
    (start,) = d["Service.ExecStart"]
    assert "--listen systemd" in start and "--root ${VFSROOT_MOUNT}" in start


def syscalls(spec: str) -> set[str]:
    """The system calls one SystemCallFilter= word names (a @group expanded by systemd)."""
    name = spec.split(":", 1)[0]
    if not name.startswith("@"):
        return {name}
    cp = subprocess.run([analyze(), "syscall-filter", name], capture_output=True, text=True,
                        timeout=60, check=True)
    out: set[str] = set()
    for line in cp.stdout.splitlines()[1:]:  # the first line is the group's own name
        word = line.strip()
        if word and not word.startswith("#"):
            out |= syscalls(word) if word.startswith("@") else {word}
    return out


def test_tftpd_unit_lets_the_lane_use_io_uring() -> None:
    """The unit's seccomp filter must allow what the compiled lane calls: a call outside it
    kills the service (SIGSYS).  @system-service allows io_uring through @aio; hardening the
    unit with ~@aio would kill the service at its first start, and this test catches it (the
    way to keep io_uring out is `--no-batch-sends`, see docs/tftpd.md)."""
    allowed: set[str] = set()
    denied: set[str] = set()
    for value in directives("vfsroot-tftpd.service")["Service.SystemCallFilter"]:
        deny = value.startswith("~")
        for word in value.lstrip("~").split():
            (denied if deny else allowed).update(syscalls(word))
    assert "epoll_wait" in allowed and "bpf" in denied  # the groups did expand
    assert {"io_uring_setup", "io_uring_enter"} <= allowed - denied


def test_default_file_matches_units() -> None:
    """Every variable the units use is in systemd/vfsroot.default (the /etc/default file)."""
    used = set()
    for name in UNIT_NAMES:
        used |= set(re.findall(r"\$\{?(VFSROOT_\w+)", (UNITS / name).read_text()))
    defined = set(re.findall(r"^#?(VFSROOT_\w+)=", (UNITS / "vfsroot.default").read_text(),
                             re.M))
    assert used and used <= defined, used - defined


def test_tftpd_runs_socket_activated(tmp_path: Path) -> None:
    """The unit's ExecStart, with a datagram socket passed as systemd does (LISTEN_FDS)."""
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is missing (Debian package `systemd`)"
    root = tmp_path / "root"
    data = os.urandom(200_000)
    (root / "127.0.0.10").mkdir(parents=True)
    (root / "127.0.0.10" / "boot.bin").write_bytes(data)
    (start,) = directives("vfsroot-tftpd.service")["Service.ExecStart"]
    argv = shlex.split(start.replace("${VFSROOT_MOUNT}", str(root))
                       .replace("$VFSROOT_TFTPD_OPTS", ""))
    argv[0] = argv[0].replace(PREFIX, str(Path(sys.executable).parent) + "/")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "tftpd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([activate, "--datagram", "-l", f"127.0.0.1:{port}", *argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            cp = subprocess.run(["curl", "-sS", "--max-time", "10", "--interface", "127.0.0.10",
                                 "-o", "-", f"tftp://127.0.0.1:{port}/boot.bin"],
                                capture_output=True, timeout=30)
            if cp.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert cp.returncode == 0, f"{cp.stderr.decode()}\n{tail(log)}"
        assert hashlib.sha256(cp.stdout).digest() == hashlib.sha256(data).digest()
    finally:
        stop_process(proc, grace=5)

