"""DATA packets laid out in one buffer as they go on the wire: header, payload, header, ...

A transfer's read-ahead chunk is read straight into the payload slots of such a buffer
(``preadv``, one iovec per block), and the 4-byte headers are written around them once per
chunk.  A lock-step block is then one ``send`` of a slice of the buffer, and a window one
``sendmsg`` (UDP GSO) of one contiguous slice, where before every packet was built in Python
(``pack`` of the header, then a 1.4 KiB join into a new object: an allocation, a copy, and
for 256 KiB chunks the page faults of a fresh ``mmap`` each time).  The buffer is reused for
the transfer's next chunk once every block in it is acknowledged, so a 16 MiB lock-step
transfer faults in two buffers, not 64.

A buffer is filled in a worker thread and read on the event loop, never both at once: the
block source hands a buffer to a read only when nothing in it is still owed to the client.
"""

from __future__ import annotations

from .packets import OP_DATA

#: ``seq & 0xFF`` for 256 consecutive block numbers from 0.
_LOW = bytes(range(256))


class Frames:
    """Room for ``count`` DATA frames of ``blksize`` payload bytes each."""

    __slots__ = ("blksize", "seg", "count", "buf", "view")

    def __init__(self, blksize: int, count: int) -> None:
        if count < 1:
            raise ValueError(f"a frame buffer holds at least one frame, not {count}")
        self.blksize = blksize
        self.seg = seg = blksize + 4
        self.count = count
        self.buf = bytearray(seg * count)
        self.view = memoryview(self.buf)
        # The opcode is the same in every frame and nothing but stamp() writes a header.
        self.buf[1::seg] = bytes([OP_DATA]) * count

    @property
    def nbytes(self) -> int:
        return len(self.buf)

    def slots(self, n: int) -> list[memoryview]:
        """The payload slots of frames ``0..n-1``: the iovecs of a ``preadv``.  Made per read
        (in the reading thread), not kept: a view object per block would add a third to a
        buffer's memory at blksize 512."""
        view, seg = self.view, self.seg
        return [view[i * seg + 4:(i + 1) * seg] for i in range(n)]

    def stamp(self, first: int, n: int) -> None:
        """Number frames ``0..n-1`` as blocks ``first..first+n-1`` (the wire form wraps at
        65536).  Slice assignments, not a loop per frame: a 256 KiB chunk is 183 frames."""
        seg = self.seg
        end = n * seg
        lo = first & 0xFF
        self.buf[3:end:seg] = (_LOW * ((lo + n) // 256 + 1))[lo:lo + n]
        high = bytearray()
        seq, stop = first, first + n
        while seq < stop:  # one run per 256 blocks
            run_end = min((seq | 0xFF) + 1, stop)
            high += bytes([(seq >> 8) & 0xFF]) * (run_end - seq)
            seq = run_end
        self.buf[2:end:seg] = high

    def fill(self, data: bytes | memoryview, first: int, *, final: bool) -> int:
        """Copy ``data`` into frames from frame 0 (``first`` is its block number) and stamp
        them; returns the frames used.  For data that cannot be read in place (netascii, a
        small file read together with its open).  ``final``: ``data`` ends the file, so
        its last frame is the short one -- empty when the file is whole blocks; otherwise
        ``data`` must be whole blocks."""
        blksize = self.blksize
        n, rest = divmod(len(data), blksize)
        if final:
            n += 1
        elif rest:
            raise ValueError(f"{len(data)} bytes are not whole blocks of {blksize}")
        if n > self.count:
            raise ValueError(f"{len(data)} bytes do not fit {self.count} frames")
        view, seg = self.view, self.seg
        for i in range(n):
            chunk = data[i * blksize:(i + 1) * blksize]
            view[i * seg + 4:i * seg + 4 + len(chunk)] = chunk
        self.stamp(first, n)
        return n
