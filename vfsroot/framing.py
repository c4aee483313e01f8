"""Frames on the pipe between the daemon and a guestfs worker: the one encoder and decoder.

A frame is a 4-byte big-endian length and a pickle.  Both ends are this package over a private
pipe, so pickle is fine.  The decoder is sans-IO (fed bytes, it hands out whole values), so
the blocking worker and the trio side read with the same code: each only moves bytes.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

_HEAD = struct.Struct(">I")
#: A reply larger than this is a bug, not data (preads are 4 MiB at most).
MAX_FRAME = 64 * 1024 * 1024


class FrameError(EOFError):
    """The stream ended inside a frame, or announced an impossible length."""


def encode(value: Any) -> bytes:
    """One frame carrying `value`."""
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(body)) + body


class FrameDecoder:
    """Sans-IO: `feed()` bytes as they arrive, get back every value now whole.  Each end only
    moves bytes (the worker with blocking reads, the daemon with trio's `receive_some`)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ready: list[Any] = []

    def feed(self, data: bytes) -> None:
        """Add received bytes; an empty `data` is the end of the stream."""
        if not data:
            if self._buf:
                raise FrameError("stream ended inside a frame")
            raise EOFError("stream closed")
        self._buf += data
        while len(self._buf) >= _HEAD.size:
            (length,) = _HEAD.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise FrameError(f"frame of {length} bytes announced")
            if len(self._buf) < _HEAD.size + length:
                break
            body = bytes(self._buf[_HEAD.size:_HEAD.size + length])
            del self._buf[:_HEAD.size + length]
            self._ready.append(pickle.loads(body))

    def pop(self) -> Any:
        """The oldest whole value; IndexError when none is whole yet."""
        return self._ready.pop(0)

    def __bool__(self) -> bool:
        return bool(self._ready)
