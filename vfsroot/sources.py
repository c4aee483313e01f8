"""The source root: which clients exist and which layers make up each client's view.

    SRC/default/      what every client sees
    SRC/<ip>/         one client's own overlay
    SRC/<ip>.nbd      one client's disk (a layer between the two, provided by `disks`)

Everything is read from the file system at the time of the request (a stat or two), so a new
client directory or config counts at once, with no cache to keep in step.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Protocol

from .layers.base import Layer
from .layers.local import LocalLayer
from .names import DEFAULT, client_of_config, is_client_name
from .view import View

log = logging.getLogger(__name__)


class DiskLayers(Protocol):
    """Where client disk layers come from (`vfsroot.disks.DiskManager`)."""

    def layer_for(self, client: str) -> Layer | None: ...


class SourceRoot:
    """A source root on the host and the views it makes."""

    def __init__(self, root: Path, disks: DiskLayers | None = None) -> None:
        self.root = Path(root)
        self.disks = disks
        self._default = LocalLayer("default", self.root / DEFAULT, self.root)
        self._warned: set[str] = set()

    def clients(self) -> list[str]:
        """Known clients: those with a directory or a disk config, sorted by address."""
        found: set[str] = set()
        with os.scandir(self.root) as it:
            for entry in it:
                if is_client_name(entry.name):
                    if entry.is_dir():
                        found.add(entry.name)
                    else:  # a file (or a dangling link) where the client's directory goes
                        self._ignored(entry.name, "a client's entry must be a directory")
                elif (client := client_of_config(entry.name)) is not None:
                    found.add(client)
                elif entry.name != DEFAULT:
                    self._ignored(entry.name)
        return sorted(found, key=_address_order)

    def _ignored(self, name: str, why: str = "not default/, <ip>/ or <ip>.nbd with the IP in "
                  "its canonical form (e.g. 10.0.0.5, fe80::5)") -> None:
        """Say once that an entry of the source root is not used: an operator's typo
        (`10.0.0.05/`, `10.0.0.5.NBD`, a file `10.0.0.5`) must not fail silently."""
        if name in self._warned:
            return
        self._warned.add(name)
        if len(self._warned) > 10_000:
            self._warned.clear()
        log.warning("source root entry ignored: %s source=%s entry=%r", why, self.root, name)

    def layers(self, client: str) -> list[Layer]:
        """The ordered layers of `client`'s view, highest first."""
        if client == DEFAULT:
            return [self._default]
        layers: list[Layer] = []
        own = self.root / client
        if own.is_dir():  # a symlinked client directory is fine: LocalLayer confines it
            layers.append(LocalLayer("client", own, self.root))
        if self.disks is not None and (disk := self.disks.layer_for(client)) is not None:
            layers.append(disk)
        layers.append(self._default)
        return layers

    def view(self, client: str) -> View:
        return View(client, self.layers(client))


def _address_order(name: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(name)
    return (addr.version, int(addr))
