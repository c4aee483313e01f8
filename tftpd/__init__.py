"""vfsroot-tftpd: a read-only, per-client TFTP server on trio.

Layers, one module each: packets (the tftpy adapter) -> paths (request name -> safe relative
path) -> roots (client IP -> directory, safe open) -> options (negotiation) -> session (one
request: checks, open, OACK) -> pump (the DATA phase of every transfer: one epoll, one timer
heap, UDP GSO windows) driving sender (the sans-IO state machine) and blocks (file -> blocks,
read ahead in worker threads) -> server (listen loop, counters) with limits (admission,
shared by worker processes) -> cli.  ``client`` is our own test/benchmark client.

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
