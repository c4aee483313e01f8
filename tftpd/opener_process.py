"""The file opener's own process: opens (and reads whole) request files away from the GIL.

Why a process and not worker threads of the server: a request's open is about ten system
calls in Python (open, fstat, the inside-check's two ``readlink``\\ s, the read, closes), and
a worker thread gives the GIL up and takes it back at every one of them while the event loop
wants it too.  Measured on the 1 KiB request path, 8 clients, one worker: ~20 context
switches and ~350 µs of CPU per request went into that hand-off, half the server's cost.
Here the GIL is shared only by this process's own threads, and a request costs the server
one message each way on a socket pair.

The open still may block (the FUSE tree waits on a disk).  So ``--read-threads`` threads
each take requests from the socket and answer them: a stuck open holds one thread, and every
other request goes on.  A ``SOCK_SEQPACKET`` message is atomic, so replies never interleave,
and each carries its request's id, so their order does not matter.

This module is the helper's whole program plus the message format both sides share.  It
imports nothing beyond the standard library, :mod:`tftpd.roots` and :mod:`vfsroot.fileio`,
so a helper is a small interpreter (about 13 MiB), not a copy of the server.

Messages (one request, one reply, boundaries kept by the kernel):

- request: ``!II`` id and the largest size to read whole, then ``client NUL relpath``
  (UTF-8 with surrogate escapes: a request name is bytes in the packet).
- reply: ``!IBBqq`` id, kind, TFTP error code, size, mtime_ns, then the payload -- the
  file's bytes (``WHOLE``), nothing with the descriptor in ``SCM_RIGHTS`` (``OPENED``), or a
  message (``REFUSED`` with its TFTP code, ``FAILED`` with an errno in the size's place).
"""

from __future__ import annotations

import array
import errno
import os
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

from tftpd.roots import ClientRoots, OpenRefused
from vfsroot.fileio import read_whole

REQUEST = struct.Struct("!II")
REPLY = struct.Struct("!IBBqq")
#: Reply kinds.
OPENED, WHOLE, REFUSED, FAILED = range(4)
#: Files read whole in the helper are at most this big: the reply is one message on a socket
#: pair whose default send buffer is ~208 KiB on Linux.  Bigger ones come back as a
#: descriptor and are read ahead by the transfer (tftpd/blocks.py) as before.
WHOLE_MAX = 128 * 1024
#: The reply buffer the parent receives into.
REPLY_MAX = REPLY.size + WHOLE_MAX + 1
#: A request: header, an address, a name of at most 64 KiB (a datagram), the separator.
REQUEST_MAX = REQUEST.size + 256 + 65536


def encode_request(ident: int, client: str, relpath: str, small: int) -> bytes:
    return REQUEST.pack(ident, min(small, WHOLE_MAX)) + (f"{client}\0{relpath}").encode(
        "utf-8", "surrogateescape")


def decode_request(data: bytes) -> tuple[int, str, str, int]:
    ident, small = REQUEST.unpack_from(data)
    client, _, relpath = data[REQUEST.size:].decode("utf-8", "surrogateescape").partition("\0")
    return ident, client, relpath, small


def _failed(ident: int, exc: OSError) -> bytes:
    return (REPLY.pack(ident, FAILED, 0, exc.errno or errno.EIO, 0)
            + (exc.strerror or str(exc)).encode("utf-8", "replace"))


def answer(roots: ClientRoots, request: bytes) -> tuple[bytes, int | None]:
    """The reply to one request, and the descriptor to pass with it (the caller closes it
    after sending)."""
    ident, client, relpath, small = decode_request(request)
    try:
        opened = roots.open(client, relpath)
    except OpenRefused as exc:
        return (REPLY.pack(ident, REFUSED, exc.code, 0, 0)
                + str(exc).encode("utf-8", "replace")), None
    except OSError as exc:
        return _failed(ident, exc), None
    head = (opened.size, opened.mtime_ns)
    if opened.size <= small:
        try:
            data = read_whole(opened.fd, opened.size)
        except OSError as exc:
            os.close(opened.fd)
            return _failed(ident, exc), None
        if data is not None:
            os.close(opened.fd)
            return REPLY.pack(ident, WHOLE, 0, *head) + data, None
    return REPLY.pack(ident, OPENED, 0, *head), opened.fd


def _handle(sock: socket.socket, roots: ClientRoots, request: bytes) -> None:
    """One request, in a pool thread: answer it, whatever happens."""
    fd = None
    try:
        try:
            reply, fd = answer(roots, request)
        except Exception as exc:  # a bug: this request fails, the helper goes on
            ident = REQUEST.unpack_from(request)[0] if len(request) >= REQUEST.size else 0
            reply = _failed(ident, OSError(errno.EIO, f"file opener failed: {exc!r}"))
        if fd is None:
            sock.send(reply)
        else:
            sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [fd]))])
    except OSError:
        pass  # the server is gone: the main thread sees the end of the socket and exits
    finally:
        if fd is not None:
            os.close(fd)


def _serve_one_at_a_time(sock: socket.socket, roots: ClientRoots) -> None:
    """One thread's loop: take a request, answer it, until the server closes its end."""
    while True:
        try:
            request = sock.recv(REQUEST_MAX)
        except ConnectionResetError:
            request = b""
        if not request:
            # Now, not after the other threads: one stuck in an open would keep us forever.
            os._exit(0)
        _handle(sock, roots, request)


def serve(sock: socket.socket, roots: ClientRoots, threads: int) -> None:
    """Answer requests on ``threads`` threads until the server closes its end.

    Every thread waits in its own ``recv`` on the one socket: the kernel wakes one waiter
    per message (AF_UNIX receivers wait exclusively), so a request costs one wake-up and no
    hand-off between threads, and a stuck open holds only the thread that took it.
    """
    for _ in range(threads - 1):
        threading.Thread(target=_serve_one_at_a_time, args=(sock, roots), daemon=True).start()
    _serve_one_at_a_time(sock, roots)


def main(argv: list[str]) -> None:
    """``FD ROOT FLAT FOLLOW THREADS``: the socket inherited from the server and the
    :class:`ClientRoots` it serves."""
    # Ctrl-C in a terminal goes to the whole process group: the server decides when we end
    # (it closes its end of the socket), so no second traceback from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, root, flat, follow, threads = argv
    sock = socket.socket(fileno=int(fd))
    roots = ClientRoots(Path(root), flat=flat == "1", follow_outside_symlinks=follow == "1")
    serve(sock, roots, max(1, int(threads)))


if __name__ == "__main__":
    main(sys.argv[1:])
