"""Opening request files in helper processes: the pool every session of a worker asks.

Every request opens a file, and the open can block (the FUSE tree waits on a disk), so it
cannot run on the event loop.  It used to run in a worker thread; for the small configs that
make up most of a boot, that thread cost more than the rest of the request, because the
thread and the event loop hand the GIL to each other at each of the open's system calls
(tftpd/opener_process.py says how much).  Helper processes have their own GIL: a request is
one ``send`` and one ``recvmsg`` here, and the helper's work runs on another CPU.

A helper serves one request at a time.  Idle helpers wait in a list; a request takes one, or
waits for one to come back.  A helper that does not come back soon -- it is stuck on a disk
-- is not waited for: after ``spawn_after`` seconds the request starts another helper, up to
the limiter's size (``--read-threads``, which also bounds read-ahead).  So one client's stuck
open holds back that client only, as a stuck thread did.

A helper whose request was abandoned (the session was cancelled: shutdown, or the transfer's
time limit) is killed: its answer, whenever it comes, would be for nobody, and a process
stuck in a FUSE request ends on SIGKILL.  A helper that died is replaced on the next request;
the request it was serving ends as a read error.  When helpers cannot be started at all
(no interpreter to run, or a new helper dies before its first answer: a broken
installation), :attr:`OpenerPool.available` turns False with one warning and the sessions
open in worker threads as before.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

from .opener_process import (
    FAILED,
    OPENED,
    REFUSED,
    REPLY,
    REPLY_MAX,
    WHOLE,
    encode_request,
)
from .roots import ClientRoots, OpenedFile, OpenRefused

log = logging.getLogger(__name__)

#: How long a request waits for a busy helper before it starts one more.  Opens take ~0.1 ms,
#: so a helper busy for this long is stuck on its disk, not merely busy.
SPAWN_AFTER = 0.05

#: The helper's program: the package's parent first on the path, nothing from site-packages.
_BOOT = ("import sys; sys.path.insert(0, {parent!r}); "
         "from tftpd.opener_process import main; main(sys.argv[1:])")
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)

_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)


@dataclass(eq=False)
class _Helper:
    """One helper process and the parent's end of its socket pair."""

    sock: socket.socket
    proc: subprocess.Popen[bytes]
    #: Requests answered: a helper that dies before its first answer cannot run here.
    answered: int = 0


class OpenerUnavailable(Exception):
    """No helper can run here (no interpreter, a broken installation): open in a thread."""


class _Borrower:
    """One open's claim on the limiter (a fresh object: the limiter tracks who holds what)."""

    __slots__ = ()


class OpenerPool:
    """Helper processes that open (and read small files whole) for :class:`ClientRoots`."""

    def __init__(self, roots: ClientRoots, limiter: trio.CapacityLimiter,
                 spawn_after: float = SPAWN_AFTER) -> None:
        self._roots = roots
        self._limiter = limiter
        self._spawn_after = spawn_after
        self._idle: list[_Helper] = []
        self._live = 0
        self._returned = trio.lowlevel.ParkingLot()
        self._reap: list[subprocess.Popen[bytes]] = []
        self._buf = bytearray(REPLY_MAX)
        #: False when helpers cannot be started: the caller then opens in a worker thread.
        self.available = True
        #: Helpers started so far (the first at :meth:`start`, more when one is stuck or died).
        self.spawned = 0

    # -- helpers ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the first helper now, so the first request does not wait for an interpreter
        to start (it does not wait anyway: its request waits in the socket meanwhile)."""
        if not self._idle and not self._live:
            with contextlib.suppress(OpenerUnavailable):  # _spawn said so in the log
                self._idle.append(self._spawn())

    def _give_up(self, why: str) -> OpenerUnavailable:
        """Helpers cannot run here: say so once; from now on the sessions open in threads."""
        if self.available:
            self.available = False
            log.warning("file opener processes unavailable (%s): opening files in worker "
                        "threads", why)
        return OpenerUnavailable(why)

    def _spawn(self) -> _Helper:
        try:
            return self._start_helper()
        except OSError as exc:
            raise self._give_up(f"cannot start {sys.executable}: {exc.strerror or exc}"
                                ) from None

    def _start_helper(self) -> _Helper:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # The sender's buffer bounds one message: a whole small file plus the header.
            child.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * REPLY_MAX)
            roots = self._roots
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT.format(parent=_PACKAGE_PARENT),
                 str(child.fileno()), os.fspath(roots.root), "1" if roots.flat else "0",
                 "1" if roots.follow_outside_symlinks else "0"],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        self._live += 1
        self.spawned += 1
        self._reap_exited()
        return _Helper(parent, proc)

    def _discard(self, helper: _Helper) -> None:
        """Kill a helper whose state we no longer know (abandoned, broken); reaped later."""
        helper.sock.close()
        self._live -= 1
        if helper.proc.poll() is None:
            helper.proc.kill()
            self._reap.append(helper.proc)

    def _reap_exited(self) -> None:
        self._reap = [p for p in self._reap if p.poll() is None]

    async def _checkout(self) -> _Helper:
        """An idle helper; a new one when none is idle (none yet, or the busy ones have been
        busy for ``spawn_after``: stuck)."""
        while not self._idle:
            if self._live == 0:
                return self._spawn()
            with trio.move_on_after(self._spawn_after):
                await self._returned.park()
                continue
            if not self._idle:
                # The limiter bounds helpers in use; killed ones no longer count.
                return self._spawn()
        return self._idle.pop()

    def _checkin(self, helper: _Helper) -> None:
        self._idle.append(helper)
        self._returned.unpark()

    def close(self) -> None:
        """End every helper: idle ones see their socket close and exit; busy ones are
        killed (nobody waits for them any more)."""
        for helper in self._idle:
            helper.sock.close()
            self._reap.append(helper.proc)
        self._idle.clear()
        for proc in self._reap:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap.clear()

    # -- the call ----------------------------------------------------------------------------------

    async def open(self, client: str, relpath: str,
                   small: int) -> tuple[OpenedFile, bytes | None]:
        """:meth:`ClientRoots.open` for ``client``, plus the file's bytes when it is at most
        ``small`` bytes long (then the returned descriptor is already closed: -1).

        Raises :class:`OpenRefused` like :meth:`ClientRoots.open`, :class:`OSError` when
        the file could not be read or helpers died twice in a row, and
        :class:`OpenerUnavailable` when helpers cannot run at all (then :attr:`available`
        is False: the caller opens in a worker thread, now and from then on).
        """
        borrower = _Borrower()
        try:
            self._limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self._limiter.acquire_on_behalf_of(borrower)
        request = encode_request(client, relpath, small)
        try:
            # A helper found dead (killed while idle: the OOM killer, an operator) gets one
            # fresh replacement; a second death in a row is this request's read error.
            for attempt in (1, 2):
                helper = await self._checkout()
                try:
                    reply = await self._ask(helper, request)
                except BaseException:
                    self._discard(helper)
                    raise
                if reply is not None:
                    helper.answered += 1
                    self._checkin(helper)
                    break
                status = _exit_status(helper.proc)
                self._discard(helper)
                if not helper.answered and status is not None and status > 0:
                    # Exited with an error before its first answer: the interpreter or the
                    # package is broken, and every helper would die the same way.  (One
                    # killed by a signal -- the OOM killer, an operator -- is just replaced.)
                    raise self._give_up(f"a new one exited with status {status}")
                if attempt == 2:
                    raise OSError(errno.EIO, "file opener process exited")
        finally:
            self._limiter.release_on_behalf_of(borrower)
        return self._reply(*reply, self._roots.path_of(client, relpath))

    async def _ask(self, helper: _Helper,
                   request: bytes) -> tuple[int, list[tuple[int, int, bytes]]] | None:
        """Send one request and wait for its reply; None if the helper is gone."""
        sock = helper.sock
        try:
            sock.send(request)
            while True:
                try:
                    n, ancdata, _flags, _addr = sock.recvmsg_into([self._buf], _FD_SPACE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                break
        except (BrokenPipeError, ConnectionResetError):
            return None
        return (n, ancdata) if n else None

    def _reply(self, n: int, ancdata: list[tuple[int, int, bytes]],
               path: str) -> tuple[OpenedFile, bytes | None]:
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        buf = self._buf
        kind, code, a, b = REPLY.unpack_from(buf) if n >= REPLY.size else (-1, 0, 0, 0)
        if kind == OPENED and len(fds) == 1:
            return OpenedFile(fd=fds[0], size=a, path=path, mtime_ns=b), None
        for fd in fds:  # not expected with any other reply: never leak one
            os.close(fd)
        message = bytes(buf[REPLY.size:n]).decode("utf-8", "replace")
        if kind == WHOLE:
            return OpenedFile(fd=-1, size=a, path=path, mtime_ns=b), bytes(buf[REPLY.size:n])
        if kind == REFUSED:
            raise OpenRefused(code, message)
        if kind == FAILED:
            raise OSError(a, message)
        raise OSError(errno.EIO, f"file opener process sent a bad reply (kind {kind})")



def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """The exit status of a helper whose socket just closed (it is exiting: wait a moment
    for it), None if it has not ended after all."""
    try:
        return proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        return None
