"""Which kind of filesystem a descriptor lives on, asked without calling into that filesystem.

The inline open (tftpd/inline_open.py) may touch a file on the event loop only where nothing
can wait: a local filesystem, never FUSE (the vfsroot tree waits on a disk), NFS or CIFS
(their server may be gone).  Asking the filesystem itself (``fstatfs``) is no good: on FUSE
that is a request to the daemon, the very wait to avoid.  So the mount is named by its id,
which ``name_to_handle_at`` reports from the VFS alone, and the id is looked up in
/proc/self/mountinfo.  (A filesystem without file handles -- ramfs, procfs -- gets no answer,
so it is never opened inline.)  Mount ids are reused after an unmount, so the table is read again
whenever the kernel says the mount table changed (``POLLPRI`` on the open mountinfo file, one
``poll`` per question) and whenever an id is not in it.

Kinds: :data:`MEMORY` (tmpfs: a read has no device to wait for) and :data:`BLOCK`
(local disk filesystems: a read may wait for the disk, so it is asked with ``RWF_NOWAIT``).
Every other type -- FUSE, network filesystems, overlay (its lower layers may be anything),
unknown ones -- is None: not opened inline.
"""

from __future__ import annotations

import ctypes
import errno
import select

MEMORY = "memory"
BLOCK = "block"

#: Filesystem types (mountinfo's type field) whose open of a cached name and whose read
#: cannot wait on anything but a local device.
KINDS: dict[str, str] = {
    "tmpfs": MEMORY,
    **dict.fromkeys(("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs",
                     "nilfs2", "vfat", "msdos", "exfat", "ntfs3", "hfsplus", "udf", "iso9660",
                     "squashfs", "erofs"), BLOCK),
}

_AT_EMPTY_PATH = 0x1000


class _FileHandle(ctypes.Structure):
    # struct file_handle without its f_handle bytes: asked with handle_bytes 0, the kernel
    # answers EOVERFLOW and still fills in the mount id.
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int)]


def parse_mountinfo(text: str) -> dict[int, str]:
    """Mount id -> filesystem type, from the text of /proc/<pid>/mountinfo.

    A line is ``id parent major:minor root mountpoint options [optional fields...] - type
    source super-options``; the optional fields are variable, so the type is found after the
    ``-`` separator.  Malformed lines are skipped (the kernel writes this file; a line we
    cannot read only means that mount is never opened inline)."""
    table: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            table[int(fields[0])] = fields[sep + 1]
        except (ValueError, IndexError):
            continue
    return table


class MountTable:
    """Answers :meth:`kind_of` for a descriptor; holds /proc/self/mountinfo open to see
    changes.  Raises OSError at construction where the kernel cannot answer (no
    ``name_to_handle_at``, no /proc): the caller then never opens inline."""

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self._path = path
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            call = libc.name_to_handle_at
        except AttributeError:
            raise OSError(errno.ENOSYS, "name_to_handle_at is not available") from None
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                         ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        call.restype = ctypes.c_int
        self._call = call
        self._handle = _FileHandle(0, 0)
        self._mnt_id = ctypes.c_int(-1)
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (lives with the table)
        self._poll = select.poll()
        self._poll.register(self._file.fileno(), select.POLLPRI)
        self._types: dict[int, str] = {}
        #: Ids a fresh read did not list (a mount detached by ``umount -l`` is still reachable
        #: from descriptors opened before): not read again for them until the table changes.
        self._unlisted: set[int] = set()
        self._reload()

    def close(self) -> None:
        self._file.close()

    def _reload(self) -> None:
        # The kernel clears POLLPRI inside poll() itself; a change made while this reads
        # shows at the next poll, and is read then.
        self._file.seek(0)
        chunks = []
        while chunk := self._file.read(65536):
            chunks.append(chunk)
        self._types = parse_mountinfo(b"".join(chunks).decode("utf-8", "replace"))
        self._unlisted.clear()

    def mount_id(self, fd: int) -> int | None:
        """The id of the mount ``fd`` is on (None: the kernel would not say)."""
        self._mnt_id.value = -1
        self._handle.handle_bytes = 0
        if self._call(fd, b"", ctypes.byref(self._handle), ctypes.byref(self._mnt_id),
                      _AT_EMPTY_PATH) != 0 and ctypes.get_errno() != errno.EOVERFLOW:
            return None  # EOPNOTSUPP: a filesystem with no file handles; not one we list
        return self._mnt_id.value if self._mnt_id.value >= 0 else None

    def fstype(self, fd: int) -> str | None:
        """The filesystem type of the mount ``fd`` is on, as mountinfo names it."""
        mnt = self.mount_id(fd)
        if mnt is None:
            return None
        if self._poll.poll(0) or (mnt not in self._types and mnt not in self._unlisted):
            self._reload()
            if mnt not in self._types:
                self._unlisted.add(mnt)
        return self._types.get(mnt)

    def kind_of(self, fd: int) -> str | None:
        """:data:`MEMORY`, :data:`BLOCK`, or None: not a filesystem to open inline."""
        fstype = self.fstype(fd)
        return KINDS.get(fstype) if fstype is not None else None

