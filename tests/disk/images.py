"""Build real partitioned disk images without root mounts, and serve them over NBD.

Everything here uses only user-space tools (sfdisk, mkfs.vfat + mtools, mkfs.ext4 -d, debugfs)
so the tests need no loop devices and no mounts.  The layout imitates a netbooted client:

    MBR  p1  FAT16  8 MiB   mounted at /boot/efi   (EFI/BOOT/BOOTX64.EFI, config.txt, vmlinuz-efi)
         p2  ext4  55 MiB   mounted at /           (/etc, /boot with kernels and symlinks)
         p3  LVM   12 MiB   PV of vfsroottestvg; LV bootlv (ext4) mounted at /boot/lvm

The ext4 journal holds a committed but unreplayed transaction (a "dirty journal", as on a live
client), written with debugfs' journal_write so no kernel ever mounts it writable.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

MiB = 1024 * 1024
P1_START = 1 * MiB
P1_SIZE = 8 * MiB
P2_START = P1_START + P1_SIZE
P3_START = 64 * MiB
P3_SIZE = 12 * MiB
IMAGE_SIZE = P3_START + P3_SIZE
#: The LVM volume group on p3 (one LV, "bootlv", 8 MiB, ext4), when loop devices allow it.
LVM_VG = "vfsroottestvg"
LVM_LV = "bootlv"

#: The non-UTF-8 name inside /boot; the layer must skip it (with a warning), not fail.
BAD_NAME = b"bad-\xff-name"


def payload(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes, so tests compare sha256 instead of trusting sizes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


@dataclass
class Image:
    path: pathlib.Path
    #: guest path -> expected bytes, for what the tests read back
    files: dict[str, bytes]
    #: p3 holds the LVM volume group (False where loop devices or lvm2 are missing)
    lvm: bool = False
    #: why there is no LVM volume group (the missing tool), "" when there is one
    lvm_missing: str = ""
    #: sha256 of the image's bytes: taken once when it is built, and moved only by the tests'
    #: own intended changes (`rewrite_fat_file`), never by re-reading the image
    expected_sha256: str = ""

    def sha256(self) -> str:
        h = hashlib.sha256()
        with self.path.open("rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
        return h.hexdigest()

    def fat_spec(self) -> str:
        """mtools' "image@@offset" notation for p1."""
        return f"{self.path}@@{P1_START}"

    def rewrite_fat_file(self, name: str, data: bytes, tmp: pathlib.Path) -> None:
        """Rewrite a file on p1 in place, as a live client upgrading its kernel would.

        The baseline moves by this change only: the image must still be exactly what the
        baseline says (a write by vfsroot before now fails here), the change is made on a
        private copy whose sha256 becomes the baseline, and only then do the changed blocks
        go into the served image (in place: nbdkit holds it open).
        """
        assert self.sha256() == self.expected_sha256, "vfsroot wrote to the client's disk"
        copy = tmp / "rewrite.img"
        shutil.copyfile(self.path, copy)
        src = tmp / "rewrite.bin"
        src.write_bytes(data)
        run("mcopy", "-o", "-i", f"{copy}@@{P1_START}", str(src), f"::/{name}")
        self.expected_sha256 = Image(copy, {}).sha256()
        with copy.open("rb") as new, self.path.open("r+b") as out:
            offset = 0
            while chunk := new.read(MiB):
                out.seek(offset)
                if out.read(len(chunk)) != chunk:
                    out.seek(offset)
                    out.write(chunk)
                offset += len(chunk)
        copy.unlink()
        self.files[f"/boot/efi/{name}"] = data


def run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, **kw)


def build_image(dest: pathlib.Path, variant: str = "a", lvm: bool = False) -> Image:
    """Write the image described in the module docstring to `dest` (a file) and return it.
    `variant` changes /boot/only-disk.txt, to tell two disks apart."""
    work = dest.parent / (dest.name + ".d")
    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}

    # --- p2: ext4 root --------------------------------------------------------------------
    root = work / "root"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "boot" / "efi").mkdir(parents=True, exist_ok=True)
    (root / "boot" / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
    (root / "boot" / "lvm").mkdir(parents=True, exist_ok=True)

    def put(guest: str, data: bytes) -> None:
        (root / guest.lstrip("/")).write_bytes(data)
        files[guest] = data

    put("/etc/hostname", b"guest-host\n")
    put("/boot/vmlinuz-6.1", payload("vmlinuz-6.1", 3 * MiB + 123))
    put("/boot/initrd.img-6.1", payload("initrd-6.1", 5 * MiB + 7))
    put("/boot/big.bin", payload("big", 16 * MiB))
    put("/boot/pxelinux.cfg/default", b"DEFAULT disk\n")
    put("/boot/shadow.txt", b"from the disk\n")
    put("/boot/only-disk.txt", f"only on disk {variant}\n".encode())
    links = {
        "boot/vmlinuz": "vmlinuz-6.1",  # relative
        "boot/initrd.img": "/boot/initrd.img-6.1",  # absolute: guest root, never the host's
        "boot/hostname": "/etc/hostname",  # absolute, outside tftp_root, inside the guest
        "boot/etc": "../etc",  # relative directory outside tftp_root, inside the guest
        "boot/escape": "../../../../../etc/passwd",  # climbs above the guest root: ENOENT
        "boot/loop1": "loop2",
        "boot/loop2": "loop1",
        "boot/dangling": "nowhere",
        "boot/efilink": "efi/config.txt",  # crosses into the FAT mount
    }
    for name, target in links.items():
        p = root / name
        if not p.is_symlink():
            os.symlink(target, p)
    bad = os.path.join(os.fsencode(root / "boot"), BAD_NAME)
    with open(bad, "wb") as f:
        f.write(b"never served\n")

    p2 = work / "p2.img"
    p2_size = P3_START - P2_START
    with p2.open("wb") as f:
        f.truncate(p2_size)
    run("mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(p2))
    make_dirty_journal(p2, work)

    # --- p1: FAT ----------------------------------------------------------------------------
    p1 = work / "p1.img"
    with p1.open("wb") as f:
        f.truncate(P1_SIZE)
    run("mkfs.vfat", "-n", "EFI", str(p1))
    fat = work / "fat"
    (fat / "EFI" / "BOOT").mkdir(parents=True, exist_ok=True)
    fat_files = {
        "EFI/BOOT/BOOTX64.EFI": payload("bootx64", 700 * 1024),
        "config.txt": b"kernel=vmlinuz-efi\n",
        "vmlinuz-efi": payload("vmlinuz-efi-v1", 1 * MiB + 5),
    }
    for name, data in fat_files.items():
        (fat / name).write_bytes(data)
        files[f"/boot/efi/{name}"] = data
    run("mcopy", "-s", "-i", str(p1), str(fat / "EFI"), str(fat / "config.txt"),
        str(fat / "vmlinuz-efi"), "::/")

    # --- the disk -------------------------------------------------------------------------
    with dest.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    table = (
        "label: dos\n"
        f"start={P1_START // 512}, size={P1_SIZE // 512}, type=c\n"
        f"start={P2_START // 512}, size={(P3_START - P2_START) // 512}, type=83\n"
        f"start={P3_START // 512}, size={P3_SIZE // 512}, type=8e\n"
    )
    run("sfdisk", "-q", str(dest), input=table.encode())
    lvm_missing = ""
    with dest.open("r+b") as out:
        parts = [(p1, P1_START), (p2, P2_START)]
        if lvm:
            lvm_missing = lvm_tools_missing()
            if not lvm_missing:
                p3 = work / "p3.img"
                make_lvm_pv(p3, work, files)
                parts.append((p3, P3_START))
            lvm = not lvm_missing
        for part, offset in parts:
            out.seek(offset)
            with part.open("rb") as src:
                while chunk := src.read(4 * MiB):
                    out.write(chunk)
    image = Image(dest, files, lvm=lvm, lvm_missing=lvm_missing)
    image.expected_sha256 = image.sha256()
    return image


def make_dirty_journal(p2: pathlib.Path, work: pathlib.Path) -> None:
    """Leave a committed, unreplayed transaction in the ext4 journal (needs_recovery set).

    That is what a live client's disk looks like; a plain read-only mount of it fails, which
    is the rtftp fault we must not have.  The transaction rewrites an unused block, so the
    files the tests check are the same whether or not the journal is replayed.
    """
    block = work / "journal-block.bin"
    block.write_bytes(b"\0" * 4096)
    # The last block of the filesystem is free in a filesystem this empty.
    out = run("dumpe2fs", "-h", str(p2)).stdout.decode()
    count = int(next(line.split()[-1] for line in out.splitlines()
                     if line.startswith("Block count:")))
    cmds = work / "journal.cmds"
    cmds.write_text(f"jo\njw -b {count - 1} {block}\njc\n")
    run("debugfs", "-w", "-f", str(cmds), str(p2))
    features = run("dumpe2fs", "-h", str(p2)).stdout.decode()
    assert "needs_recovery" in features, "debugfs did not leave a dirty journal"


def lvm_tools_missing() -> str:
    """What this machine lacks to build the LVM partition ("" when nothing): the only reason
    the LV tests may skip.  Any other failure of the builder is a failure, not a skip."""
    if os.geteuid() != 0:
        return "needs root (losetup, pvcreate)"
    tools = ("losetup", "pvcreate", "vgcreate", "vgcfgbackup", "vgcfgrestore", "vgchange")
    if missing := [t for t in tools if not shutil.which(t)]:
        return f"missing {', '.join(missing)} (util-linux, lvm2)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    return ""


def make_lvm_pv(dest: pathlib.Path, work: pathlib.Path, files: dict[str, bytes]) -> None:
    """Write p3: an LVM PV with VG `LVM_VG` and LV `LVM_LV` holding an ext4 filesystem.

    No device-mapper and no mount: pvcreate/vgcreate work on a loop device (never activated,
    restricted by a device filter to that one loop device), the LV is added to the metadata
    with vgcfgrestore (lvcreate insists on device-mapper), and the filesystem is written at
    the LV's place in the file (its only segment starts at pe_start).  Call it only when
    `lvm_tools_missing()` is empty; every failure raises, naming the command and its stderr.
    """
    lvroot = work / "lvroot"
    lvroot.mkdir(exist_ok=True)
    data = b"kernel on a logical volume\n"
    (lvroot / "lv-kernel").write_bytes(data)
    files["/boot/lvm/lv-kernel"] = data
    with dest.open("wb") as f:
        f.truncate(P3_SIZE)
    loop = _lvm_step("losetup", "-f", "--show", str(dest)).stdout.decode().strip()
    cfg = (f'devices {{ filter=["a|^{loop}$|","r|.*|"] obtain_device_list_from_udev=0 }} '
           "activation { udev_sync=0 udev_rules=0 }")
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    meta = work / "vg.meta"
    try:
        _lvm_step("pvcreate", "-q", "--config", cfg, loop, env=env)
        _lvm_step("vgcreate", "-q", "--config", cfg, "-s", "1m", LVM_VG, loop, env=env)
        _lvm_step("vgcfgbackup", "-q", "--config", cfg, "-f", str(meta), LVM_VG, env=env)
        text = meta.read_text()
        pe_count = int(text.split("pe_count = ")[1].split()[0])
        pe_start = int(text.split("pe_start = ")[1].split()[0]) * 512
        lv = (f"\tlogical_volumes {{\n\t\t{LVM_LV} {{\n"
              '\t\t\tid = "vfsrot-test-lvol-0000-0000-0000-bootlv"\n'
              '\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]\n\t\t\tflags = []\n'
              "\t\t\tsegment_count = 1\n\t\t\tsegment1 {\n\t\t\t\tstart_extent = 0\n"
              f"\t\t\t\textent_count = {pe_count}\n"
              '\t\t\t\ttype = "striped"\n\t\t\t\tstripe_count = 1\n'
              '\t\t\t\tstripes = ["pv0", 0]\n\t\t\t}\n\t\t}\n\t}\n')
        end = text.rindex("}")
        text = text[:end] + lv + text[end:]
        text = text.replace("seqno = 1", "seqno = 2", 1)
        meta.write_text(text)
        _lvm_step("vgcfgrestore", "-q", "--config", cfg, "-f", str(meta), LVM_VG, env=env)
        subprocess.run(["vgchange", "-q", "-an", "--config", cfg, LVM_VG], env=env,
                       capture_output=True, check=False)  # in case udev auto-activated it
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
    fs = work / "lv.img"
    with fs.open("wb") as f:
        f.truncate(pe_count * MiB)
    run("mkfs.ext4", "-q", "-F", "-d", str(lvroot), str(fs))
    with dest.open("r+b") as out, fs.open("rb") as src:
        out.seek(pe_start)
        out.write(src.read())


def _lvm_step(*argv: str, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    """One command of the LVM build; a failure names the command and what it printed."""
    try:
        return run(*argv, **kw)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"building the LVM partition: {' '.join(argv)} exited "
                           f"{e.returncode}: {e.stderr.decode(errors='replace').strip()}") from e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServer:
    """nbdkit serving one file on 127.0.0.1 (writable: the tests prove we never write)."""

    def __init__(self, image: pathlib.Path, port: int | None = None) -> None:
        self.image = image
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/export"

    def start(self) -> NbdServer:
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(self.port),
             "file", str(self.image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nbdkit exited with {self.proc.returncode}") from None
                time.sleep(0.05)
        raise RuntimeError("nbdkit did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class HangingServer:
    """Accepts TCP connections and never speaks NBD: qemu waits for the handshake forever,
    which is how a launch hangs (like nested KVM does here) without burning CPU."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/hang"

    def close(self) -> None:
        self.sock.close()
