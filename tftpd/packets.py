"""TFTP packets: the adapter over tftpy's packet layer (the only module that imports tftpy).

tftpy (``tftpy.TftpPacketTypes``) is the packet layer we build on: its opcodes, error codes and
encoders are used wherever they are right.  Its decoders are not fit for a server that faces
real firmware and hostile datagrams (docs/clients.md, "tftpy"), so parsing is done here, into
immutable values:

* ERROR code 0 raises ``KeyError`` in tftpy and custom error text is dropped on encode -> we
  encode ERROR ourselves with the caller's message, for every code.
* Non-ASCII file names raise ``UnicodeDecodeError`` -> names are decoded as UTF-8 with
  ``surrogateescape`` so the exact bytes reach the filesystem and never raise.
* Trailing bytes after the last option raise ``struct.error`` -> an incomplete trailing option
  is ignored (firmware pads requests), never an exception.
* Option names keep their case -> names are lower-cased (RFC 2347: case-insensitive); the first
  occurrence of a repeated option wins.
* ``blksize`` capped at 65536 -> the RFC 2348 range 8..65464 is exported as BLKSIZE_MIN/MAX.
* ``windowsize``/``timeout`` unknown to tftpy's negotiation -> negotiation lives in
  :mod:`tftpd.session`, which only needs names and raw values from here.

Every malformed datagram becomes :class:`MalformedPacket` with a message fit for an ERROR 4
reply.  The hot-path encoders (DATA, ACK) use precompiled structs and are property-tested to be
byte-identical to tftpy's own encoders.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tftpy.TftpPacketTypes import (
    TftpPacketACK,
    TftpPacketDAT,
    TftpPacketERR,
    TftpPacketOACK,
    TftpPacketRRQ,
    TftpPacketWRQ,
)
from tftpy.TftpShared import TftpErrors

OP_RRQ: int = TftpPacketRRQ().opcode
OP_WRQ: int = TftpPacketWRQ().opcode
OP_DATA: int = TftpPacketDAT().opcode
OP_ACK: int = TftpPacketACK().opcode
OP_ERROR: int = TftpPacketERR().opcode
OP_OACK: int = TftpPacketOACK().opcode

ERR_NOT_DEFINED: int = TftpErrors.NotDefined
ERR_FILE_NOT_FOUND: int = TftpErrors.FileNotFound
ERR_ACCESS_VIOLATION: int = TftpErrors.AccessViolation
ERR_DISK_FULL: int = TftpErrors.DiskFull
ERR_ILLEGAL_OPERATION: int = TftpErrors.IllegalTftpOp
ERR_UNKNOWN_TID: int = TftpErrors.UnknownTID
ERR_FILE_EXISTS: int = TftpErrors.FileAlreadyExists
ERR_NO_SUCH_USER: int = TftpErrors.NoSuchUser
ERR_OPTION_NEGOTIATION: int = TftpErrors.FailedNegotiation

#: RFC 2348 block size range (tftpy allows 65536, which does not fit a UDP datagram).
BLKSIZE_MIN = 8
BLKSIZE_MAX = 65464
BLKSIZE_DEFAULT = 512
#: RFC 7440 window size range.
WINDOWSIZE_MIN = 1
WINDOWSIZE_MAX = 65535
#: RFC 2349 timeout range, seconds.
TIMEOUT_MIN = 1
TIMEOUT_MAX = 255

#: Largest datagram we ever need to read: a DATA packet at the maximum block size.
MAX_DATAGRAM = BLKSIZE_MAX + 4

_HEADER = struct.Struct("!HH")
_DATA_PREFIX = OP_DATA << 16
_ACK_PREFIX = OP_ACK << 16


class MalformedPacket(ValueError):
    """A datagram that is not a valid TFTP packet; ``str(exc)`` is safe to send in ERROR 4."""

    code = ERR_ILLEGAL_OPERATION


@dataclass(frozen=True, slots=True)
class Request:
    """RRQ or WRQ.  ``options`` maps lower-cased names to raw values, in request order."""

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def is_read(self) -> bool:
        return self.opcode == OP_RRQ


@dataclass(frozen=True, slots=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    block: int


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OptionAck:
    options: dict[str, str] = field(default_factory=dict)


Packet = Request | Data | Ack | Error | OptionAck


def _split_strings(body: bytes) -> list[bytes]:
    """NUL-terminated strings of ``body``; the last element is whatever followed the last NUL."""
    return body.split(b"\0")


def _parse_options(tokens: list[bytes]) -> dict[str, str]:
    """Option name/value pairs; lenient where firmware is sloppy, never raising.

    Non-ASCII names cannot be options we know, so they are skipped like unknown options.  A
    dangling name without a value (padding, truncated requests) is ignored, and so is a
    value without its NUL: ``tokens``' last element is what followed the last NUL, and a
    request cut short (``blksize\0146`` of ``1468``) must not be taken at its word.
    """
    options: dict[str, str] = {}
    tokens = tokens[:-1]  # the terminated ones
    for i in range(0, len(tokens) - 1, 2):
        raw_name, raw_value = tokens[i], tokens[i + 1]
        if not raw_name:
            # Trailing NUL padding: nothing after it can be a well-formed option.
            break
        try:
            name = raw_name.decode("ascii").lower()
            value = raw_value.decode("ascii")
        except UnicodeDecodeError:
            continue
        options.setdefault(name, value)
    return options


def parse(datagram: bytes) -> Packet:
    """Decode one datagram into an immutable packet, or raise MalformedPacket."""
    if len(datagram) < 2:
        raise MalformedPacket("packet too short")
    opcode = (datagram[0] << 8) | datagram[1]
    if opcode in (OP_RRQ, OP_WRQ):
        tokens = _split_strings(datagram[2:])
        # A complete request has at least filename NUL mode NUL, i.e. three tokens after split
        # (the last being whatever followed the mode's NUL).
        if len(tokens) < 3:
            raise MalformedPacket("request without NUL-terminated file name and mode")
        raw_name, raw_mode = tokens[0], tokens[1]
        if not raw_name:
            raise MalformedPacket("empty file name")
        try:
            mode = raw_mode.decode("ascii").lower()
        except UnicodeDecodeError:
            raise MalformedPacket("transfer mode is not ASCII") from None
        filename = raw_name.decode("utf-8", "surrogateescape")
        return Request(opcode, filename, mode, _parse_options(tokens[2:]))
    if opcode == OP_ACK:
        if len(datagram) < 4:
            raise MalformedPacket("ACK too short")
        return Ack((datagram[2] << 8) | datagram[3])
    if opcode == OP_DATA:
        if len(datagram) < 4:
            raise MalformedPacket("DATA too short")
        return Data((datagram[2] << 8) | datagram[3], bytes(datagram[4:]))
    if opcode == OP_ERROR:
        if len(datagram) < 4:
            raise MalformedPacket("ERROR too short")
        code = (datagram[2] << 8) | datagram[3]
        message = datagram[4:].split(b"\0", 1)[0].decode("utf-8", "replace")
        return Error(code, message)
    if opcode == OP_OACK:
        return OptionAck(_parse_options(_split_strings(datagram[2:])))
    raise MalformedPacket(f"unknown opcode {opcode}")


def ack_block(datagram: bytes) -> int | None:
    """Hot path for a sender: the block number if ``datagram`` is an ACK, else None."""
    if len(datagram) >= 4 and datagram[0] == 0 and datagram[1] == OP_ACK:
        return (datagram[2] << 8) | datagram[3]
    return None


#: ``pack_header(OP_DATA, block & 0xFFFF)`` -> the 4-byte DATA header, without a Python call
#: around it (the transfer pump's per-packet path).
pack_header = _HEADER.pack


def data_header(block: int) -> bytes:
    """The 4-byte DATA header for a 16-bit block number (hot path)."""
    return _HEADER.pack(OP_DATA, block & 0xFFFF)


def encode_data(block: int, payload: bytes) -> bytes:
    """DATA packet; identical to tftpy's ``TftpPacketDAT.encode`` (property-tested)."""
    return _HEADER.pack(OP_DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    """ACK packet; identical to tftpy's ``TftpPacketACK.encode`` (property-tested)."""
    return _HEADER.pack(OP_ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    """ERROR packet with our own message for any code (tftpy drops the text, fails on 0)."""
    text = message.encode("utf-8", "replace")[:500].replace(b"\0", b" ")
    return _HEADER.pack(OP_ERROR, code & 0xFFFF) + text + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    """OACK through tftpy's encoder (correct for the ASCII names and values we produce)."""
    packet = TftpPacketOACK()
    packet.options = {name: str(value) for name, value in options.items()}
    return packet.encode().buffer


def encode_request(opcode: int, filename: str, mode: str, options: dict[str, str]) -> bytes:
    """RRQ/WRQ for clients.  tftpy encodes octet ASCII requests; anything else (netascii, UTF-8
    names) is encoded here, because tftpy refuses other modes and non-ASCII names."""
    name = filename.encode("utf-8", "surrogateescape")
    if mode == "octet" and name.isascii() and b"\0" not in name:
        packet = TftpPacketRRQ() if opcode == OP_RRQ else TftpPacketWRQ()
        packet.filename = filename
        packet.mode = mode
        packet.options = {k: str(v) for k, v in options.items()}
        return packet.encode().buffer
    parts = [name, mode.encode("ascii")]
    for key, value in options.items():
        parts += [key.encode("ascii"), str(value).encode("ascii")]
    return struct.pack("!H", opcode) + b"".join(p + b"\0" for p in parts)
