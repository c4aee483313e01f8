"""vfsroot-tftpd: a read-only, per-client TFTP server on trio.

Layers, one module each: packets (the tftpy adapter) -> paths (request name -> safe relative
path) -> roots (client IP -> directory, safe open) -> options (negotiation) -> session (one
request: checks, open, OACK) using opener (the open, in a helper process: opener_process)
-> pump (the DATA phase of every transfer: one epoll, one timer
heap, UDP GSO windows) driving sender (the sans-IO state machine) and blocks (file -> blocks,
read ahead in worker threads) -> server (listen loop, counters) with limits (admission,
shared by worker processes) -> cli.  ``client`` is our own test/benchmark client.

Embedding: ``await nursery.start(tftpd.serve, tftpd.ServerConfig(root=..., listen=...))``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import ListenSpec, ServerConfig, ServerStats, TftpServer, parse_listen, serve
    from .session import TransferPolicy

__all__ = [
    "ListenSpec",
    "ServerConfig",
    "ServerStats",
    "TftpServer",
    "TransferPolicy",
    "parse_listen",
    "serve",
]

#: Where each export lives.  Imported on first use, not with the package: the file opener's
#: helper process (tftpd/opener_process.py) imports ``tftpd.roots`` only and must not pay
#: for trio and the server in every helper.
_HOMES = {name: "server" for name in __all__} | {"TransferPolicy": "session"}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tftpd' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
