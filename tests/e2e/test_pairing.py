"""Other TFTP servers can serve the vfsroot tree: dnsmasq and tftpd-hpa, per client IP.

One mounted vfsroot, two clients on loopback:

- 127.0.0.10, a Raspberry Pi: its own directory (`hostname.txt`) and an NBD disk laid out as
  Raspberry Pi OS does (p1 FAT32 mounted at /boot/firmware, p2 ext4 /), whose FAT partition
  is its TFTP root (`start4.elf`, `config.txt`, `kernel8.img`, through libguestfs).
- 127.0.0.11: its own directory (`hostname.txt`, `secret-11.txt`).
- both: `default/shared.txt`.

Each server is started exactly as docs/recipes.md says.  Each client must get its own bytes
(sha256), and a request climbing out of its directory (`../127.0.0.11/secret-11.txt`) must be
refused.  The kernel resolves `..` above `/run/vfsroot/<ip>/` before vfsroot sees it, so only the
TFTP server can stop it: the test also proves that tftpd-hpa with the naive map (`r ^ \\i/`)
does serve the other client's file, which is why the recipe's map refuses `..`.

dnsmasq's TFTP port is always 69 (it has no option to change it), so dnsmasq runs in a network
namespace of the test's own, with only a loopback; tftpd-hpa runs on 127.0.0.1 on a free high
port in the root namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import (
    MiB,
    NbdServer,
    Netns,
    VfsrootMount,
    build_disk,
    entry_point,
    nbd_config,
    stop_process,
    tail,
    tftpd_hpa,
    wait_file,
    world_traversable_mount,
)

pytestmark = pytest.mark.e2e

TEN, ELEVEN = "127.0.0.10", "127.0.0.11"

#: The recipe's tftpd-hpa map file (docs/recipes.md): per-client roots, `..` refused.
HPA_MAP = r"""# vfsroot: serve each client from /run/vfsroot/<client-ip>/
# Windows PXE asks with backslashes
rg \\ /
# refuse ".." anywhere: the kernel would resolve it above the client's directory
a (^|/)\.\.(/|$)
# iPXE sends a leading "/"
r ^/+
r ^ \i/
"""
#: The map most guides show; it lets a client read every other client's files.
HPA_MAP_NAIVE = "r ^ \\i/\n"


@dataclass(frozen=True)
class Tree:
    mount: Path
    work: Path
    log: Path
    #: client IP -> {path: bytes} the client must get
    own: dict[str, dict[str, bytes]]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    if os.geteuid() != 0:
        pytest.skip("needs root: FUSE mount with allow_other, network namespaces")
    work = tmp_path_factory.mktemp("pairing")
    source = work / "source"
    # dnsmasq and tftpd-hpa drop to an unprivileged user: the mount point must be reachable
    mount = world_traversable_mount("vfsroot-e2e-")
    firmware = {"start4.elf": os.urandom(2 * MiB + 5), "config.txt": b"arm_64bit=1\n",
                "cmdline.txt": b"console=serial0,115200 root=/dev/nbd0p2\n",
                "kernel8.img": os.urandom(3 * MiB + 17)}
    files = {
        "default/shared.txt": b"for everybody\n",
        f"{TEN}/hostname.txt": b"ten\n",
        f"{ELEVEN}/hostname.txt": b"eleven\n",
        f"{ELEVEN}/secret-11.txt": b"only for eleven\n",
    }
    for rel, data in files.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)
    disk = work / "pi-ten.img"
    build_disk(disk, {"/etc/hostname": b"pi-ten\n", "/boot/firmware/.keep": b""},
               fat=dict(firmware))
    nbd = NbdServer(disk, work / "nbdkit.log").start()
    try:
        (source / f"{TEN}.nbd").write_text(
            nbd_config(nbd.url, [(2, "/"), (1, "/boot/firmware")], "/boot/firmware"))
        log = work / "vfsroot.log"
        with VfsrootMount(source, mount, log):
            wait_file(mount / TEN / "kernel8.img", firmware["kernel8.img"], log, timeout=240)
            own = {
                TEN: {"hostname.txt": b"ten\n", "shared.txt": b"for everybody\n",
                      **firmware},
                ELEVEN: {"hostname.txt": b"eleven\n", "secret-11.txt": b"only for eleven\n",
                         "shared.txt": b"for everybody\n"},
            }
            yield Tree(mount, work, log, own)
    finally:
        nbd.stop()
        with contextlib.suppress(OSError):
            mount.rmdir()
            mount.parent.rmdir()


def fetch(client: str, url: str, ns: Netns | None = None,
          blksize: int | None = None) -> subprocess.CompletedProcess:
    """curl's TFTP client as `client` (`--path-as-is`: send `..` as typed)."""
    argv = ["curl", "-sS", "--max-time", "30", "--path-as-is", "--interface", client,
            "-o", "-", url]
    if blksize:
        argv[1:1] = ["--tftp-blksize", str(blksize)]
    return subprocess.run(ns.argv(argv) if ns else argv, capture_output=True, timeout=60)


def check_clients(base: str, t: Tree, server_log: Path, ns: Netns | None = None) -> None:
    for client, files in t.own.items():
        for name, data in files.items():
            cp = fetch(client, f"{base}/{name}", ns)
            assert cp.returncode == 0, (
                f"{client} {name}: {cp.stderr.decode()}\n{tail(server_log)}\n{tail(t.log)}")
            assert hashlib.sha256(cp.stdout).hexdigest() == hashlib.sha256(data).hexdigest(), (
                f"{client} got other bytes for {name} ({len(cp.stdout)} bytes)")
    # The other client's file by its own name: not in this client's view.
    cp = fetch(TEN, f"{base}/secret-11.txt", ns)
    assert cp.returncode != 0 and not cp.stdout, "10 got 11's secret by name"


def climb(base: str, ns: Netns | None = None) -> subprocess.CompletedProcess:
    return fetch(TEN, f"{base}/../{ELEVEN}/secret-11.txt", ns)


def test_dnsmasq_unique_root(tree: Tree) -> None:
    """dnsmasq --enable-tftp --tftp-root=<mount> --tftp-unique-root (no DNS, no DHCP)."""
    with Netns(tree.work) as ns:
        log = tree.work / "dnsmasq.log"
        ns.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                  "--interface=lo", "--bind-interfaces", "--enable-tftp",
                  f"--tftp-root={tree.mount}", "--tftp-unique-root",
                  f"--pid-file={tree.work / 'dnsmasq-tftp.pid'}", "--log-facility=-"], log)
        _wait_udp(ns, 69)
        check_clients("tftp://127.0.0.1", tree, log, ns)
        cp = climb("tftp://127.0.0.1", ns)
        assert cp.returncode != 0 and not cp.stdout, "dnsmasq served another client's file"


@pytest.mark.parametrize("naive", [False, True], ids=["recipe-map", "naive-map"])
def test_tftpd_hpa_map_file(tree: Tree, naive: bool) -> None:
    """in.tftpd --secure --map-file (r ^ \\i/) over the mount, 127.0.0.1:<high port>."""
    map_file = tree.work / ("naive.map" if naive else "vfsroot.map")
    map_file.write_text(HPA_MAP_NAIVE if naive else HPA_MAP)
    port = _free_udp_port()
    log = tree.work / f"tftpd-hpa-{map_file.stem}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(tftpd_hpa()), "--foreground", "--address", f"127.0.0.1:{port}", "--secure",
             "--map-file", str(map_file), "--verbose", str(tree.mount)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"tftp://127.0.0.1:{port}"
        check_clients(base, tree, log)
        cp = climb(base)
        if naive:
            # The pitfall the recipe avoids: the kernel resolved `..`, the file was served.
            assert cp.stdout == b"only for eleven\n", cp.stderr.decode()
        else:
            assert cp.returncode != 0 and not cp.stdout, "tftpd-hpa served another client's file"
    finally:
        stop_process(proc, grace=5)


#: A Raspberry Pi 4's serial number: its bootloader first asks for `<serial>/start4.elf`.
PI_SERIAL = "9ffefdef"


def test_raspberry_pi_request_sequence(tree: Tree, tmp_path: Path) -> None:
    """vfsroot-tftpd over the mount, asked what a Pi 4 bootloader asks (blksize 1024).

    The serial-prefixed name is "not found" (the Pi then drops the prefix), and everything
    after comes from the FAT boot partition of the Pi's own NBD disk.
    """
    port = _free_udp_port()
    log = tmp_path / "vfsroot-tftpd.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*entry_point("vfsroot-tftpd"), "--root", str(tree.mount),
             "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"tftp://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while b"listening" not in log.read_bytes():  # a probe before the bind would hang curl
            assert time.monotonic() < deadline and proc.poll() is None, tail(log)
            time.sleep(0.1)
        cp = fetch(TEN, f"{base}/{PI_SERIAL}/start4.elf", blksize=1024)
        assert cp.returncode != 0 and not cp.stdout
        for name in ("start4.elf", "config.txt", "cmdline.txt", "kernel8.img"):
            cp = fetch(TEN, f"{base}/{name}", blksize=1024)
            assert cp.returncode == 0, f"{name}: {cp.stderr.decode()}\n{tail(log)}"
            assert cp.stdout == tree.own[TEN][name], f"{name}: other bytes"
        # Another client (no disk) has no firmware: the Pi's files are its own.
        cp = fetch(ELEVEN, f"{base}/start4.elf", blksize=1024)
        assert cp.returncode != 0 and not cp.stdout
    finally:
        stop_process(proc, grace=5)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_udp(ns: Netns, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(ns.argv(["ss", "-Hlun", f"sport = :{port}"]), capture_output=True,
                             timeout=10).stdout
        if out.strip():
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on udp/{port} in {ns.name}")
