"""Opening request files in a helper process: what every session of a worker asks.

Every request opens a file, and the open can block (the FUSE tree waits on a disk), so it
cannot run on the event loop.  It used to run in a worker thread of the server; for the small
configs that make up most of a boot, that thread cost more than the rest of the request,
because the thread and the event loop hand the GIL to each other at each of the open's system
calls (tftpd/opener_process.py says how much).  A helper process has its own GIL: here a
request is one ``send``, and each reply goes to its waiter -- a callback
(:meth:`OpenerPool.submit`, how most sessions ask) or a waiting task (:meth:`OpenerPool.open`)
-- several replies per wake-up when requests come in bursts.  In the server the replies are
read from the transfer pump's pass (the ``watcher``), so they share its wake-up.

One helper per worker process, with a pool of threads inside (``--read-threads``): a stuck
open holds one of its threads and nothing else.  Requests carry ids, so a session that stops
waiting (shutdown, the transfer's time limit) simply forgets its id and the late reply is
dropped, its descriptor closed.  Opens in flight are bounded by the server's
``CapacityLimiter`` (the same ``--read-threads``, shared with read-ahead).

A helper that dies (killed by a signal: the OOM killer, an operator) is replaced at once and
the requests it had are sent again, once; a second death under the same request is that
request's read error.  When helpers cannot run -- none can be started (no interpreter, in
an embedding application), or a new one exits with an error before its first answer (a
broken installation) -- :attr:`OpenerPool.available` turns False with one warning, and the
sessions open in worker threads as before, the waiting ones included.
"""

from __future__ import annotations

import array
import errno
import functools
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import outcome
import trio

from . import offload
from .opener_process import (
    FAILED,
    OPENED,
    REFUSED,
    REPLY,
    REPLY_MAX,
    WHOLE,
    encode_request,
)
from .roots import ClientRoots, Opened, OpenedFile, OpenRefused

log = logging.getLogger(__name__)

#: The helper's program: the package's parent first on the path, nothing from site-packages.
_BOOT = ("import sys; sys.path.insert(0, {parent!r}); "
         "from tftpd.opener_process import main; main(sys.argv[1:])")
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)

_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)


#: Replies taken per wake-up before others get a turn (the rest wait for the next one).
_REPLIES_PER_PASS = 32


class Watcher(Protocol):
    """What reads the helper's socket when it is readable: the transfer pump
    (:meth:`tftpd.pump.Pump.watch`)."""

    def watch(self, fd: int, on_readable: Callable[[], object]) -> None: ...

    def unwatch(self, fd: int) -> None: ...


class OpenerUnavailable(Exception):
    """No helper can run here (no interpreter, a broken installation): open in a thread."""


@dataclass(eq=False)
class _Helper:
    """The helper process and the server's end of its socket pair."""

    sock: socket.socket
    proc: subprocess.Popen[bytes]
    #: Replies received: a helper that dies before its first one cannot run here.
    answered: int = 0


class _Waiting:
    """One request waiting for its reply: a session task (:meth:`OpenerPool.open`) or a
    callback (:meth:`OpenerPool.submit`), which then also holds a limiter token until its
    reply is delivered."""

    __slots__ = ("deliver", "request", "path", "sends", "holds_token")

    def __init__(self, deliver: Callable[[outcome.Outcome[Opened]], object], request: bytes,
                 path: str, *, holds_token: bool = False) -> None:
        self.deliver = deliver
        self.request = request
        self.path = path
        self.sends = 1
        self.holds_token = holds_token


class OpenerPool:
    """The helper process that opens (and reads small files whole) for :class:`ClientRoots`.

    :meth:`start` it, run :meth:`run` in a nursery for as long as sessions call :meth:`open`,
    and :meth:`close` it at the end.
    """

    def __init__(self, roots: ClientRoots, limiter: trio.CapacityLimiter, *,
                 watcher: Watcher | None = None) -> None:
        self._roots = roots
        self._limiter = limiter
        self._watcher = watcher
        self._helper: _Helper | None = None
        self._waiting: dict[int, _Waiting] = {}
        self._ids = itertools.count(1)
        #: Requests the helper's socket had no room for (it takes ten at a time): sent when
        #: replies come back, which makes room.
        self._unsent: deque[bytes] = deque()
        self._buf = bytearray(REPLY_MAX)
        self._reap: list[subprocess.Popen[bytes]] = []
        #: False when helpers cannot run: the caller then opens in a worker thread.
        self.available = True
        #: Helpers started so far (the first at :meth:`start`, one more after each death).
        self.spawned = 0

    # -- the helper --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the helper now, so the first request does not wait for an interpreter to
        start (it would not wait long: its request waits in the socket meanwhile)."""
        if self._helper is None and self.available:
            try:
                self._helper = self._spawn()
            except OSError as exc:
                self._give_up(f"cannot start {sys.executable}: {exc.strerror or exc}")

    def _spawn(self) -> _Helper:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # The sender's buffer bounds one message: a whole small file plus the header.
            child.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * REPLY_MAX)
            roots = self._roots
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT.format(parent=_PACKAGE_PARENT),
                 str(child.fileno()), os.fspath(roots.root), "1" if roots.flat else "0",
                 "1" if roots.follow_outside_symlinks else "0",
                 str(self._limiter.total_tokens)],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        self.spawned += 1
        self._reap = [p for p in self._reap if p.poll() is None]
        return _Helper(parent, proc)

    def _give_up(self, why: str) -> None:
        """Helpers cannot run here: say so once; every waiting session and every later one
        opens in a worker thread."""
        if self.available:
            self.available = False
            log.warning("file opener process unavailable (%s): opening files in worker "
                        "threads", why)
        waiting, self._waiting = self._waiting, {}
        self._unsent.clear()
        for w in waiting.values():
            self._complete(w, outcome.Error(OpenerUnavailable(why)))

    def _replace(self, dead: _Helper) -> None:
        """The helper ended: start another and send it what the dead one had, once."""
        dead.sock.close()
        try:
            status = dead.proc.wait(timeout=1.0)  # its socket closed: it is exiting
        except subprocess.TimeoutExpired:
            dead.proc.kill()
            self._reap.append(dead.proc)
            status = None
        self._helper = None
        if not dead.answered and status is not None and status > 0:
            # Exited with an error before its first answer: the interpreter or the package
            # is broken, and every helper would die the same way.
            self._give_up(f"a new one exited with status {status}")
            return
        log.warning("file opener process ended (status %s): starting another, %d requests "
                    "sent again", status, len(self._waiting))
        try:
            self._helper = self._spawn()
        except OSError as exc:
            self._give_up(f"cannot start {sys.executable}: {exc.strerror or exc}")
            return
        self._unsent.clear()
        for ident, w in list(self._waiting.items()):
            if w.sends >= 2:
                del self._waiting[ident]
                self._complete(w, outcome.Error(
                    OSError(errno.EIO, "file opener process exited twice on this file")))
            else:
                w.sends += 1
                self._send(w.request)

    def close(self) -> None:
        """End the helper: it sees its socket close and exits at once (threads stuck in an
        open included)."""
        if self._helper is not None:
            self._helper.sock.close()
            self._reap.append(self._helper.proc)
            self._helper = None
        for proc in self._reap:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap.clear()

    # -- replies -----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Read replies and hand each to its waiter, until cancelled or helpers cannot run.

        With a ``watcher`` (the transfer pump) the helper's socket is read from the pump's
        pass, sharing its wake-up with the requests and ACKs of that moment; this task only
        replaces a helper that ended."""
        task_status.started()
        watcher = self._watcher
        while self.available and self._helper is not None:
            helper = self._helper
            if watcher is None:
                if self._read_replies(helper):
                    await trio.lowlevel.wait_readable(helper.sock)
                    continue
            else:
                fd = helper.sock.fileno()
                gone = trio.Event()

                def on_readable(helper: _Helper = helper, fd: int = fd,
                                gone: trio.Event = gone) -> None:
                    if not self._read_replies(helper):
                        watcher.unwatch(fd)  # at once: its end of file stays readable
                        gone.set()

                watcher.watch(fd, on_readable)
                try:
                    await gone.wait()
                finally:
                    watcher.unwatch(fd)
            self._replace(helper)

    def _read_replies(self, helper: _Helper) -> bool:
        """Take the replies waiting on ``helper``'s socket (at most a pass's worth) and
        deliver them; False once that helper has ended (its socket is at its end)."""
        buf = [self._buf]
        sock = helper.sock
        for _ in range(_REPLIES_PER_PASS):
            try:
                n, ancdata, _flags, _addr = sock.recvmsg_into(buf, _FD_SPACE)
            except BlockingIOError:
                self._flush()
                return True
            except OSError:
                n, ancdata = 0, []
            if n == 0:
                return False
            helper.answered += 1
            self._deliver(n, ancdata)
        return True

    def _deliver(self, n: int, ancdata: list[tuple[int, int, bytes]]) -> None:
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        w = self._waiting.pop(REPLY.unpack_from(self._buf)[0], None) if (
            n >= REPLY.size) else None
        if w is None:  # a session that stopped waiting (or garbage): drop it, leak nothing
            for fd in fds:
                os.close(fd)
            return
        self._complete(w, outcome.capture(self._result, n, fds, w.path))

    def _complete(self, w: _Waiting, result: outcome.Outcome[Opened]) -> None:
        """Hand ``result`` to its waiter; a callback's token goes back first, so the callback
        can start reads of its own.  A callback that raises is a bug in it: logged, and the
        pool goes on with the other replies."""
        if not w.holds_token:
            w.deliver(result)
            return
        self._limiter.release_on_behalf_of(w)
        try:
            w.deliver(result)
        except Exception:
            log.exception("file opener callback failed path=%s", w.path)

    def _result(self, n: int, fds: array.array[int], path: str
                ) -> tuple[OpenedFile, bytes | None]:
        buf = self._buf
        _ident, kind, code, a, b = REPLY.unpack_from(buf)
        if kind == OPENED and len(fds) == 1:
            return OpenedFile(fd=fds[0], size=a, path=path, mtime_ns=b), None
        for fd in fds:  # not expected with any other reply: never leak one
            os.close(fd)
        if kind == WHOLE:
            return OpenedFile(fd=-1, size=a, path=path, mtime_ns=b), bytes(buf[REPLY.size:n])
        message = bytes(buf[REPLY.size:n]).decode("utf-8", "replace")
        if kind == REFUSED:
            raise OpenRefused(code, message)
        if kind == FAILED:
            raise OSError(a, message)
        raise OSError(errno.EIO, f"file opener process sent a bad reply (kind {kind})")

    # -- requests ----------------------------------------------------------------------------------

    def _send(self, request: bytes) -> None:
        if self._unsent or self._helper is None:
            self._unsent.append(request)
            return
        try:
            self._helper.sock.send(request)
        except BlockingIOError:
            self._unsent.append(request)
        except OSError:
            pass  # the helper is gone: run() sees it and sends everything waiting again

    def _flush(self) -> None:
        sock = self._helper.sock if self._helper is not None else None
        unsent = self._unsent
        while unsent and sock is not None:
            try:
                sock.send(unsent[0])
            except BlockingIOError:
                return
            except OSError:
                return  # gone: run() sends everything waiting again
            unsent.popleft()

    async def open(self, client: str, relpath: str,
                   small: int) -> tuple[OpenedFile, bytes | None]:
        """:meth:`ClientRoots.open` for ``client``, plus the file's bytes when it is at most
        ``small`` bytes long (then the returned descriptor is already closed: -1).

        Raises :class:`OpenRefused` like :meth:`ClientRoots.open`, :class:`OSError` when the
        file could not be read or the helper died twice under it, and
        :class:`OpenerUnavailable` when helpers cannot run (then :attr:`available` is False:
        the caller opens in a worker thread, now and from then on).
        """
        if not self.available:
            raise OpenerUnavailable("helpers cannot run here")
        borrower = await offload.borrow(self._limiter)
        try:
            ident = next(self._ids) & 0xFFFFFFFF
            request = encode_request(ident, client, relpath, small)
            self._waiting[ident] = _Waiting(
                functools.partial(trio.lowlevel.reschedule, trio.lowlevel.current_task()),
                request, self._roots.path_of(client, relpath))
            self._send(request)

            def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
                # The reply, whenever it comes, is for nobody: run() drops it.
                self._waiting.pop(ident, None)
                return trio.lowlevel.Abort.SUCCEEDED

            return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]
        finally:
            self._limiter.release_on_behalf_of(borrower)

    def submit(self, client: str, relpath: str, small: int,
               deliver: Callable[[outcome.Outcome[Opened]], object]) -> int | None:
        """:meth:`open` without a task: ``deliver`` is called on the event loop with the
        outcome :meth:`open` would return or raise.  Returns the request's id (for
        :meth:`forget`), or None -- nothing sent, ``deliver`` never called -- when helpers
        cannot run or every ``--read-threads`` token is taken: the caller then waits in a task.

        Why: a session task's wait costs a task switch at each end; for a small file that was
        a large part of the whole request (tftpd/session.py).
        """
        if not self.available:
            return None
        ident = next(self._ids) & 0xFFFFFFFF
        request = encode_request(ident, client, relpath, small)
        w = _Waiting(deliver, request, self._roots.path_of(client, relpath), holds_token=True)
        try:
            self._limiter.acquire_on_behalf_of_nowait(w)
        except trio.WouldBlock:
            return None
        self._waiting[ident] = w
        self._send(request)
        return ident

    def forget(self, ident: int) -> None:
        """The caller of :meth:`submit` stopped waiting (shutdown): its reply, whenever it
        comes, is dropped and its descriptor closed; its token goes back now."""
        w = self._waiting.pop(ident, None)
        if w is not None and w.holds_token:
            self._limiter.release_on_behalf_of(w)
