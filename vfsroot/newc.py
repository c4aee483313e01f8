"""Read and write cpio archives in the "newc" format (what supermin's mini initrd is).

Why our own: the lean appliance (`vfsroot.guest_initrd`) rewrites supermin's initrd with fewer
kernel modules, and doing it in Python needs no `cpio` binary and no temporary tree.  Only
what an initrd holds is supported: regular files, directories and symlinks, with their mode,
owner and mtime kept; hard links are written as separate files.  Format: the 110-byte ASCII
header `070701` + 13 eight-digit hex fields, the NUL-terminated name, padding to 4 bytes, the
data, padding to 4 bytes; the archive ends with an entry named `TRAILER!!!`.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
           "rdevmajor", "rdevminor", "namesize", "check")


class NewcError(ValueError):
    """Not a newc archive we can read (the caller keeps the original initrd)."""


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def _pad(n: int) -> int:
    return -n % 4


def read(archive: bytes) -> list[Entry]:
    """Every entry of an uncompressed newc archive, in order, up to its trailer."""
    out: list[Entry] = []
    at = 0
    while True:
        if archive[at:at + 6] != MAGIC:
            raise NewcError(f"no newc header at offset {at}")
        try:
            f = dict(zip(_FIELDS, (int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16)
                                   for i in range(13)), strict=True))
        except ValueError:
            raise NewcError(f"bad newc header at offset {at}") from None
        name_at = at + 110
        name = archive[name_at:name_at + f["namesize"] - 1].decode("utf-8", "surrogateescape")
        data_at = name_at + f["namesize"] + _pad(110 + f["namesize"])
        data = archive[data_at:data_at + f["filesize"]]
        if len(data) != f["filesize"]:
            raise NewcError(f"{name}: archive truncated")
        at = data_at + f["filesize"] + _pad(f["filesize"])
        if name == TRAILER:
            return out
        out.append(Entry(name, f["mode"], data, f["uid"], f["gid"], f["mtime"]))


def write(entries: list[Entry]) -> bytes:
    """A newc archive of `entries` (inode numbers assigned in order), with its trailer."""
    parts: list[bytes] = []
    for ino, e in enumerate([*entries, Entry(TRAILER, 0)], start=1):
        name = e.name.encode("utf-8", "surrogateescape") + b"\0"
        values = (ino if e.name != TRAILER else 0, e.mode, e.uid, e.gid,
                  2 if e.mode & 0o170000 == 0o040000 else 1, e.mtime, len(e.data), 0, 0, 0, 0,
                  len(name), 0)
        header = MAGIC + b"".join(b"%08X" % v for v in values)
        parts += [header, name, b"\0" * _pad(110 + len(name)), e.data,
                  b"\0" * _pad(len(e.data))]
    return b"".join(parts)
