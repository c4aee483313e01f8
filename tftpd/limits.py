"""Session admission shared by every worker process: the limits and the stop flag.

``--workers`` (one process per CPU by default) forks processes that each have their own listen
socket on the same address (SO_REUSEPORT).  ``--max-sessions`` and ``--max-sessions-per-ip``
are promises about the whole server, not about each worker, and a stop must be seen by all of
them at once (a request that reaches a worker a moment after the operator's SIGTERM must not
start a transfer).  So the counters live in one anonymous shared memory page created before the
fork, updated under one process-shared lock -- once per transfer start and end, never per
packet.

Per-IP counters are kept in a fixed table indexed by a hash of the address: two addresses that
share a slot share their limit (conservative: a client can be refused early, never admitted
over the limit).  With 65536 slots that takes a fleet of hundreds of machines before any two
collide at all.

The same page counts the transfers of each worker, so a request can be placed on the worker
with the fewest (:meth:`SessionLimits.admit_balanced`, tftpd/handoff.py): the kernel's hash
alone spreads a storm unevenly.
"""

from __future__ import annotations

import mmap
import multiprocessing
import zlib
from contextlib import AbstractContextManager, nullcontext

_SLOTS = 1 << 16
#: Most worker processes (``--workers`` is bounded to it).
MAX_WORKERS = 64
#: Bytes: stop flag (uint32), active sessions (uint32), transfers per worker (uint32 each).
_HEADER = 8 + 4 * MAX_WORKERS

#: Reasons :meth:`SessionLimits.admit` gives for a refusal.
BUSY = "busy"
PER_IP = "per-ip"


class SessionLimits:
    """Active-session counters (total and per client IP) and the stop flag.

    ``shared=True`` makes them work across ``fork``: create it in the parent, before the
    workers are forked.
    """

    def __init__(self, max_sessions: int, max_per_ip: int, *, shared: bool = False) -> None:
        self.max_sessions = max_sessions
        self.max_per_ip = max_per_ip
        self._mem = mmap.mmap(-1, _HEADER + 2 * _SLOTS)  # anonymous, MAP_SHARED
        self._head = memoryview(self._mem)[:8].cast("I")
        self._loads = memoryview(self._mem)[8:_HEADER].cast("I")
        self._ips = memoryview(self._mem)[_HEADER:].cast("H")
        self._lock: AbstractContextManager[object] = (
            multiprocessing.Lock() if shared else nullcontext())

    @staticmethod
    def _slot(ip: str) -> int:
        return zlib.crc32(ip.encode()) & (_SLOTS - 1)

    @property
    def stopping(self) -> bool:
        """Set once by whoever received the stop; every worker reads it per request."""
        return bool(self._head[0])

    def stop(self) -> None:
        self._head[0] = 1

    @property
    def active(self) -> int:
        """Transfers running in all workers together."""
        return self._head[1]

    def admit(self, ip: str, worker: int = 0) -> str | None:
        """Count a new transfer for ``ip`` on ``worker``; None if admitted, else :data:`BUSY`
        or :data:`PER_IP` (and nothing was counted)."""
        slot = self._slot(ip)
        with self._lock:
            refused = self._refusal(slot)
            if refused is None:
                self._count(slot, worker)
        return refused

    def admit_balanced(self, ip: str, worker: int, workers: int) -> tuple[str | None, int]:
        """Like :meth:`admit`, and the transfer is counted on the worker of ``0..workers-1``
        that has the fewest: ``worker`` itself unless another has fewer.  Returns (refusal or
        None, the chosen worker), decided under the lock, so a burst of requests arriving
        at several workers at once is spread evenly too."""
        slot = self._slot(ip)
        with self._lock:
            refused = self._refusal(slot)
            if refused is not None:
                return refused, worker
            loads = self._loads
            chosen = worker
            for k in range(workers):
                if loads[k] < loads[chosen]:
                    chosen = k
            self._count(slot, chosen)
        return None, chosen

    def moved(self, src: int, dst: int) -> None:
        """A transfer counted on worker ``src`` runs on ``dst`` after all."""
        with self._lock:
            if self._loads[src]:
                self._loads[src] -= 1
            self._loads[dst] += 1

    def load(self, worker: int) -> int:
        """Transfers counted on ``worker`` now."""
        return self._loads[worker]

    def _refusal(self, slot: int) -> str | None:
        if self._head[1] >= self.max_sessions:
            return BUSY
        if self._ips[slot] >= min(self.max_per_ip, 0xFFFF):
            return PER_IP
        return None

    def _count(self, slot: int, worker: int) -> None:
        self._head[1] += 1
        self._ips[slot] += 1
        self._loads[worker] += 1

    def release(self, ip: str, worker: int = 0) -> None:
        """A transfer admitted for ``ip`` and counted on ``worker`` has ended."""
        slot = self._slot(ip)
        with self._lock:
            if self._head[1]:
                self._head[1] -= 1
            if self._ips[slot]:
                self._ips[slot] -= 1
            if self._loads[worker]:
                self._loads[worker] -= 1
