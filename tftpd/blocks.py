"""The file as a sequence of DATA frames, read ahead by worker threads.

A read on the FUSE tree can block on a disk for seconds, so reads never run on the event loop:
they run in worker threads under the server's ``CapacityLimiter``, in chunks of
max(read-ahead, 32 blocks), the next chunk read while the current one is sent.  A chunk is read
straight into a buffer of wire-ready DATA frames (:mod:`tftpd.frames`), reused for a later
chunk once the client has acknowledged all of it.  The transfer pump asks
:meth:`BlockSource.poll` for a block's frame without waiting; when the block is not read yet,
the source calls its ``on_ready`` callback once it is, and only that transfer waits.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable

import outcome
import trio

from vfsroot.fileio import pread_exact, preadv_exact

from . import offload
from .frames import Frames
from .netascii import encode as netascii_encode


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
        self._enter()
        try:
            data = pread_exact(self._fd, size, offset)
            if self._expect is not None:
                self._check(offset, size, len(data))
            return data
        finally:
            self._leave()

    def readinto_frames(self, frames: Frames, n: int, offset: int) -> int:
        """Read ``n`` blocks at ``offset`` into the payload slots of ``frames``' first ``n``
        frames, unless end of file comes first; returns the bytes read."""
        self._enter()
        try:
            got = preadv_exact(self._fd, frames.slots(n), offset)
            if self._expect is not None:
                self._check(offset, n * frames.blksize, got)
            return got
        finally:
            self._leave()

    def _enter(self) -> None:
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "file handle closed")
            self._busy += 1

    def _leave(self) -> None:
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


class _Chunk:
    """Frames ``first..first+count-1`` of the transfer in a :class:`Frames` buffer; ``end`` is
    where the last one ends (short only for the file's last block)."""

    __slots__ = ("frames", "first", "count", "end", "raw")

    def __init__(self, frames: Frames, first: int, count: int, end: int, raw: int = 0) -> None:
        self.frames = frames
        self.first = first
        self.count = count
        self.end = end
        self.raw = raw  # bytes of the file it came from (netascii makes more of them)

    @property
    def final(self) -> bool:
        """It holds the file's last block: the one frame shorter than the others."""
        return self.end < self.count * self.frames.seg

    @property
    def last(self) -> int:
        return self.first + self.count - 1


class BlockSource:
    """The file as a sequence of DATA frames, read ahead in chunks by worker threads.

    Blocks are requested in increasing order except for retransmissions, which never go below
    the first unacknowledged block.  A chunk is kept while any of its blocks is unacknowledged;
    when a new chunk becomes current, an older one still owed to the client (a window across
    the chunk boundary) has just those frames copied out, so its buffer can take the next
    read: memory per transfer is the chunk being sent, the one being read and at most one
    window.
    """

    # Slots: poll() reads five of these per packet of every transfer.
    __slots__ = (
        "_handle", "_blksize", "_seg", "_chunk", "_per_chunk", "_limiter", "_netascii",
        "_carry", "_cur", "_first", "_count", "_end", "_view", "_old", "_spare", "_next_seq",
        "_raw_off", "_eof", "_keep_seq", "_spawn", "_scope", "_pending", "_next",
        "_next_error", "_closed", "on_ready", "acked", "post",
    )

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
        self._seg = blksize + 4
        self._chunk = chunk_size(read_ahead, blksize, windowsize)
        self._per_chunk = self._chunk // blksize
        self._limiter = limiter
        self._netascii = netascii
        self._carry = b""  # netascii: encoded bytes short of a whole block, for the next chunk
        # The current chunk, its fields copied here for poll()'s hot path.
        self._cur: _Chunk | None = None
        self._first = 1
        self._count = 0
        self._end = 0
        self._view = memoryview(b"")
        self._old: list[_Chunk] = []  # older chunks with blocks still unacknowledged
        self._spare: Frames | None = None  # a buffer whose blocks are all acknowledged
        self._next_seq = 1  # the first block of the next chunk to read
        self._raw_off = 0  # next file offset to read
        self._eof = False  # the chunk holding the last block is read
        self._keep_seq = 1
        self._spawn: Callable[..., object] | None = None
        self._scope: trio.CancelScope | None = None
        self._pending: trio.Event | None = None
        self._next: _Chunk | None = None
        self._next_error: Exception | None = None
        self._closed = False
        #: Called (on the event loop) when a read-ahead finishes: the pump's wake-up.
        self.on_ready: Callable[[], None] | None = None
        #: How a finished read-ahead reaches the event loop (set by the pump: its own
        #: wake-up); None: trio's ``run_sync_soon``.
        self.post: offload.Post | None = None
        #: The highest block acknowledged, asked when a chunk becomes current (instead of a
        #: :meth:`release_before` call per packet).
        self.acked: Callable[[], int] | None = None
        if whole_file is not None:  # read together with the open (small files)
            data = netascii_encode(whole_file) if netascii else whole_file
            chunk = self._copy_in(data, 1, final=True)
            chunk.raw = len(whole_file)
            self._read(chunk)
            self._adopt(chunk)

    def _copy_in(self, data: bytes, first: int, *, final: bool) -> _Chunk:
        """A chunk holding ``data`` from block ``first`` (whole blocks unless ``final``)."""
        frames = Frames(self._blksize, len(data) // self._blksize + 1)
        n = frames.fill(data, first, final=final)
        return _Chunk(frames, first, n, (n - 1) * self._seg + 4 + (
            len(data) - (n - 1) * self._blksize))

    def release_before(self, seq: int) -> None:
        """Blocks before ``seq`` are acknowledged and will not be asked again."""
        self._keep_seq = seq

    def held_bytes(self) -> int:
        """Bytes of frame buffers this transfer holds (for tests and the curious)."""
        chunks = [*self._old, self._cur, self._next]
        held = sum(c.frames.nbytes for c in chunks if c is not None)
        return held + (self._spare.nbytes if self._spare is not None else 0)

    def poll(self, seq: int) -> memoryview | None:
        """The DATA frame of block ``seq`` (header and payload, as sent) if it can be had
        without waiting, else None -- and then a read is in flight and ``on_ready`` will be
        called when it is done (the pump's path).  Raises the read's ``OSError`` if the read
        behind this block failed.  Frames are views of a buffer that is reused once they are
        acknowledged: send one and let it go."""
        i = seq - self._first
        if 0 <= i < self._count:  # the hot path: the current chunk
            o = i * self._seg
            e = o + self._seg
            return self._view[o:e if e <= self._end else self._end]
        while True:
            frame = self.peek(seq)
            if frame is not None:
                return frame
            pending = self._pending
            if pending is None or not pending.is_set():
                self._prefetch()
                return None
            self._take_prefetched()

    def current(self) -> tuple[memoryview, int, int, int]:
        """The current chunk as ``(frames, first, count, end)``: frames of blocks
        ``first..first+count-1`` in the first ``end`` bytes (the compiled lock-step lane
        sends from it).  Its buffer is not recycled before the next :meth:`poll` or
        :meth:`gather` that moves past it."""
        return self._view, self._first, self._count, self._end

    def peek(self, seq: int) -> memoryview | None:
        """The frame of block ``seq`` if it is already read, else None (RuntimeError if it
        was released: acknowledged blocks are never asked again)."""
        c = self._holding(seq)
        if c is None:
            return None
        o = (seq - c.first) * self._seg
        return c.frames.view[o:min(o + self._seg, c.end)]

    def _holding(self, seq: int) -> _Chunk | None:
        """The chunk with block ``seq``; None if it is not read yet."""
        for c in (self._cur, *self._old):
            if c is not None and c.first <= seq <= c.last:
                return c
        if self._cur is not None and seq < self._first:
            raise RuntimeError(f"block {seq} was released before it was acknowledged")
        return None

    async def block(self, seq: int) -> memoryview:
        """Payload of block ``seq`` (1-based); shorter than blksize only for the last block."""
        while True:
            frame = self.peek(seq)
            if frame is not None:
                return frame[4:]
            if self._eof and self._next is None and self._pending is None:
                raise RuntimeError(f"block {seq} is past the end of the file")
            await self._fill()

    def gather(self, first: int, last: int, runs: list[memoryview]) -> tuple[int, bool]:
        """Frames of blocks ``first..last`` -- a window for one ``sendmsg`` -- as far as they
        are read: appended to ``runs`` as few contiguous views as the buffers allow (one,
        unless the window crosses a chunk).  Returns how many frames, and whether the short
        last block of the file is among them (then the last frame).  A block not read yet
        ends the run (``on_ready`` is called when it is)."""
        seg = self._seg
        pending = self._pending
        if (last >= self._first + self._count and pending is not None and pending.is_set()):
            # The window reaches into the next chunk, which is read: make it current before
            # any view is handed out, so the old buffer can take the next read at once.
            self._take_prefetched()
        seq = first
        n = 0
        while seq <= last:
            i = seq - self._first
            if 0 <= i < self._count:
                c_first, c_count, c_end, view = self._first, self._count, self._end, self._view
            else:
                c = self._holding(seq)
                if c is None:
                    pending = self._pending
                    if pending is None or not pending.is_set():
                        self._prefetch()
                        return n, False
                    # Views of the current buffer are in ``runs``: it must not be read into.
                    self._take_prefetched(recycle=not runs)
                    continue
                c_first, c_count, c_end, view = c.first, c.count, c.end, c.frames.view
                i = seq - c_first
            k = min(last - seq + 1, c_count - i)
            o = i * seg
            e = o + k * seg
            if e > c_end:  # the run ends with the file's short last frame
                runs.append(view[o:c_end])
                return n + k, True
            runs.append(view[o:e])
            n += k
            seq += k
        return n, False

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
        self._cur = None
        self._old = []
        self._spare = None
        self._first, self._count, self._end = 1, 0, 0
        self._view = memoryview(b"")
        self._next = None
        self._next_error = None
        self.on_ready = None
        self.acked = None

    # -- reading --------------------------------------------------------------------------

    def _read_chunk(self, frames: Frames | None, first: int, offset: int) -> _Chunk:
        """Read the chunk of blocks from ``first`` at file ``offset`` (in a worker thread)."""
        assert self._handle is not None  # only a source without the whole file reads
        if self._netascii:
            data = self._handle.pread_exact(self._chunk, offset)
            final = len(data) < self._chunk
            stream = self._carry + netascii_encode(data)
            whole = len(stream) if final else len(stream) - len(stream) % self._blksize
            self._carry = b"" if final else stream[whole:]
            chunk = self._copy_in(stream[:whole], first, final=final)
            chunk.raw = len(data)
            return chunk
        if frames is None:
            frames = Frames(self._blksize, self._per_chunk)
        got = self._handle.readinto_frames(frames, self._per_chunk, offset)
        blksize = self._blksize
        if got == self._chunk:
            frames.stamp(first, self._per_chunk)
            return _Chunk(frames, first, self._per_chunk, self._per_chunk * self._seg, got)
        n = got // blksize + 1  # the last block: short, maybe empty
        frames.stamp(first, n)
        return _Chunk(frames, first, n, (n - 1) * self._seg + 4 + got % blksize, got)

    def _prefetch(self) -> None:
        if self._spawn is None or self._eof or self._pending is not None:
            return
        done = trio.Event()
        self._pending = done
        frames, self._spare = self._spare, None
        read = functools.partial(self._read_chunk, frames, self._next_seq, self._raw_off)
        # The common case, a free read thread: no task, no cancel scope, the result handed
        # back by a call on the loop.  When all are busy, a task waits for one.
        if offload.start(read, self._limiter, functools.partial(self._read_done, done),
                         self.post):
            return
        self._scope = trio.CancelScope()
        self._spawn(self._read_ahead, read, done, self._scope)

    def _read_done(self, done: trio.Event, result: outcome.Outcome[_Chunk] | None) -> None:
        """A read-ahead finished (on the event loop): keep its data or its error.  ``None``:
        the read was cancelled, so there is neither."""
        if result is not None:
            try:
                chunk = result.unwrap()
            except Exception as exc:
                if not self._closed:
                    self._next_error = exc  # raised when the data is needed, by the pump
            else:
                if not self._closed:  # a read that finished as the transfer ended: drop it
                    self._read(chunk)
                    self._next = chunk
        done.set()
        if self.on_ready is not None:
            self.on_ready()

    def _read(self, chunk: _Chunk) -> None:
        """``chunk`` is read: the next read starts after it."""
        self._next_seq = chunk.last + 1
        self._raw_off += chunk.raw
        if chunk.final:
            self._eof = True

    async def _read_ahead(self, read: Callable[[], _Chunk], done: trio.Event,
                          scope: trio.CancelScope) -> None:
        """The read-ahead when every read thread was busy: a task waits for one."""
        result: outcome.Outcome[_Chunk] | None = None
        try:
            with scope:
                try:
                    result = outcome.Value(await offload.run_sync(read, self._limiter))
                except Exception as exc:  # must not reach the server's nursery
                    result = outcome.Error(exc)
        finally:
            self._read_done(done, result)

    async def _fill(self) -> None:
        """Make the next chunk current, waiting for its read."""
        if self._spawn is not None:
            self._prefetch()
            assert self._pending is not None
            await self._pending.wait()
            self._take_prefetched()
            return
        frames, self._spare = self._spare, None
        chunk = await offload.run_sync(
            functools.partial(self._read_chunk, frames, self._next_seq, self._raw_off),
            self._limiter)
        self._read(chunk)
        self._adopt(chunk)

    def _take_prefetched(self, *, recycle: bool = True) -> None:
        """Make a finished read-ahead the current chunk and start the next one (into the old
        buffer unless ``recycle`` is False: views of it are still to be sent)."""
        self._pending = None
        if self._next_error is not None:
            error, self._next_error = self._next_error, None
            raise error
        chunk, self._next = self._next, None
        if chunk is not None:  # None: the read was dropped as the transfer ended
            self._adopt(chunk, recycle=recycle)

    def _adopt(self, chunk: _Chunk, *, recycle: bool = True) -> None:
        """``chunk`` becomes current.  Older chunks are let go as far as acknowledged: a
        buffer all acknowledged becomes the spare the next read fills; frames still owed
        (a window across the boundary) are copied out of it first."""
        acked = self._keep_seq - 1
        if self.acked is not None:
            acked = max(acked, self.acked())
        older = self._old
        if self._cur is not None:
            older.append(self._cur)
        kept: list[_Chunk] = []
        seg = self._seg
        for c in older:
            if c.last > acked:
                start = max(c.first, acked + 1)
                o = (start - c.first) * seg
                tail = Frames(self._blksize, c.last - start + 1)
                tail.buf[:c.end - o] = c.frames.view[o:c.end]
                kept.append(_Chunk(tail, start, c.last - start + 1, c.end - o))
            if (recycle and c.frames.count == self._per_chunk and not self._eof
                    and self._spawn is not None):  # a read-ahead will take it now
                self._spare = c.frames
        self._old = kept
        self._cur = chunk
        self._first, self._count, self._end = chunk.first, chunk.count, chunk.end
        self._view = chunk.frames.view
        self._prefetch()
