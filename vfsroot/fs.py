"""The pyfuse3 `Operations`: client views as a read-only file system.

Mount layout::

    /               `default` and every known client (any valid IP can be looked up)
    /<ip>/...       that client's merged view
    /default/...    the default layer alone

FUSE knows nothing of where files come from: it asks a `SourceRoot` for a client's `View`
and turns `Node` values into attributes.  Every handler sits behind `_guard`, because
pyfuse3 kills the whole mount if a handler raises anything but `FUSEError`.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import pyfuse3

from .layers.base import Kind, LayerUnavailable, Node, Path, Reader
from .names import DEFAULT, is_client_name, is_safe_component
from .sources import SourceRoot
from .view import Resolved

log = logging.getLogger(__name__)

ROOT_INODE: int = pyfuse3.ROOT_INODE

#: How long the kernel may trust a lookup or attributes.  Source-root edits must show within
#: 1 s; inotify invalidation (watch.py) usually makes them show at once, and this bounds it
#: when invalidation can't reach (disk layers, events the watcher missed).
ENTRY_TIMEOUT = 0.5
ATTR_TIMEOUT = 0.5

#: xattrs on every entry.
XATTR_LAYER = b"user.vfsroot.layer"
XATTR_SOURCE = b"user.vfsroot.source"
#: JSON list of every copy of a path, highest layer first (`vfsroot explain`); not listed.
XATTR_EXPLAIN = b"user.vfsroot.explain"
#: JSON status of all disks on the mount root, of one client's disk on /<ip> (`vfsroot status`).
XATTR_STATUS = b"user.vfsroot.status"
#: The same for fleets whose whole status exceeds the kernel's 64 KiB xattr limit, on the mount
#: root: a summary (appliances, counts, page count), then pages of clients; not listed.
XATTR_STATUS_SUMMARY = b"user.vfsroot.status.summary"
XATTR_STATUS_PAGE = b"user.vfsroot.status.page."

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class DiskStatus(Protocol):
    def status(self) -> dict[str, dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class Key:
    """What an inode stands for.  The kind is part of it: a path that turns from file into
    directory gets a new inode instead of an inode whose type changes under the kernel."""

    client: str | None  # None: the mount root
    path: Path
    kind: Kind


@dataclass(slots=True)
class InodeEntry:
    key: Key
    lookups: int = 0
    #: Content version seen at the last open: a different one means drop the page cache.
    version: tuple[object, ...] | None = None


class InodeTable:
    """Synthetic inode numbers, never reused, with exact kernel lookup counts.

    Callers must not `await` between reading and changing a count: all methods are sync.
    """

    def __init__(self) -> None:
        self._next = ROOT_INODE + 1
        self._by_key: dict[Key, int] = {}
        self._entries: dict[int, InodeEntry] = {}
        root = Key(None, (), Kind.DIR)
        self._entries[ROOT_INODE] = InodeEntry(root, lookups=1)
        self._by_key[root] = ROOT_INODE

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, inode: int) -> InodeEntry | None:
        return self._entries.get(inode)

    def inode_for(self, key: Key) -> int:
        """The live inode of `key`, or a fresh number (the count starts at 0)."""
        inode = self._by_key.get(key)
        if inode is None:
            inode = self._next
            self._next += 1
            self._by_key[key] = inode
            self._entries[inode] = InodeEntry(key)
        return inode

    def remember(self, inode: int) -> None:
        """The kernel now holds one more reference (a lookup reply or a readdir entry)."""
        self._entries[inode].lookups += 1

    def drop_unreferenced(self, inode: int) -> None:
        """Free an inode the kernel never took a reference to (a failed reply)."""
        entry = self._entries.get(inode)
        if entry is not None and entry.lookups == 0 and inode != ROOT_INODE:
            del self._entries[inode]
            del self._by_key[entry.key]

    def forget(self, inode: int, count: int) -> None:
        entry = self._entries.get(inode)
        if entry is None or inode == ROOT_INODE:
            return
        entry.lookups -= count
        if entry.lookups <= 0:
            del self._entries[inode]
            del self._by_key[entry.key]

    def live(self) -> Iterable[tuple[int, InodeEntry]]:
        return list(self._entries.items())


@dataclass(slots=True)
class FsCounters:
    """FUSE work by the layer that answered ("client", "disk", "default"; "vfsroot" for the
    directories vfsroot makes itself), read by the metrics collector at scrape time.

    Kept only while metrics are on (`VfsOperations.counts` is None otherwise).  An error that
    no single layer can be blamed for (a merge walk failing with something other than an
    unavailable disk) counts as "unknown".
    """

    lookups: Counter[str] = field(default_factory=Counter)
    reads: Counter[str] = field(default_factory=Counter)
    read_bytes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


#: Errors that are answers, not failures: a name that is not there.
_NOT_FAILURES = frozenset({errno.ENOENT, errno.ENOTDIR})


@dataclass(slots=True)
class DirHandle:
    entries: list[tuple[str, Key, Node]] = field(default_factory=list)


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _guard(func: _F) -> _F:
    """Map every failure of a handler to an errno: a stray exception would kill the mount."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENODATA):
                raise pyfuse3.FUSEError(e.errno) from None
            log.warning("op=%s error=%r", func.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("op=%s unexpected error, answered EIO", func.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _name(raw: bytes) -> str:
    name = os.fsdecode(raw)
    if not is_safe_component(name):
        raise pyfuse3.FUSEError(errno.ENOENT)
    return name


class VfsOperations(pyfuse3.Operations):
    """Read-only client views over a source root."""

    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, source: SourceRoot, disks: DiskStatus | None = None) -> None:
        super().__init__()
        self.source = source
        self.disks = disks
        self.inodes = InodeTable()
        self._dirs: dict[int, DirHandle] = {}
        self._files: dict[int, Reader] = {}
        self._next_fh = 1
        self._mounted_ns = time.time_ns()
        #: Set by the metrics collector (`vfsroot.metrics`); None: nothing is counted.
        self.counts: FsCounters | None = None

    # -- resolution ---------------------------------------------------------------------

    def _key(self, inode: int) -> Key:
        entry = self.inodes.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry.key

    async def _resolve(self, client: str, path: Path) -> Resolved | None:
        try:
            return await self.source.view(client).resolve(path)
        except OSError as e:
            if self.counts is not None and e.errno not in _NOT_FAILURES:
                # Only a disk layer is ever unavailable; other merge errors have no one layer.
                self.counts.errors["disk" if isinstance(e, LayerUnavailable) else "unknown"] += 1
            raise

    async def _node(self, key: Key) -> Node:
        """The node behind an inode now, or ENOENT (also if its kind changed)."""
        if key.client is None:
            return self._synthetic_dir("mount root")
        resolved = await self._resolve(key.client, key.path)
        if resolved is None:
            if not key.path:
                return self._synthetic_dir(f"{key.client} (no layer has a root)")
            raise pyfuse3.FUSEError(errno.ENOENT)
        if resolved.node.kind is not key.kind:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return resolved.node

    def _synthetic_dir(self, source: str) -> Node:
        return Node(Kind.DIR, 0, self._mounted_ns, "vfsroot", source)

    def _attrs(self, inode: int, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = ENTRY_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        if node.kind is Kind.DIR:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
        else:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
        attrs.st_uid = 0
        attrs.st_gid = 0
        attrs.st_size = node.size
        attrs.st_blksize = 128 * 1024
        attrs.st_blocks = (node.size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        return attrs

    def _root_listing(self) -> list[tuple[str, Key, Node]]:
        node = self._synthetic_dir("client view")
        names = [DEFAULT, *self.source.clients()]
        return [(n, Key(n, (), Kind.DIR), node) for n in names]

    # -- lookups and attributes ---------------------------------------------------------

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._key(parent_inode)
        child = _name(name)
        if parent.client is None:
            if child != DEFAULT and not is_client_name(child):
                raise pyfuse3.FUSEError(errno.ENOENT)
            key = Key(child, (), Kind.DIR)
        else:
            path = (*parent.path, child)
            resolved = await self._resolve(parent.client, path)
            if resolved is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            key = Key(parent.client, path, resolved.node.kind)
        node = await self._node(key)
        inode = self.inodes.inode_for(key)
        self.inodes.remember(inode)
        if self.counts is not None:
            self.counts.lookups[node.layer] += 1
        return self._attrs(inode, node)

    @_guard
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode, await self._node(self._key(inode)))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    # -- directories --------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        key = self._key(inode)
        if key.client is None:
            listing = self._root_listing()
        else:
            if key.kind is not Kind.DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            view = self.source.view(key.client)
            resolved = await view.resolve(key.path)
            if resolved is None or resolved.node.kind is not Kind.DIR:
                if key.path:  # gone, or now a file: a stale inode, like getattr says
                    raise pyfuse3.FUSEError(errno.ENOENT)
                entries: dict[str, Node] = {}
            else:
                entries = await view.listdir(resolved, key.path)
            listing = [
                (name, Key(key.client, (*key.path, name), node.kind), node)
                for name, node in sorted(entries.items())
            ]
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(listing)
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for index in range(start_id, len(handle.entries)):
            name, key, node = handle.entries[index]
            inode = self.inodes.inode_for(key)
            if not pyfuse3.readdir_reply(
                token, os.fsencode(name), self._attrs(inode, node), index + 1
            ):
                self.inodes.drop_unreferenced(inode)
                break
            self.inodes.remember(inode)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files --------------------------------------------------------------------------

    @_guard
    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        entry = self.inodes.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        key = entry.key
        if key.kind is not Kind.FILE or key.client is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        resolved = await self._resolve(key.client, key.path)
        if resolved is None or resolved.node.kind is not Kind.FILE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            reader = await resolved.layer.open(key.path)
        except OSError as e:
            if self.counts is not None and e.errno not in _NOT_FAILURES:
                self.counts.errors[resolved.node.layer] += 1
            raise
        # Keep the kernel's cached pages only while the content is the one they came from.
        keep_cache = entry.version == reader.node.version and bool(reader.node.version)
        entry.version = reader.node.version
        fh = self._new_fh()
        self._files[fh] = reader
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        reader = self._files.get(fh)
        if reader is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if self.counts is None:
            return await reader.read(off, size)
        layer = reader.node.layer
        try:
            data = await reader.read(off, size)
        except Exception:
            self.counts.errors[layer] += 1
            raise
        self.counts.reads[layer] += 1
        self.counts.read_bytes[layer] += len(data)
        return data

    async def release(self, fh: int) -> None:
        reader = self._files.pop(fh, None)
        if reader is not None:
            try:
                await reader.close()
            except Exception:
                log.exception("op=release close failed fh=%d", fh)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- extended attributes ------------------------------------------------------------

    @_guard
    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        key = self._key(inode)
        if name == XATTR_STATUS:
            return self._status_json(key)
        if key.client is None and name.startswith(XATTR_STATUS + b"."):
            return self._status_paged(name)
        if key.client is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if name == XATTR_EXPLAIN:
            return await self._explain_json(key)
        node = await self._node(key)
        if name == XATTR_LAYER:
            return node.layer.encode()
        if name == XATTR_SOURCE:
            return os.fsencode(node.source)
        raise pyfuse3.FUSEError(errno.ENODATA)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> list[bytes]:
        key = self._key(inode)
        names = [] if key.client is None else [XATTR_LAYER, XATTR_SOURCE]
        if not key.path and self.disks is not None:
            names.append(XATTR_STATUS)
        return names

    def _status_json(self, key: Key) -> bytes:
        status = self.disks.status() if self.disks is not None else {}
        if key.client is not None:
            if key.path:
                raise pyfuse3.FUSEError(errno.ENODATA)
            status = status.get(key.client, {"state": "none"})
        return json.dumps(status, sort_keys=True).encode()

    def _status_paged(self, name: bytes) -> bytes:
        disks: Any = self.disks
        if name == XATTR_STATUS_SUMMARY and hasattr(disks, "status_summary"):
            return json.dumps(disks.status_summary(), sort_keys=True).encode()
        page = name[len(XATTR_STATUS_PAGE):]
        if name.startswith(XATTR_STATUS_PAGE) and page.isdigit() and hasattr(disks,
                                                                             "status_page"):
            return json.dumps(disks.status_page(int(page)), sort_keys=True).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def _explain_json(self, key: Key) -> bytes:
        assert key.client is not None
        copies = await self.source.view(key.client).explain(key.path)
        return json.dumps(
            [{"layer": n.layer, "source": n.source, "kind": n.kind.value, "size": n.size}
             for n in copies]
        ).encode()

    # -- the rest -----------------------------------------------------------------------

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.inodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- invalidation (called by the source watcher) ------------------------------------

    def invalidate(self, client: str | None, path: Path) -> None:
        """The source root changed at `path` of `client` (None: of every client, because the
        default layer changed): tell the kernel to forget the cached entry now instead of
        waiting for its timeout."""
        if not path:
            return
        parent, name = path[:-1], os.fsencode(path[-1])
        for inode, entry in self.inodes.live():
            key = entry.key
            if key.kind is not Kind.DIR or key.path != parent:
                continue
            if key.client is None or (client is not None and key.client != client):
                continue
            try:
                pyfuse3.invalidate_entry_async(inode, name, ignore_enoent=True)
            except Exception:  # the mount may be going away
                log.debug("invalidate failed inode=%d name=%r", inode, name)

    def invalidate_client(self, client: str) -> None:
        """A client appeared or went: drop the mount root's entry for it."""
        try:
            pyfuse3.invalidate_entry_async(ROOT_INODE, client.encode(), ignore_enoent=True)
        except Exception:
            log.debug("invalidate failed client=%s", client)
