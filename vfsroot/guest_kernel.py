"""The fast appliance: the same supermin appliance, booted through qemu's PVH entry from the
kernel already decompressed once on the host, with a lean initrd and a lean /init.

Why: Debian's kernel is an XZ-compressed bzImage.  Under TCG the appliance spends ~5 s of
its 20-25 s launch decompressing it (measured: "Linux version" printed 6.5 s after qemu
started, 1.3 s with the kernel below; docs/disks.md has the figures), and it does so at every
launch.  Decompressed once on the host (~1 s) and handed to qemu as an ELF with a PVH entry
note (XEN_ELFNOTE_PHYS32_ENTRY; Debian builds with CONFIG_PVH), qemu loads it straight into
guest memory and jumps to its 32-bit entry.  The initrd then inserts only the modules that
reach the root (`vfsroot.guest_initrd`), and /init skips the storage scans vfsroot never uses
and coldplugs only the devices guestfsd needs (`vfsroot.guest_init`).

How: libguestfs boots a "fixed appliance" (files `kernel`, `initrd`, `root` and a marker
`README.fixed` in a directory on its path) instead of the supermin one when told to.  This
module builds such a directory next to libguestfs' own cached appliance
(`<cachedir>/.guestfs-<uid>/appliance.d`): `kernel` decompressed, `initrd` rewritten, `root` a
sparse copy with the edited /init (~0.7 GiB; hard links to supermin's files where a part is
not made lean: a consistent snapshot even if supermin rebuilds its appliance meanwhile).  The
directory is named after what it leaves out (with a digest of the edits) and the three source
files (the kernel's sha256, the others' inodes), so a rebuilt supermin appliance or another
vfsroot's edits get a new one; builds of other supermin appliances, and builds of the same
kind with other edits, are removed.  The
file `vfsroot-parts` says what the directory holds (`parts`, logged at each launch).

Each lean part falls back on its own to supermin's: an initrd or /init this code does not
recognise is used as it is.  When the fast path cannot be used at all, `fast_appliance`
returns None and the caller launches as usual: no supermin appliance built yet (the first
launch on a machine builds it), the supermin appliance is older than its inputs (supermin
would rebuild it: its inputs are the packages libguestfs lists in `supermin.d` and the dpkg
database), a kernel that is not an XZ bzImage or has no PVH note, a cache directory on another
filesystem, or any I/O error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import lzma
import os
import re
import shutil
import struct
import tempfile

from vfsroot import guest_init, guest_initrd

log = logging.getLogger(__name__)

#: XZ stream magic, where a bzImage's compressed payload starts.
XZ_MAGIC = b"\xfd7zXZ\x00"
#: ELF note type of the 32-bit PVH entry point, in notes named "Xen" (Xen's elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18
#: Files whose being newer than the supermin appliance makes supermin rebuild it (`--if-newer`
#: compares the output with its inputs: the appliance description and the package database).
PACKAGE_DB = "/var/lib/dpkg/status"
PREFIX = "vfsroot-"
#: The file in a fast appliance's directory that says what it holds (`parts`).
PARTS = "vfsroot-parts"


def has_pvh_note(elf: bytes) -> bool:
    """True if the ELF64 image carries a Xen PHYS32_ENTRY note (qemu's PVH boot needs it)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:  # 64-bit little-endian only
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        at, end = p_offset, p_offset + p_filesz
        while at + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, at)
            name = elf[at + 12:at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def decompress_bzimage(data: bytes) -> bytes | None:
    """The vmlinux ELF inside an XZ-compressed bzImage, or None if it is not one."""
    at = data.find(XZ_MAGIC)
    if at < 0:
        return None
    try:
        # The payload is followed by the bzImage's trailer: decompress one stream, ignore it.
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
    except lzma.LZMAError:
        return None
    return out if out[:4] == b"\x7fELF" else None


def _identity(kernel: bytes, paths: list[str]) -> str:
    """Names one build of the supermin appliance.  Not mtimes: libguestfs touches its cached
    appliance at every launch (so that tmp cleaners spare it), while a rebuild makes new
    files (new inodes) and usually a new kernel."""
    h = hashlib.sha256(kernel)
    for p in paths:
        st = os.stat(p)
        h.update(f"{st.st_dev}:{st.st_ino}:{st.st_size};".encode())
    return h.hexdigest()[:16]


def _stale(appliance_d: str, supermin_d: str) -> bool:
    """supermin would rebuild its appliance (an input is newer): launch the usual way."""
    built = min(os.stat(os.path.join(appliance_d, f)).st_mtime_ns
                for f in ("kernel", "initrd", "root"))
    inputs = [PACKAGE_DB, supermin_d]
    with contextlib.suppress(OSError):
        inputs += [os.path.join(supermin_d, n) for n in os.listdir(supermin_d)]
    newest = 0
    for p in inputs:
        with contextlib.suppress(OSError):
            newest = max(newest, os.stat(p).st_mtime_ns)
    return newest > built


def _variant(lean_initrd: bool, lean_init: bool) -> str:
    """The part of a fast appliance's directory name that says what it leaves out, with a
    digest of how (so a vfsroot that edits differently builds its own)."""
    how = hashlib.sha256()
    if lean_initrd:
        how.update(repr((guest_initrd.WANTED, guest_initrd.HELPERS.pattern)).encode())
    if lean_init:
        how.update(repr((guest_init.SKIPPED, guest_init.REPLACED)).encode())
    tag = "" if not (lean_initrd or lean_init) else "-" + how.hexdigest()[:8]
    return "pvh" + ("-initrd" if lean_initrd else "") + ("-init" if lean_init else "") + tag


def _kind(name: str) -> str:
    """"vfsroot-pvh-initrd-init-1a2b3c4d-<identity>" -> "pvh-initrd-init": what a build
    leaves out, without how.  A build of the same kind with other edits (an older vfsroot)
    is stale; builds of other kinds are left to whoever uses them (bench/launch.py)."""
    words = name.removeprefix(PREFIX).split("-")[:-1]
    if len(words) > 1 and re.fullmatch(r"[0-9a-f]{8}", words[-1]):
        words.pop()
    return "-".join(words)


def parts(fixed: str) -> str:
    """What the fast appliance at `fixed` is, for the log: e.g. "decompressed kernel (PVH
    entry), lean initrd, lean /init"."""
    try:
        with open(os.path.join(fixed, PARTS)) as f:
            return f.read().strip()
    except OSError:
        return "decompressed kernel (PVH entry)"


def _build(tmp: str, appliance_d: str, vmlinux: bytes, lean_initrd: bool,
           lean_init: bool) -> list[str]:
    """Fill `tmp` with the fast appliance; what it holds besides the kernel, for `parts`."""
    what = ["decompressed kernel (PVH entry)"]
    with open(os.path.join(tmp, "kernel"), "wb") as f:
        f.write(vmlinux)
    initrd = None
    if lean_initrd:
        with open(os.path.join(appliance_d, "initrd"), "rb") as f:
            initrd = guest_initrd.lean_initrd(f.read())
    if initrd is not None:
        with open(os.path.join(tmp, "initrd"), "wb") as f:
            f.write(initrd)
        what.append("lean initrd")
    else:
        os.link(os.path.join(appliance_d, "initrd"), os.path.join(tmp, "initrd"))
    root = os.path.join(appliance_d, "root")
    init = guest_init.read_init(root) if lean_init else None
    script = guest_init.lean_init(init.decode("utf-8", "surrogateescape")) if init else None
    if script is not None and guest_init.write_root(
            root, os.path.join(tmp, "root"), script.encode("utf-8", "surrogateescape")):
        what.append("lean /init")
    else:
        os.link(root, os.path.join(tmp, "root"))
    return what


def fast_appliance(cachedir: str, libguestfs_path: str, *, lean_initrd: bool = True,
                   lean_init: bool = True) -> str | None:
    """A fixed-appliance directory for `g.set_path()`, built on first use; None when the
    usual launch must be used (see the module docstring).  `cachedir` is
    `g.get_cachedir()`, `libguestfs_path` is `g.get_path()` (where `supermin.d` lives).
    `lean_initrd` and `lean_init` ask for the lean parts (`vfsroot.guest_initrd`,
    `vfsroot.guest_init`); a part that cannot be made lean is supermin's own."""
    base = os.path.join(cachedir, f".guestfs-{os.geteuid()}")
    appliance_d = os.path.join(base, "appliance.d")
    sources = [os.path.join(appliance_d, f) for f in ("kernel", "initrd", "root")]
    try:
        if _stale(appliance_d, os.path.join(libguestfs_path, "supermin.d")):
            return None
        with open(sources[0], "rb") as f:
            bzimage = f.read()
        identity = _identity(bzimage, sources[1:])
        name = f"{PREFIX}{_variant(lean_initrd, lean_init)}-{identity}"
        target = os.path.join(base, name)
        if os.path.exists(os.path.join(target, "README.fixed")):
            return target
        vmlinux = decompress_bzimage(bzimage)
        if vmlinux is None or not has_pvh_note(vmlinux):
            log.info("appliance kernel: no XZ bzImage with a PVH note; usual launch")
            return None
        tmp = tempfile.mkdtemp(prefix=".tmp-" + PREFIX, dir=base)
        try:
            what = _build(tmp, appliance_d, vmlinux, lean_initrd, lean_init)
            with open(os.path.join(tmp, PARTS), "w") as f:
                f.write(", ".join(what) + "\n")
            with open(os.path.join(tmp, "README.fixed"), "w") as f:
                f.write("vfsroot's fast appliance (vfsroot/guest_kernel.py): supermin's, "
                        f"with {', '.join(what)}\n")
            try:
                os.rename(tmp, target)
            except OSError:
                if not os.path.exists(os.path.join(target, "README.fixed")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in os.listdir(base):  # other builds (qemus using them keep their files)
            if old.startswith(PREFIX) and old != name and (
                    not old.endswith("-" + identity) or _kind(old) == _kind(name)):
                shutil.rmtree(os.path.join(base, old), ignore_errors=True)
        log.info("fast appliance built: %s (%s)", target, ", ".join(what))
        return target
    except OSError as e:
        log.info("appliance kernel: fast path unavailable (%s); usual launch", e)
        return None
