"""The one generator of hostile TFTP datagrams for the whole suite (fuzz tests, robustness
tests, and bench/hostile.py).

Each datagram comes from a seeded `random.Random`, so a failure is reproduced by its seed and
index.  Half of what it makes is shaped like TFTP (RFC 1350 opcodes, RFC 2347 options), so it
gets past the opcode check into the parsers, the option negotiation and the path checks; the
rest is raw bytes, truncations and oversize datagrams.  `KINDS` names every shape, so tests can
show all of them were sent.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

#: Request names a hostile client sends: traversal, encodings, separators, long, not UTF-8.
HOSTILE_NAMES = (
    b"../x", b"../../etc/passwd", b"/../127.0.0.11/whoami", b"..\\127.0.0.11\\whoami",
    b"%2e%2e/x", b"%2e%2e%2fx", b"..%c0%afx", b"\xff" * 300, b"a" * 2000, b"", b"/", b".",
    b"whoami", b"pxelinux.cfg/../../x", b"a\nb", b"a\rb", b"\x7f", b"\\\\server\\share",
    b"/etc/passwd", b"C:\\boot.ini", b"127.0.0.11/whoami", b"." * 300,
)
#: Modes, valid and not.
HOSTILE_MODES = (b"octet", b"OCTET", b"netascii", b"NETASCII", b"mail", b"\xff", b"", b"x" * 700)
#: Options a client may send, in any case, and values that overflow, underflow or are not
#: numbers at all.
OPTION_NAMES = (b"blksize", b"BLKSIZE", b"windowsize", b"timeout", b"tsize", b"TSize",
                b"x-vendor", b"", b"blksize2", b"utimeout")
OPTION_VALUES = (b"0", b"-1", b"1", b"7", b"8", b"512", b"65464", b"65465", b"99999999999999999999",
                 b"", b"1e9", b"0x10", b" 8", b"\xff", b"nan", b"1" * 5000)


def _raw(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(0, 600))


def _tiny(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(0, 4))


def _oversize(rng: random.Random) -> bytes:
    """Bigger than an MTU and than what a request or ACK can be (kept under 4 KiB, so a
    sender paced by the server's progress never overflows a default socket buffer)."""
    head = struct.pack("!H", rng.choice([1, 3, 4, 5, 6]))
    return head + rng.randbytes(rng.randrange(1500, 4000))


def _request_fields(rng: random.Random) -> bytes:
    """RRQ/WRQ with random NUL-separated fields, maybe unterminated."""
    fields = [rng.randbytes(rng.randrange(0, 20)).replace(b"\0", b"")
              for _ in range(rng.randrange(0, 8))]
    return struct.pack("!H", rng.choice([1, 2])) + b"\0".join(fields) + (
        b"\0" if rng.random() < 0.7 else b"")


def _hostile_request(rng: random.Random) -> bytes:
    """A well-formed RRQ/WRQ carrying a hostile name, mode and options."""
    name = rng.choice(HOSTILE_NAMES)
    mode = rng.choice(HOSTILE_MODES)
    opts = b"".join(rng.choice(OPTION_NAMES) + b"\0" + rng.choice(OPTION_VALUES) + b"\0"
                    for _ in range(rng.randrange(0, 6)))
    return bytes([0, rng.choice([1, 1, 1, 2])]) + name + b"\0" + mode + b"\0" + opts


def _option_values(rng: random.Random) -> bytes:
    """A good request with one hostile option value (or the same option twice)."""
    name = rng.choice(OPTION_NAMES[:6])
    value = rng.choice(OPTION_VALUES)
    twice = name + b"\0" + b"8\0" if rng.random() < 0.2 else b""
    return b"\x00\x01whoami\x00octet\x00" + name + b"\0" + value + b"\0" + twice


def _repeated_path(rng: random.Random) -> bytes:
    return b"\x00\x01" + rng.choice([b"../", b"/", b"\\", b"a" * 300, b"%2e%2e/"]) * (
        rng.randrange(1, 40)) + b"\x00octet\x00"


def _stray(rng: random.Random) -> bytes:
    """DATA/ACK/ERROR/OACK and unknown opcodes, with any block number and tail."""
    op = rng.choice([3, 4, 5, 6, 0, 7, 9, 255, 65535])
    return struct.pack("!HH", op, rng.randrange(65536)) + rng.randbytes(rng.randrange(0, 20))


def _truncated(rng: random.Random) -> bytes:
    """A valid packet cut short anywhere."""
    good = rng.choice([b"\x00\x01whoami\x00octet\x00blksize\x001468\x00",
                       b"\x00\x04\x00\x01", b"\x00\x05\x00\x01message\x00",
                       b"\x00\x06blksize\x00512\x00"])
    return good[: rng.randrange(0, len(good))]


#: Every shape of datagram, by name, with its share of the mix.
KINDS: dict[str, tuple[Callable[[random.Random], bytes], int]] = {
    "raw": (_raw, 4),
    "tiny": (_tiny, 1),
    "oversize": (_oversize, 1),
    "request-fields": (_request_fields, 3),
    "hostile-request": (_hostile_request, 4),
    "option-values": (_option_values, 3),
    "repeated-path": (_repeated_path, 1),
    "stray": (_stray, 3),
    "truncated": (_truncated, 2),
}
_NAMES = list(KINDS)
_WEIGHTS = [w for _, w in KINDS.values()]


def datagram(rng: random.Random, *, errors: bool = True) -> tuple[str, bytes]:
    """One hostile datagram and the name of its kind.

    ``errors=False`` never returns anything that starts like an ERROR packet: sent from a
    transfer's own client port, an ERROR legitimately ends that transfer (RFC 1350), so a test
    that expects the transfer to survive must not send one.
    """
    while True:
        kind = rng.choices(_NAMES, _WEIGHTS)[0]
        data = KINDS[kind][0](rng)
        if errors or not data.startswith(b"\x00\x05"):
            return kind, data


def junk(rng: random.Random, *, errors: bool = True) -> bytes:
    """Just the bytes of `datagram`."""
    return datagram(rng, errors=errors)[1]
