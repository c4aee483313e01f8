"""The contract between a client view and the layers it merges.

Layers know nothing of FUSE: they answer "what is at this path" with immutable `Node` values,
list directories, and open files for reading.  Paths arrive as tuples of already validated
components (never empty, never "." or "..", no "/" or NUL inside), so a layer never has to
defend against traversal in the *name*; it only has to keep symlinks inside its own tree.

Layers never return symlinks: a layer resolves them itself (inside its own confinement) and
returns the node of the target, so the kernel never sees a link it could resolve outside
`/run/vfsroot/<ip>/`.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Protocol

#: Components of a path inside a layer, e.g. ("pxelinux.cfg", "default"); () is the layer root.
Path = tuple[str, ...]


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"


@dataclass(frozen=True, slots=True)
class Node:
    """What a layer has at one path, after following symlinks."""

    kind: Kind
    size: int
    mtime_ns: int
    #: Which layer serves it: "client", "disk" or "default" (shown as user.vfsroot.layer).
    layer: str
    #: Where it really lives, for people: a host path, or "nbd://…#/boot/vmlinuz" for a disk.
    source: str
    #: Changes whenever the content may have changed; the FUSE layer drops the kernel's page
    #: cache for the file when it sees a new version at open.
    version: tuple[object, ...] = ()

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR


class LayerUnavailable(OSError):
    """The layer cannot answer now (its disk is attaching, or failed to attach).

    The view must not fall through to a lower layer when this is raised: the unavailable layer
    might shadow the lower file, and serving the wrong kernel is worse than a retry.
    """

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(err, message)


class Reader(Protocol):
    """An open file of one layer; reads return exactly `size` bytes unless at end of file."""

    node: Node

    async def read(self, offset: int, size: int) -> bytes: ...

    async def close(self) -> None: ...


class Layer(Protocol):
    """One ordered source of files in a client's view."""

    #: "client", "disk" or "default".
    name: str

    async def lookup(self, path: Path) -> Node | None:
        """The node at `path`, or None if this layer has nothing there (or only an escaping or
        broken symlink).  Raises LayerUnavailable if the layer cannot tell now, OSError on I/O
        errors."""
        ...

    async def listdir(self, path: Path) -> dict[str, Node]:
        """Entries of the directory at `path` (which lookup said is a directory)."""
        ...

    async def open(self, path: Path) -> Reader:
        """Open the file at `path` (which lookup said is a file) for reading."""
        ...
