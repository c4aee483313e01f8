"""The file opener's own process: opens (and reads whole) request files away from the GIL.

Why a process and not a worker thread: a request's open is about ten system calls in Python
(open, fstat, the inside-check's two ``readlink``\\ s, the read, closes), and a worker thread
gives the GIL up and takes it back at every one of them while the event loop wants it too.
Measured on the 1 KiB request path, 8 clients: ~22 context switches and ~350 µs of CPU per
request went into that hand-off, half the server's cost.  A helper process holds its own GIL:
a request costs one message each way on a socket pair.

The open still may block (the FUSE tree waits on a disk): that blocks this process only, and
the pool (:mod:`tftpd.opener`) sends other requests to other helpers.

This module is the helper's whole program plus the message format both sides share.  It
imports nothing beyond the standard library and :mod:`tftpd.roots`, so a helper is a small
interpreter (about 10 MiB), not a copy of the server.

Messages (``SOCK_SEQPACKET``: one request, one reply, boundaries kept by the kernel):

- request: ``!I`` the largest size to read whole, then ``client NUL relpath`` (UTF-8 with
  surrogate escapes: a request name is bytes in the packet).
- reply: ``!BBqq`` kind, TFTP error code, size, mtime_ns, then the payload -- the file's bytes
  (``WHOLE``), nothing with the descriptor in ``SCM_RIGHTS`` (``OPENED``), or a message
  (``REFUSED`` with its TFTP code, ``FAILED`` with an errno in the code field's place).
"""

from __future__ import annotations

import array
import errno
import os
import signal
import socket
import struct
import sys
from pathlib import Path

from tftpd.roots import ClientRoots, OpenRefused

REQUEST = struct.Struct("!I")
REPLY = struct.Struct("!BBqq")
#: Reply kinds.
OPENED, WHOLE, REFUSED, FAILED = range(4)
#: Files read whole in the helper are at most this big: the reply is one datagram on a
#: socket pair whose default send buffer is ~208 KiB on Linux.  Bigger ones come back as a
#: descriptor and are read ahead by the transfer (tftpd/blocks.py) as before.
WHOLE_MAX = 128 * 1024
#: The reply buffer the parent receives into.
REPLY_MAX = REPLY.size + WHOLE_MAX + 1


def encode_request(client: str, relpath: str, small: int) -> bytes:
    return REQUEST.pack(min(small, WHOLE_MAX)) + (f"{client}\0{relpath}").encode(
        "utf-8", "surrogateescape")


def decode_request(data: bytes) -> tuple[str, str, int]:
    (small,) = REQUEST.unpack_from(data)
    client, _, relpath = data[REQUEST.size:].decode("utf-8", "surrogateescape").partition("\0")
    return client, relpath, small


def _read_whole(fd: int, size: int) -> bytes | None:
    """The whole file if it still is ``size`` bytes long (see FileHandle.read_whole)."""
    data = os.pread(fd, size + 1, 0)
    while len(data) < size + 1:  # a short read mid-file (FUSE): go on until end of file
        more = os.pread(fd, size + 1 - len(data), len(data))
        if not more:
            break
        data += more
    return data if len(data) == size else None


def answer(roots: ClientRoots, request: bytes) -> tuple[bytes, int | None]:
    """The reply to one request, and the descriptor to pass with it (the caller closes it
    after sending)."""
    client, relpath, small = decode_request(request)
    try:
        opened = roots.open(client, relpath)
    except OpenRefused as exc:
        return REPLY.pack(REFUSED, exc.code, 0, 0) + str(exc).encode("utf-8", "replace"), None
    except OSError as exc:
        return (REPLY.pack(FAILED, 0, exc.errno or errno.EIO, 0)
                + (exc.strerror or str(exc)).encode("utf-8", "replace")), None
    head = (opened.size, opened.mtime_ns)
    if opened.size <= small:
        try:
            data = _read_whole(opened.fd, opened.size)
        except OSError as exc:
            os.close(opened.fd)
            return (REPLY.pack(FAILED, 0, exc.errno or errno.EIO, 0)
                    + (exc.strerror or str(exc)).encode("utf-8", "replace")), None
        if data is not None:
            os.close(opened.fd)
            return REPLY.pack(WHOLE, 0, *head) + data, None
    return REPLY.pack(OPENED, 0, *head), opened.fd


def serve(sock: socket.socket, roots: ClientRoots) -> None:
    """Answer requests until the parent closes its end."""
    fds = array.array("i", [0])
    while True:
        try:
            request = sock.recv(REQUEST.size + 65536)
        except ConnectionResetError:
            return
        if not request:
            return
        reply, fd = answer(roots, request)
        try:
            if fd is None:
                sock.send(reply)
            else:
                fds[0] = fd
                sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            if fd is not None:
                os.close(fd)


def main(argv: list[str]) -> None:
    """``FD ROOT FLAT FOLLOW``: the socket inherited from the parent and the ClientRoots."""
    # Ctrl-C in a terminal goes to the whole process group: the server decides when we end
    # (it closes its end of the socket), so no second traceback from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, root, flat, follow = argv
    sock = socket.socket(fileno=int(fd))
    roots = ClientRoots(Path(root), flat=flat == "1", follow_outside_symlinks=follow == "1")
    serve(sock, roots)


if __name__ == "__main__":
    main(sys.argv[1:])
