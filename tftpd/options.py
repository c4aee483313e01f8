"""Option negotiation, once per request (RFC 2347/2348/2349/7440), and the operator's policy.

Pure functions of the request and the policy: no socket, no file.  The session calls
:func:`negotiate` twice at most -- once before the open (blksize decides the read size) and
once with the file size for ``tsize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .packets import (
    BLKSIZE_DEFAULT,
    BLKSIZE_MAX,
    BLKSIZE_MIN,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    WINDOWSIZE_MAX,
    WINDOWSIZE_MIN,
)


@dataclass(frozen=True)
class TransferPolicy:
    """Operator limits and timing for every transfer (immutable, shared by all sessions)."""

    #: Largest block size granted; 1468 fills a 1500-byte Ethernet frame over IPv4.
    blksize_max: int = 1468
    #: Largest window granted (RFC 7440 allows 65535; some clients break above 64).
    windowsize_max: int = 64
    #: Clamp blksize to the route MTU of the session socket (IP_MTU) as well.
    mtu_clamp: bool = False
    #: Seconds before a retransmission when the client did not ask for the ``timeout`` option.
    retransmit_timeout: float = 1.0
    #: Largest ``timeout`` option accepted, seconds.  A larger one is declined (left out of
    #: the OACK: RFC 2349 lets a server decline the option, not change its value), so that one
    #: request -- from a spoofed address, answered by no one -- cannot hold a transfer slot
    #: for its retries times 255 s.
    timeout_max: int = 30
    #: Retransmissions of the same window before the transfer is given up.
    retries: int = 5
    #: Bytes read from the file per worker-thread call (per session, on top of the window);
    #: at least 32 blocks, so big blocks do not pay a thread hop every few packets.
    read_ahead: int = 256 * 1024
    #: Upper bound on a whole transfer, seconds (a trickling client cannot hold a slot forever).
    max_transfer_seconds: float = 3600.0
    #: Minimum gap before a duplicate or mid-window ACK may trigger a resend, seconds.
    resend_holdoff_min: float = 0.002
    #: Busy-poll this long for an ACK before sleeping in the event loop (0 disables) ...
    #: A lock-step transfer to a nearby client waits tens of microseconds per ACK; sleeping
    #: and being woken for each can cost more than that.  On a loaded machine the spinning
    #: worker takes the CPU the client needs instead (docs/tftpd.md, Benchmark: what limits it).
    spin_seconds: float = 0.0002
    #: ... but only while at most this many transfers run (per worker), and only for
    #: transfers whose smoothed RTT is below ``spin_seconds`` (never in a storm, never for a
    #: client a millisecond away).
    spin_max_sessions: int = 1
    #: Send a window's DATA datagrams with one ``sendmsg`` (UDP generic segmentation offload,
    #: Linux >= 4.18); a transfer falls back to one ``send`` per datagram where the kernel
    #: refuses it.  Off: always one ``send`` per datagram.
    gso: bool = True
    #: Answer lock-step's common ACK in the compiled lane (tftpd/_lane.c) where it is built;
    #: off, or without the module, the pump answers it in Python (the same rules).
    compiled_lane: bool = True
    #: Send the compiled lane's answers to one wait in one ``io_uring_enter`` where the kernel
    #: lets us set up a ring (tftpd/_lane.c); off, or without io_uring: one ``send`` per ACK.
    batch_sends: bool = True


@dataclass(frozen=True)
class Negotiated:
    """Effective transfer parameters and the OACK to send (empty: no OACK, plain RFC 1350)."""

    blksize: int = BLKSIZE_DEFAULT
    windowsize: int = 1
    timeout: float = 1.0
    oack: dict[str, str] = field(default_factory=dict)


def _int_option(value: str) -> int | None:
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 10:
        return None
    return int(value)


def negotiate(
    options: dict[str, str],
    policy: TransferPolicy,
    *,
    tsize: int,
    blksize_cap: int | None = None,
) -> Negotiated:
    """Decide blksize/windowsize/timeout/tsize from the request (RFC 2347/2348/2349/7440).

    Only options the client asked for appear in the OACK, in the client's order (UEFI rejects an
    OACK with anything it did not ask).  Unknown options and values we cannot parse or that are
    below the RFC minimum are ignored, not answered: the client then gets the RFC 1350 default,
    which every client handles.  Values above the operator cap are lowered, which RFC 2348 and
    7440 allow the server to do.
    """
    blksize, windowsize, timeout = BLKSIZE_DEFAULT, 1, policy.retransmit_timeout
    cap = min(policy.blksize_max, BLKSIZE_MAX)
    if blksize_cap is not None:
        cap = max(BLKSIZE_MIN, min(cap, blksize_cap))
    oack: dict[str, str] = {}
    for name, raw in options.items():
        value = _int_option(raw)
        if name == "blksize":
            if value is None or value < BLKSIZE_MIN:
                continue
            blksize = min(value, cap)
            oack[name] = str(blksize)
        elif name == "windowsize":
            if value is None or value < WINDOWSIZE_MIN:
                continue
            windowsize = min(value, policy.windowsize_max, WINDOWSIZE_MAX)
            oack[name] = str(windowsize)
        elif name == "timeout":
            if value is None or not TIMEOUT_MIN <= value <= min(TIMEOUT_MAX, policy.timeout_max):
                continue
            timeout = float(value)
            oack[name] = str(value)
        elif name == "tsize":
            # RFC 2349: the client sends 0 in an RRQ; any number is accepted as "tell me".
            if value is None:
                continue
            oack[name] = str(tsize)
    return Negotiated(blksize=blksize, windowsize=windowsize, timeout=timeout, oack=oack)
