"""vfsroot-tftpd: a read-only, per-client TFTP server on trio.

Layers, one module each: packets (the tftpy adapter) -> paths (request name -> safe relative
path) -> roots (client IP -> directory, safe open) -> session (one transfer) -> server (listen
loop, limits, counters) -> cli.  ``client`` is our own test/benchmark client.

Embedding: ``await nursery.start(tftpd.serve, tftpd.ServerConfig(root=..., listen=...))``.
"""

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
