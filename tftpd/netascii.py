"""RFC 764 NVT ("netascii") encoding for the rare client that asks for it (RFC 1350 mode).

Stateless per byte (CR -> CR NUL first, then LF -> CR LF), so it is applied chunk by chunk as
the file is read, and the converted size (the ``tsize`` a netascii client must see) is a count
of CR and LF bytes.
"""

from __future__ import annotations

from collections.abc import Callable


def encode(data: bytes) -> bytes:
    """``data`` in netascii: CR -> CR NUL, then LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def encoded_len(data: bytes) -> int:
    """``len(encode(data))`` without encoding."""
    return len(data) + data.count(b"\n") + data.count(b"\r")


def encoded_size(pread: Callable[[int, int], bytes], chunk: int = 1 << 20) -> int:
    """Size after :func:`encode` of the file read by ``pread(size, offset)`` (blocking: call
    it in a worker thread)."""
    size = offset = 0
    while True:
        data = pread(chunk, offset)
        size += encoded_len(data)
        offset += len(data)
        if len(data) < chunk:
            return size
