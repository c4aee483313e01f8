"""Real boot firmware against real servers, inside a network namespace the test makes.

Everything a boot needs is built or unpacked here, from Debian packages only:

- `Netns`: a namespace with a bridge (`br0`, the server side, `SERVER_IP`) and a tap (`tap0`,
  qemu's NIC).  Nothing is routed out of it.  Closing it kills every process it still holds.
- `dnsmasq_argv`: DHCP only (`port=0`), fixed client address per MAC, boot file and next-server
  pointing at the TFTP server on the bridge, and a router advertisement so iPXE does not wait
  ~13 s for IPv6.
- `build_initrd`: a busybox initramfs whose /init prints the `vfsroot_token=` from the kernel
  command line and the sha256 of /payload, then powers off.  busybox-static is unpacked from its
  .deb (`apt-get download` + `dpkg -x`): installing it would replace the system's busybox.
- `build_disk`: a partitioned disk image (MBR, one ext4 partition) made without root mounts;
  `NbdServer` serves it read-only with nbdkit on 127.0.0.1.
- `boot_ipxe`: qemu under TCG with Debian's iPXE ROM; `UBoot`: qemu-system-x86_64 with Debian's
  32-bit qemu-x86 U-Boot as its BIOS, driven over a serial socket that qemu waits on
  (`wait=on`), so the 2 s autoboot prompt is never missed.
- `nginx_serving`: a stock nginx with docs/recipes.md's server block (`NGINX_SERVER`) over a
  vfsroot mount, on loopback or on the bridge of a `Netns`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.disk.images import free_port

MiB = 1024 * 1024
CACHE = Path(os.environ.get("VFSROOT_E2E_CACHE", "/var/tmp/vfsroot-e2e"))

SUBNET_PREFIX = "10.77.0"
SERVER_IP = f"{SUBNET_PREFIX}.1"
CLIENT_IP = f"{SUBNET_PREFIX}.100"
RA_PREFIX = "fd77::"

PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
UBOOT_ROM = Path("/usr/lib/u-boot/qemu-x86/u-boot.rom")
IPXE_VIRTIO_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")

#: Environment for anything that launches a libguestfs appliance: KVM hangs on these hosts.
GUESTFS_ENV = {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


class HarnessError(RuntimeError):
    """Something the harness needs did not work; the message says what and where to look."""


def run(argv: Sequence[str | os.PathLike], timeout: float = 120, **kw) -> str:
    """Run a command to completion; on failure raise with its output in the message."""
    try:
        cp = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"{argv[0]} timed out after {timeout} s") from e
    if cp.returncode != 0:
        raise HarnessError(
            f"{' '.join(map(str, argv))} exited {cp.returncode}: "
            f"{cp.stderr.decode(errors='replace')[-2000:]}"
        )
    return cp.stdout.decode(errors="replace")


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError as e:
        return f"<{path}: {e}>"


# --- packages unpacked, not installed -----------------------------------------------------------

@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def unpacked_deb(package: str) -> Path:
    """`apt-get download` + `dpkg -x` one package into the cache; return the unpacked tree."""
    dest = CACHE / "unpacked" / package
    if (dest / ".done").exists():
        return dest
    with _cache_lock():
        if (dest / ".done").exists():
            return dest
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        for f in debs.glob(f"{package}_*.deb"):
            f.unlink()
        try:
            run(["apt-get", "download", package], cwd=debs, timeout=300)
        except HarnessError:
            # A machine that never ran `apt-get update` has no package lists yet.
            run(["apt-get", "update", "-q"], timeout=600)
            run(["apt-get", "download", package], cwd=debs, timeout=300)
        (deb,) = debs.glob(f"{package}_*.deb")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        run(["dpkg", "-x", deb, dest])
        (dest / ".done").touch()
    return dest


def busybox() -> Path:
    return unpacked_deb("busybox-static") / "bin" / "busybox"


def tftpd_hpa() -> Path:
    return unpacked_deb("tftpd-hpa") / "usr" / "sbin" / "in.tftpd"


def host_kernel() -> Path:
    """The newest Debian kernel in /boot (libguestfs-tools pulls one in for its appliance)."""
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        raise HarnessError("no /boot/vmlinuz-*: install linux-image-amd64")
    return Path(kernels[-1])


# --- what the client boots ----------------------------------------------------------------------

INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
for w in $(/bin/busybox cat /proc/cmdline); do
  case $w in vfsroot_token=*) echo "VFSROOT-TOKEN=${w#vfsroot_token=}";; esac
done
echo "VFSROOT-SHA256=$(/bin/busybox sha256sum /payload | /bin/busybox cut -d' ' -f1)"
/bin/busybox poweroff -f
"""


@dataclass(frozen=True)
class Initrd:
    path: Path
    payload_sha256: str


def build_initrd(dest: Path, payload_bytes: int) -> Initrd:
    """An uncompressed newc cpio: busybox, /init, and `payload_bytes` of random /payload."""
    tree = dest.parent / (dest.name + ".tree")
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "proc", "dev"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(busybox(), tree / "bin" / "busybox")
    (tree / "init").write_text(INIT)
    (tree / "init").chmod(0o755)
    h = hashlib.sha256()
    with (tree / "payload").open("wb") as f:
        left = payload_bytes
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    names = run(["find", "."], cwd=tree)
    with dest.open("wb") as out:
        cp = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree,
                            input=names.encode(), stdout=out, stderr=subprocess.PIPE, timeout=120)
    if cp.returncode != 0:
        raise HarnessError(f"cpio failed: {cp.stderr.decode(errors='replace')}")
    shutil.rmtree(tree)
    return Initrd(dest, h.hexdigest())


def mac_config_name(mac: str) -> str:
    """PXELINUX's and U-Boot's per-MAC config name: `01-` + the MAC with dashes."""
    return "01-" + mac.lower().replace(":", "-")


def pxelinux_config(kernel: str, initrd: str, token: str) -> str:
    # No SERIAL directive: with -nographic SeaBIOS already mirrors the console to serial.
    return (
        "DEFAULT e2e\n"
        "LABEL e2e\n"
        f"  KERNEL {kernel}\n"
        f"  INITRD {initrd}\n"
        f"  APPEND console=ttyS0 quiet panic=-1 vfsroot_token={token}\n"
    )


def ipxe_script(kernel: str, initrd: str, token: str) -> str:
    # Relative names resolve against the script's own URI (tftp://<next-server>/boot.ipxe).
    return (
        "#!ipxe\n"
        f"kernel {kernel} console=ttyS0 quiet panic=-1 vfsroot_token={token}\n"
        f"initrd {initrd}\n"
        "boot\n"
    )


def grub_config(kernel: str, initrd: str, token: str) -> str:
    # Paths are on GRUB's root, the TFTP server it was loaded from: (tftp,<next-server>).
    return (
        "set timeout=0\n"
        f"linux {kernel} console=ttyS0 quiet panic=-1 vfsroot_token={token}\n"
        f"initrd {initrd}\n"
        "boot\n"
    )


def build_grub_netdir(dest: Path) -> None:
    """GRUB's BIOS network boot tree (boot/grub/i386-pc/core.0 + modules), from grub-pc-bin."""
    run(["grub-mknetdir", f"--net-directory={dest}", "--subdir=boot/grub",
         "-d", "/usr/lib/grub/i386-pc"], timeout=120)
    if not (dest / "boot/grub/i386-pc/core.0").exists():
        raise HarnessError(f"grub-mknetdir made no core.0 in {dest}")


def crc32_file(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            crc = zlib.crc32(chunk, crc)
    return crc


# --- client disks -------------------------------------------------------------------------------

def _stage(stage: Path, files: dict[str, Path | bytes]) -> int:
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    total = 0
    for guest, content in files.items():
        p = stage / guest.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif _same_fs(content, p.parent):
            os.link(content, p)
        else:
            shutil.copy2(content, p)
        total += p.stat().st_size
    return total


def build_disk(dest: Path, files: dict[str, Path | bytes], size: int | None = None,
               fat: dict[str, Path | bytes] | None = None) -> None:
    """An MBR disk made without loop devices or mounts; `files` maps guest path -> content.

    Without `fat`: one ext4 partition (from 1 MiB) holding `files`.  With `fat` (a Raspberry
    Pi's layout): p1 is a 64 MiB FAT32 boot partition holding `fat`, p2 the ext4 with `files`.
    mkfs.ext4 writes straight into its partition (`-E offset=`) from a staging directory
    (`-d`); the FAT is built apart with mkfs.vfat + mcopy and copied in.
    """
    stage = dest.parent / (dest.name + ".root")
    total = _stage(stage, files)
    fat_size = 64 * MiB if fat is not None else 0
    ext_start = MiB + fat_size
    if size is None:
        size = ext_start + ((total * 5 // 4 + 32 * MiB) // MiB + 1) * MiB
    with dest.open("wb") as f:
        f.truncate(size)
    if fat is None:
        table = "label: dos\nstart=2048, type=83\n"
    else:
        table = (f"label: dos\nstart=2048, size={fat_size // 512}, type=c, bootable\n"
                 f"start={ext_start // 512}, type=83\n")
    run(["sfdisk", "-q", dest], input=table.encode())
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", f"offset={ext_start}", "-d", stage, dest,
         f"{(size - ext_start) // 1024}k"], timeout=300)
    shutil.rmtree(stage)
    if fat is not None:
        part = dest.parent / (dest.name + ".fat")
        fat_stage = dest.parent / (dest.name + ".fatroot")
        _stage(fat_stage, fat)
        with part.open("wb") as f:
            f.truncate(fat_size)
        run(["mkfs.vfat", "-F", "32", "-n", "BOOTFS", part])
        run(["mcopy", "-s", "-i", part, *sorted(fat_stage.iterdir()), "::/"])
        with dest.open("r+b") as out, part.open("rb") as src:
            out.seek(MiB)
            shutil.copyfileobj(src, out, 4 * MiB)
        part.unlink()
        shutil.rmtree(fat_stage)


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


class NbdServer:
    """nbdkit serving one image read-only on 127.0.0.1 (a stand-in for the fleet's NBD host)."""

    def __init__(self, image: Path, log: Path) -> None:
        self.image = image
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self) -> NbdServer:
        for _ in range(5):
            self.port = free_port()
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    ["nbdkit", "-f", "-r", "--exit-with-parent", "-i", "127.0.0.1",
                     "-p", str(self.port), "file", str(self.image)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()  # the port was taken meanwhile, or nbdkit is broken: try again
        raise HarnessError(f"nbdkit did not start; see {self.log}:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None


def nbd_config(url: str, mounts: list[tuple[int, str]] | None = None,
               tftp_root: str = "/boot") -> str:
    """The client's `SRC/<ip>.nbd`; by default partition 1 is / and TFTP serves its /boot."""
    mounts = mounts or [(1, "/")]
    return json.dumps({"url": url,
                       "mounts": [{"partition": n, "mountpoint": m} for n, m in mounts],
                       "tftp_root": tftp_root}, indent=2) + "\n"


# --- processes and the namespace ----------------------------------------------------------------

def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaps."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)


@dataclass
class Netns:
    """A private network namespace: `br0` = SERVER_IP/24 (+ RA_PREFIX/64), `tap0` on the bridge.

    Use as a context manager; `close()` stops what `popen` started, kills whatever
    `ip netns pids` still lists, and deletes the namespace.
    """

    workdir: Path
    name: str = field(default_factory=lambda: f"vfsr-e2e-{os.getpid()}-{secrets.token_hex(3)}")
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> Netns:
        run(["ip", "netns", "add", self.name])
        try:
            for cmd in (
                ["link", "set", "lo", "up"],
                # tftpd-hpa exits 66 in a namespace whose loopback has only 127.0.0.1.
                ["addr", "add", "127.0.0.2/8", "dev", "lo"],
                ["link", "add", "br0", "type", "bridge"],
                ["tuntap", "add", "tap0", "mode", "tap"],
                ["link", "set", "tap0", "master", "br0"],
                ["addr", "add", f"{SERVER_IP}/24", "dev", "br0"],
                ["addr", "add", f"{RA_PREFIX}1/64", "dev", "br0", "nodad"],
                ["link", "set", "br0", "up"],
                ["link", "set", "tap0", "up"],
            ):
                run(["ip", "-n", self.name, *cmd])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def argv(self, argv: Sequence[str | os.PathLike]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def popen(self, argv: Sequence[str | os.PathLike], log: Path, **kw) -> subprocess.Popen:
        """Start `argv` inside the namespace (directly, so the PID is the real one)."""
        with log.open("ab") as out:
            proc = subprocess.Popen(self.argv(argv), stdin=kw.pop("stdin", subprocess.DEVNULL),
                                    stdout=out, stderr=subprocess.STDOUT, **kw)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        try:
            out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                                 timeout=10).stdout.decode()
        except subprocess.TimeoutExpired:
            return []
        return [int(p) for p in out.split()]

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, grace=5)
        self.procs.clear()
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


def dnsmasq_argv(workdir: Path, hosts: dict[str, str], boot_file: str = "pxelinux.0",
                 tftp_server: str = SERVER_IP) -> list[str]:
    """DHCP (and an IPv6 RA) on br0 only; no DNS (`port=0`); `hosts` maps MAC -> address."""
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--no-ping",
        "--interface=br0", "--bind-interfaces", "--log-dhcp", "--log-facility=-",
        f"--dhcp-leasefile={workdir / 'dnsmasq.leases'}", f"--pid-file={workdir / 'dnsmasq.pid'}",
        f"--dhcp-range={SUBNET_PREFIX}.100,{SUBNET_PREFIX}.199,255.255.255.0,1h",
        f"--dhcp-boot={boot_file},,{tftp_server}",
        "--enable-ra", f"--dhcp-range={RA_PREFIX},ra-only",
    ]
    argv += [f"--dhcp-host={mac},{ip}" for mac, ip in hosts.items()]
    return argv


def tftpd_hpa_argv(root: Path, address: str = f"{SERVER_IP}:69") -> list[str]:
    return [tftpd_hpa(), "--foreground", "--address", address, "--secure", "--verbose",
            "--verbose", root]


def wait_tftp(ns: Netns, path: str, expect: bytes, log: Path, timeout: float = 240) -> None:
    """Fetch `path` over TFTP from inside the namespace (as SERVER_IP) until it matches."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        cp = subprocess.run(ns.argv(["curl", "-sS", "--max-time", "10", "-o", "-",
                                     f"tftp://{SERVER_IP}/{path}"]),
                            capture_output=True, timeout=60)
        if cp.returncode == 0 and cp.stdout == expect:
            return
        last = cp.stderr.decode(errors="replace") or f"{len(cp.stdout)} bytes, not the file"
        time.sleep(0.5)
    raise HarnessError(f"TFTP server never served {path}: {last}\n{tail(log)}")


def wait_file(path: Path, expect: bytes, log: Path, timeout: float) -> None:
    """Read `path` (in a FUSE view) until it holds `expect`: a disk attaches in the meantime."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if path.read_bytes() == expect:
                return
            last = "content differs"
        except OSError as e:
            last = e
        time.sleep(1)
    raise HarnessError(f"{path} never showed the disk's file ({last}):\n{tail(log)}")


# --- firmware -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BootResult:
    console: str
    seconds: float

    def value(self, key: str) -> str | None:
        m = re.search(rf"VFSROOT-{key}=(\S+)", self.console)
        return m.group(1) if m else None


def boot_ipxe(ns: Netns, mac: str, log: Path, timeout: float, memory_mb: int = 512) -> BootResult:
    """PXE-boot a qemu (TCG) with Debian's iPXE virtio ROM; wait for it to power off."""
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-nographic",
        "-no-reboot", "-boot", "n",
        "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
        # The ROM carries the modern virtio ID: without disable-legacy SeaBIOS skips it.
        "-device", f"virtio-net-pci,disable-legacy=on,netdev=n0,mac={mac},"
                   f"romfile={IPXE_VIRTIO_ROM}",
    ]
    start = time.monotonic()
    proc = ns.popen(argv, log)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_process(proc, grace=2)
    return BootResult(log.read_bytes().decode(errors="replace"), time.monotonic() - start)


class _FirmwareStalled(HarnessError):
    """The firmware never reached its prompt: nothing of the server under test ran yet."""


class UBoot:
    """Debian's 32-bit qemu-x86 U-Boot as the BIOS of a qemu-system-x86_64 (whose CPU can then run
    a 64-bit kernel; the x86_64 U-Boot build resets when it starts one); serial on a socket."""

    PROMPT = b"\n=> "  # at a line start: crc32 prints "==> "

    def __init__(self, ns: Netns, mac: str, workdir: Path, memory_mb: int = 512) -> None:
        self.ns = ns
        self.log = workdir / "uboot-qemu.log"
        self.console_log = workdir / "uboot-console.log"
        self.sock_path = workdir / "uboot-serial.sock"
        self.mac = mac
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.transcript = b""
        self._buf = b""

    def __enter__(self) -> UBoot:
        # Under TCG, U-Boot's early init very rarely stops after "Loading Environment" and
        # never reaches its prompt (seen once, in a full CI run on 2026-11-30). That is before
        # any network traffic, so before the server under test has a part in it: such a start
        # is retried once.
        # Everything after the prompt -- DHCP, TFTP, the checks -- gets no second chance.
        for attempt in (1, 2):
            try:
                self._start()
                return self
            except _FirmwareStalled:
                if attempt == 2:
                    raise
                self.transcript += b"\n[harness: U-Boot never reached its prompt; restarted]\n"
                self._buf = b""

    def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        self.proc = self.ns.popen([
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(self.memory_mb),
            "-bios", UBOOT_ROM, "-display", "none", "-no-reboot", "-monitor", "none",
            "-chardev", f"socket,id=s0,path={self.sock_path},server=on,wait=on",
            "-serial", "chardev:s0",
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"e1000,netdev=n0,mac={self.mac}",
        ], self.log)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(str(self.sock_path))
                    break
                except OSError:
                    s.close()
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise HarnessError(f"qemu serial socket never came up:\n"
                                           f"{tail(self.log)}") from None
                    time.sleep(0.05)
            s.settimeout(0.2)
            self.sock = s
            try:
                self.expect(b"Hit any key", 120)
            except HarnessError as exc:
                raise _FirmwareStalled(str(exc)) from None
            self.sock.sendall(b" ")
            self.expect(self.PROMPT, 30)
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            stop_process(self.proc, grace=2)
            self.proc = None
        self.console_log.write_bytes(self.transcript)

    def expect(self, pattern: bytes, timeout: float) -> bytes:
        """Read until `pattern`; return what came before it."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while (i := self._buf.find(pattern)) < 0:
            if time.monotonic() > deadline:
                raise HarnessError(f"U-Boot: no {pattern!r} within {timeout} s; console ends:\n"
                                   f"{self.transcript[-3000:].decode(errors='replace')}")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise HarnessError("U-Boot: serial console closed (qemu exited):\n"
                                   f"{self.transcript[-3000:].decode(errors='replace')}")
            self._buf += data
            self.transcript += data
        before, self._buf = self._buf[:i], self._buf[i + len(pattern):]
        return before

    def command(self, cmd: str, timeout: float = 60) -> str:
        """Type one command line; return its output (without the echo and the next prompt)."""
        assert self.sock is not None
        self.sock.sendall(cmd.encode() + b"\n")
        out = self.expect(self.PROMPT, timeout).decode(errors="replace")
        return out.split("\n", 1)[1] if "\n" in out else ""

    def run_until(self, cmd: str, pattern: bytes, timeout: float) -> str:
        """Type a command that does not come back to the prompt (a boot); read to `pattern`."""
        assert self.sock is not None
        self.sock.sendall(cmd.encode() + b"\n")
        return self.expect(pattern, timeout).decode(errors="replace")

    def crc32(self, addr: str, size: str = "${filesize}") -> int:
        out = self.command(f"crc32 {addr} {size}")
        m = re.search(r"==>\s*([0-9a-fA-F]{8})", out)
        if not m:
            raise HarnessError(f"U-Boot crc32 printed no checksum: {out!r}")
        return int(m.group(1), 16)


# --- our product --------------------------------------------------------------------------------

def entry_point(name: str) -> list[str]:
    """Our console script next to the running interpreter (the venv's bin/)."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module = {"vfsroot": "vfsroot.cli", "vfsroot-tftpd": "tftpd.cli"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


class VfsrootMount:
    """`vfsroot serve --source SRC --mount M` in the root namespace; unmounted on close."""

    def __init__(self, source: Path, mount: Path, log: Path, extra: Sequence[str] = ()) -> None:
        self.source = source
        self.mount = mount
        self.log = log
        self.extra = tuple(extra)  # more `vfsroot serve` flags, e.g. --metrics
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> VfsrootMount:
        self.mount.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **GUESTFS_ENV}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                # KVM hangs on these hosts: never let an appliance launch try it.
                [*entry_point("vfsroot"), "serve", "--source", str(self.source),
                 "--mount", str(self.mount), "--force-tcg", *self.extra],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        try:
            deadline = time.monotonic() + 60
            while not os.path.ismount(self.mount):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise HarnessError(f"vfsroot never mounted {self.mount}:\n{tail(self.log)}")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=20)
            self.proc = None
        if os.path.ismount(self.mount):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], capture_output=True,
                           timeout=30)


def vfsroot_tftpd_argv(root: Path, address: str = f"{SERVER_IP}:69") -> list[str]:
    return [*entry_point("vfsroot-tftpd"), "--root", str(root), "--listen", address]


# --- a stock web server over the mount (docs/recipes.md, "HTTP boot") --------------------------

#: The recipe's server block (docs/recipes.md), verbatim; tests replace the port and mount.
NGINX_SERVER = """\
server {
    listen 80;
    # every client gets its own tree: vfsroot's view of its address
    root /run/vfsroot/$remote_addr;
    autoindex off;
    location / {
        limit_except GET { deny all; }
    }
}
"""

#: The rest of a private nginx.conf: nothing of the system's configuration is read.
NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    default_type application/octet-stream;
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{server}
}}
"""


def nginx_conf(prefix: Path, listen: str, mount: Path) -> Path:
    """Write a private nginx.conf serving `mount` per client on `listen`; returns its path."""
    server = NGINX_SERVER.replace("listen 80;", f"listen {listen};") \
        .replace("/run/vfsroot/", f"{mount}/")
    assert server != NGINX_SERVER and f"root {mount}/$remote_addr;" in server
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, server=server))
    return conf


def nginx_argv(conf: Path) -> list[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return [nginx, "-c", str(conf), "-p", str(conf.parent), "-g", "daemon off;"]


def world_traversable_mount(prefix: str) -> Path:
    """A mount point that daemons which drop to an unprivileged user (nginx's workers,
    dnsmasq, tftpd-hpa) can reach, as /run/vfsroot is (pytest's tmp directories are root-only);
    remove `.parent` when done."""
    parent = Path(tempfile.mkdtemp(prefix=prefix, dir="/run"))
    parent.chmod(0o755)
    return parent / "vfsroot"


def curl(url: str, interface: str, *extra: str, argv_prefix: tuple[str, ...] = ()
         ) -> tuple[int, bytes]:
    """(HTTP status, body) of a GET from `interface`; the URL is sent exactly as written."""
    cp = subprocess.run([*argv_prefix, "curl", "-sS", "--path-as-is", "--max-time", "20",
                         "--interface", interface, "-o", "-", "-w", "\n%{http_code}", *extra,
                         url], capture_output=True, timeout=60)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")
    body, _, status = cp.stdout.rpartition(b"\n")
    return int(status), body


def wait_http(url: str, interface: str, expect: bytes, log: Path, timeout: float = 30,
              argv_prefix: tuple[str, ...] = ()) -> None:
    """GET `url` from `interface` until it answers 200 with exactly `expect`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = curl(url, interface, argv_prefix=argv_prefix)
            if last == (200, expect):
                return
        except AssertionError as e:  # not listening yet
            last = e
        time.sleep(0.2)
    raise HarnessError(f"nginx never served {url}: {last!r}\n{tail(log)}")


@contextlib.contextmanager
def nginx_serving(mount: Path, prefix: Path, log: Path, probe: str, client: str,
                  expect: bytes, ns: Netns | None = None) -> Iterator[int]:
    """nginx with the recipe's server block (`NGINX_SERVER`) over `mount`; yields its port once
    GET `probe` (a path) from `client` answers exactly `expect`.

    In the root namespace it listens on 127.0.0.1 at a free port; with `ns`, on SERVER_IP:80
    inside that namespace.  `prefix` is nginx's private directory (nginx.conf, access.log,
    error.log), `log` takes its output.  nginx is stopped on the way out, so enter this inside
    the `VfsrootMount`: nginx may hold files of the mount open and must go before the unmount.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    host, port = ("127.0.0.1", free_port()) if ns is None else (SERVER_IP, 80)
    argv = nginx_argv(nginx_conf(prefix, f"{host}:{port}", mount))
    if ns is None:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
    else:
        proc = ns.popen(argv, log)
    try:
        wait_http(f"http://{host}:{port}{probe}", client, expect, log,
                  argv_prefix=() if ns is None else tuple(ns.argv([])))
        yield port
    finally:
        stop_process(proc)
