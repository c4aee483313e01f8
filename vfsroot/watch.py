"""Source-root events: tell the mount (and the disk manager) what changed, as it changes.

The kernel caches lookups and attributes for `fs.ENTRY_TIMEOUT`; that alone bounds how stale a
view can be.  The watcher makes edits visible at once: it watches the whole source root with
inotify and invalidates the kernel's entry for every path that changed, in every view that
shows it (a change under `default/` concerns every client).  A `<ip>.nbd` event goes to the
disk manager, which attaches, re-attaches or detaches that client's disk.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path as HostPath

import trio
from inotify_simple import INotify
from inotify_simple import flags as F

from .layers.base import Path
from .names import DEFAULT, client_of_config, is_client_name

log = logging.getLogger(__name__)

WATCH_MASK = (
    F.CREATE | F.DELETE | F.MODIFY | F.CLOSE_WRITE | F.MOVED_FROM | F.MOVED_TO | F.ATTRIB
    | F.DELETE_SELF | F.ONLYDIR
)


class SourceWatcher:
    """Recursive inotify watch over a source root."""

    def __init__(
        self,
        root: HostPath,
        *,
        on_path: Callable[[str | None, Path], None],
        on_client: Callable[[str], None],
        on_config: Callable[[str], None],
    ) -> None:
        self.root = str(root)
        #: (client or None for default, path inside the layer) changed.
        self.on_path = on_path
        #: a client directory or config appeared or went.
        self.on_client = on_client
        #: `<client>.nbd` was created, changed, deleted or moved.
        self.on_config = on_config
        self._inotify = INotify()
        self._dirs: dict[int, tuple[str, ...]] = {}

    def _add_tree(self, rel: tuple[str, ...]) -> None:
        """Watch `rel` and every directory below it (not following symlinks)."""
        top = os.path.join(self.root, *rel)
        for dirpath, dirnames, _ in os.walk(top):
            sub = os.path.relpath(dirpath, self.root)
            parts = () if sub == "." else tuple(sub.split(os.sep))
            if parts and not (parts[0] == DEFAULT or is_client_name(parts[0])):
                dirnames[:] = []
                continue
            try:
                wd = self._inotify.add_watch(dirpath, WATCH_MASK)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    log.warning("inotify watch limit reached; edits below %s show only after "
                                "the cache timeout", dirpath)
                    return
                continue  # gone already
            self._dirs[wd] = parts

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._add_tree(())
        log.info("watching source root=%s dirs=%d", self.root, len(self._dirs))
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self._inotify.fileno())
                for event in self._inotify.read(timeout=0):
                    self._handle(event)
        finally:
            self._inotify.close()

    def _handle(self, event: object) -> None:
        wd, mask, name = event.wd, event.mask, event.name  # type: ignore[attr-defined]
        if mask & F.Q_OVERFLOW:
            log.warning("inotify queue overflowed: edits show after the cache timeout")
            return
        if mask & F.IGNORED:
            self._dirs.pop(wd, None)
            return
        parts = self._dirs.get(wd)
        if parts is None or not name:
            return
        path = (*parts, name)
        if mask & F.ISDIR and mask & (F.CREATE | F.MOVED_TO):
            self._add_tree(path)
        if not parts:  # an entry of the source root itself
            if is_client_name(name):
                self.on_client(name)
            elif (client := client_of_config(name)) is not None:
                self.on_client(client)
                self.on_config(client)
            return
        top, inner = parts[0], path[1:]
        self.on_path(None if top == DEFAULT else top, inner)
