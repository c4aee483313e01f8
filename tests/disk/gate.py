"""A TCP relay in front of an NBD server that holds every client's handshake until opened.

An appliance launch takes 25-45 s under TCG but a few seconds with KVM: a test that must look
at a disk while it is *attaching* cannot rely on the machine being slow.  Pointing the client's
`.nbd` at this relay makes the attach slow on purpose (qemu-img, making the overlay, waits for
the NBD handshake, as it does behind a hanging server) for exactly as long as the test needs,
with no hook in the daemon; `open()` lets the held connections and all later ones through to
the real server.

The server's greeting is relayed at once, only what the client sends is held: the daemon's
pre-launch probe (it reads the greeting and hangs up) passes, as it does for a real server
that is slow behind its greeting, and the disk stays "attaching" instead of failing the probe.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class AttachGate:
    """Listens on 127.0.0.1; relays to `127.0.0.1:target_port` once `open()` was called."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._open = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        #: connections accepted so far (qemu reached the NBD connect)
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/export"

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in [self.listener, *socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.append(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._track(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            conn.close()
            return
        self._track(upstream)
        threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()
        self._open.wait()
        if self._closed:
            return
        self._pipe(conn, upstream)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
