"""The file as a sequence of DATA payloads, read ahead by worker threads.

A read on the FUSE tree can block on a disk for seconds, so reads never run on the event loop:
they run in worker threads under the server's ``CapacityLimiter``, in chunks of
max(read-ahead, 32 blocks), the next chunk read while the current one is sent.  The transfer
pump asks :meth:`BlockSource.poll` for a block without waiting; when the block is not read
yet, the source calls its ``on_ready`` callback once it is, and only that transfer waits.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable

import outcome
import trio

from vfsroot.fileio import pread_exact

from . import offload
from .netascii import encode as netascii_encode
from .packets import OP_DATA as _OP_DATA
from .packets import pack_header as _pack_header


class FileChanged(OSError):
    """The file is not the one the transfer started with: it ended before or after its size at
    open, or its size or mtime differ at the end.  The transfer must end with an ERROR: a
    short last block would look like a normal end to the client, with the wrong bytes."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.ESTALE, f"file changed during the transfer ({what})")


class FileHandle:
    """A descriptor that worker threads read while the event loop may want to close it.

    A read on the FUSE tree can hang on a disk; the session then gives up waiting (the thread is
    abandoned on cancellation) and closes the handle.  Closing while a thread is inside
    ``pread`` would let the fd number be reused under it, so the close is deferred to the last
    reader.

    With ``expect`` (size, st_mtime_ns at open) every read is checked against the file the
    transfer started with (`FileChanged`): an operator may truncate or rewrite a file in the
    source root while it is sent, and over the vfsroot mount even a file renamed over the
    path shows its new size to the open descriptor (the path keeps its inode number there),
    so the kernel cuts reads at the new size.
    """

    def __init__(self, fd: int, expect: tuple[int, int] | None = None) -> None:
        self._fd = fd
        self._expect = expect
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False

    def pread_exact(self, size: int, offset: int) -> bytes:
        """Read ``size`` bytes at ``offset`` unless end of file comes first (FUSE and network
        filesystems return short reads mid-file, so one ``pread`` is not enough)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "file handle closed")
            self._busy += 1
        try:
            data = pread_exact(self._fd, size, offset)
            if self._expect is not None:
                self._check(offset, size, len(data))
            return data
        finally:
            with self._lock:
                self._busy -= 1
                if self._closed and self._busy == 0:
                    os.close(self._fd)

    def _check(self, offset: int, asked: int, got: int) -> None:
        assert self._expect is not None
        open_size, mtime_ns = self._expect
        end = offset + got
        if end > open_size:
            raise FileChanged(f"{open_size} bytes at open, more now")
        if got < asked and end < open_size:
            raise FileChanged(f"{open_size} bytes at open, ends at {end} now")
        if got < asked:  # end of file: the last chance to see a change of the same size
            st = os.fstat(self._fd)
            if (st.st_size, st.st_mtime_ns) != (open_size, mtime_ns):
                raise FileChanged(f"{open_size} bytes at open, {st.st_size} now, "
                                  "modified since")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._busy == 0:
                os.close(self._fd)


def chunk_size(read_ahead: int, blksize: int, windowsize: int = 1) -> int:
    """Bytes per worker-thread read: the operator's read-ahead, but at least 32 blocks, and a
    whole number of blocks -- of windows when that shortens it by at most an eighth.

    Whole blocks (windows): when the first block of the next chunk is due, every block of
    the current one has been acknowledged (windows start at whole windows while no packet
    is lost), so the new chunk becomes the buffer as it is.  A chunk ending mid-block
    (mid-window) kept that block's head (the window in flight) and copied the whole new
    chunk behind it: 256 KiB per chunk, 8 % of a lock-step transfer's time."""
    size = max(read_ahead, 32 * blksize)
    window = blksize * windowsize
    # Whole windows only where that costs at most an eighth of the chunk: a much shorter
    # chunk (windowsize 64 @1428: 2 windows, 30 % less) is more thread hops per MB.
    unit = window if size % window <= size // 8 else blksize
    return size - size % unit


class BlockSource:
    """The file as a sequence of blocks, read ahead in chunks by worker threads.

    Blocks are requested in increasing order except for retransmissions, which never go below
    ``keep_from`` (the first unacknowledged block): only ``[keep_from, read end)`` is kept.
    """

    def __init__(
        self,
        handle: FileHandle | None,
        blksize: int,
        read_ahead: int,
        limiter: trio.CapacityLimiter,
        *,
        netascii: bool = False,
        whole_file: bytes | None = None,
        windowsize: int = 1,
    ) -> None:
        if handle is None and whole_file is None:
            raise ValueError("a BlockSource needs a file handle unless it has the whole file")
        self._handle = handle
        self._blksize = blksize
        self._chunk = chunk_size(read_ahead, blksize, windowsize)
        self._limiter = limiter
        self._netascii = netascii
        self._buf = b""
        #: ``self._buf`` as a memoryview: blocks are handed out as views of it, not copies
        #: (a block is sent at once, so nobody holds a view of an old chunk for long).
        self._view = memoryview(self._buf)
        self._buf_off = 0  # stream offset of self._buf[0]
        self._raw_off = 0  # next file offset to read
        self._eof = False
        self._keep_off = 0
        self._spawn: Callable[..., object] | None = None
        self._scope: trio.CancelScope | None = None
        self._pending: trio.Event | None = None
        self._next: bytes | None = None
        self._next_error: Exception | None = None
        self._closed = False
        #: Called (on the event loop) when a read-ahead finishes: the pump's wake-up.
        self.on_ready: Callable[[], None] | None = None
        #: The highest block acknowledged, asked when a chunk is appended (instead of a
        #: :meth:`release_before` call per packet).
        self.acked: Callable[[], int] | None = None
        if whole_file is not None:  # read together with the open (small files)
            self._buf = netascii_encode(whole_file) if netascii else whole_file
            self._view = memoryview(self._buf)
            self._raw_off = len(whole_file)
            self._eof = True

    def _pread(self, size: int, offset: int) -> bytes:
        assert self._handle is not None  # only a source without the whole file reads
        return self._handle.pread_exact(size, offset)

    def release_before(self, seq: int) -> None:
        """Blocks before ``seq`` are acknowledged and will not be asked again."""
        self._keep_off = (seq - 1) * self._blksize

    def peek(self, seq: int) -> memoryview | None:
        """Block ``seq`` if it is already read (the hot path: no coroutine), else None.
        Blocks are views of the buffer: one kept pins its whole chunk in memory, so send it
        and let it go."""
        start = (seq - 1) * self._blksize
        i = start - self._buf_off
        if i < 0:
            return None
        end = i + self._blksize
        if end <= len(self._buf) or self._eof:
            return self._view[i:end]
        return None

    async def block(self, seq: int) -> memoryview:
        """Payload of block ``seq`` (1-based); shorter than blksize only for the last block."""
        start = (seq - 1) * self._blksize
        end = start + self._blksize
        while self._buf_off + len(self._buf) < end and not self._eof:
            await self._fill(end)
        i = start - self._buf_off
        if i < 0:
            raise RuntimeError(f"block {seq} was released before it was acknowledged")
        return self._view[i : i + self._blksize]

    def start_prefetch(self, spawn: Callable[..., object]) -> None:
        """Read the next chunk in the background from now on (double buffering): a thread hop
        costs a millisecond on a busy machine, which is 32 packets of 8 KiB that would otherwise
        wait for it.  Memory: one more chunk per session.

        ``spawn`` starts a task elsewhere (the server's session nursery), so an exception in
        the session never gets wrapped in an exception group by a nursery of its own.
        """
        self._spawn = spawn
        self._prefetch()

    def close(self) -> None:
        """Stop a read-ahead still in flight and drop the buffers (the transfer is over).

        The buffers go now, not when the last reference to the source does: a finished
        transfer can stay referenced for a while (a retransmission timer entry in the pump's
        heap lives until its deadline, which a client's ``timeout`` option can put minutes
        away), and up to two read-ahead chunks per transfer must not wait for that."""
        self._spawn = None
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        self._buf = b""
        self._view = memoryview(self._buf)
        self._next = None
        self._next_error = None
        self.on_ready = None
        self.acked = None

    def _prefetch(self) -> None:
        if self._spawn is None or self._eof or self._pending is not None:
            return
        done = trio.Event()
        self._pending = done
        read = functools.partial(self._pread, self._chunk, self._raw_off)
        # The common case, a free read thread: no task, no cancel scope, the result handed
        # back by a call on the loop.  When all are busy, a task waits for one.
        if offload.start(read, self._limiter, functools.partial(self._read_done, done)):
            return
        self._scope = trio.CancelScope()
        self._spawn(self._read_ahead, read, done, self._scope)

    def _read_done(self, done: trio.Event, result: outcome.Outcome[bytes] | None) -> None:
        """A read-ahead finished (on the event loop): keep its data or its error.  ``None``:
        the read was cancelled, so there is neither."""
        if result is not None:
            try:
                data = result.unwrap()
            except Exception as exc:
                if not self._closed:
                    self._next_error = exc  # raised when the data is needed, by the pump
            else:
                if not self._closed:  # a read that finished as the transfer ended: drop it
                    self._next = data
        done.set()
        if self.on_ready is not None:
            self.on_ready()

    async def _read_ahead(self, read: Callable[[], bytes], done: trio.Event,
                          scope: trio.CancelScope) -> None:
        """The read-ahead when every read thread was busy: a task waits for one."""
        result: outcome.Outcome[bytes] | None = None
        try:
            with scope:
                try:
                    result = outcome.Value(await offload.run_sync(read, self._limiter))
                except Exception as exc:  # must not reach the server's nursery
                    result = outcome.Error(exc)
        finally:
            self._read_done(done, result)

    def poll(self, seq: int) -> memoryview | None:
        """Block ``seq`` if it can be had without waiting, else None -- and then a read is in
        flight and ``on_ready`` will be called when it is done (the pump's path).  Raises the
        read's ``OSError`` if the read behind this block failed."""
        i = (seq - 1) * self._blksize - self._buf_off
        if i >= 0:  # the hot path, inlined peek()
            end = i + self._blksize
            if end <= len(self._buf) or self._eof:
                return self._view[i:end]
        data = self.peek(seq)
        while data is None:
            pending = self._pending
            if pending is None or not pending.is_set():
                self._prefetch()
                return None
            self._take_prefetched()
            data = self.peek(seq)
        return data

    def gather(self, first: int, last: int, parts: list[bytes | memoryview]) -> bool:
        """Append ``header, payload`` of blocks ``first..last`` to ``parts`` -- a window for
        one ``sendmsg`` -- as far as they are read, like :meth:`poll` for each block but
        with one call per window: the payloads are views of the buffer.  Returns True if the
        short last block of the file is among them (it is then the last one appended).
        A block not read yet ends the run (``on_ready`` is called when it is)."""
        blksize = self._blksize
        header = _pack_header
        seq = first
        while seq <= last:
            i = (seq - 1) * blksize - self._buf_off
            end = i + blksize
            size = len(self._buf)
            if i < 0 or (end > size and not self._eof):  # another chunk: poll's way
                data = self.poll(seq)
                if data is None:
                    return False
                parts.append(header(_OP_DATA, seq & 0xFFFF))
                parts.append(data)
                if len(data) < blksize:
                    return True
                seq += 1
                continue
            view = self._view
            while True:  # blocks inside this buffer
                parts.append(header(_OP_DATA, seq & 0xFFFF))
                parts.append(view[i:end])
                if end > size:  # the end of the file: this block is short (maybe empty)
                    return True
                seq += 1
                if seq > last:
                    return False
                i = end
                end += blksize
                if end > size and not self._eof:
                    break
        return False

    async def _fill(self, end: int) -> None:
        if self._spawn is not None:
            self._prefetch()
            assert self._pending is not None
            await self._pending.wait()
            self._take_prefetched()
            return
        want = max(self._chunk, end - (self._buf_off + len(self._buf)))
        data = await offload.run_sync(
            functools.partial(self._pread, want, self._raw_off), self._limiter)
        self._append(data, want)

    def _take_prefetched(self) -> None:
        """Move a finished read-ahead into the buffer and start the next one."""
        self._pending = None
        if self._next_error is not None:
            error, self._next_error = self._next_error, None
            raise error
        data, self._next = self._next or b"", None
        self._append(data, self._chunk)

    def _append(self, data: bytes, want: int) -> None:
        if self.acked is not None:
            self.release_before(self.acked() + 1)
        self._raw_off += len(data)
        if len(data) < want:
            self._eof = True
        self._prefetch()
        if self._netascii:
            data = netascii_encode(data)
        drop = max(0, min(self._keep_off, self._buf_off + len(self._buf)) - self._buf_off)
        self._buf = self._buf[drop:] + data if drop or self._buf else data
        self._view = memoryview(self._buf)
        self._buf_off += drop
