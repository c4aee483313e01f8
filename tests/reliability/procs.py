"""What a daemon holds, read from /proc: RSS, descriptors, threads, of a process and every
process below it (vfsroot-tftpd's workers, tftpd-hpa's per-transfer children, vfsroot's
libguestfs workers and their qemu).

A peak is taken two ways, because the two kinds of daemon differ: a long-lived process keeps
its own high-water mark (VmHWM), but tftpd-hpa forks one child per transfer and the child is
gone before anyone reads its VmHWM, so the tree is also sampled (:class:`PeakSampler`) and the
largest sum of RSS seen at one instant is reported.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads' children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError):
            out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def _status(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes that map them, so
    the sum over 200 forked children does not count their one libc 200 times."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


#: glibc maps each per-thread arena's heap at an address aligned to its maximum size
#: (HEAP_MAX_SIZE, 64 MiB on 64-bit), which no other anonymous mapping of these daemons is.
ARENA_ALIGN = 64 << 20


@dataclass(frozen=True)
class MemoryMap:
    """Where one process's resident memory lives (KiB), from ``/proc/PID/smaps``: glibc's main
    arena (``[heap]``, grown with brk), its per-thread arenas (anonymous mappings on a 64 MiB
    boundary), other anonymous memory (blocks glibc mmaps one by one, Python's small-object
    arenas, thread stacks) and mapped files.  Growth in ``arenas`` or ``heap`` while ``anon``
    stays flat points at malloc keeping freed memory, not at live objects."""

    heap: int = 0
    arenas: int = 0
    anon: int = 0
    files: int = 0

    def line(self) -> str:
        return (f"heap {self.heap / 1024:.1f}, arenas {self.arenas / 1024:.1f}, "
                f"anon {self.anon / 1024:.1f}, files {self.files / 1024:.1f} MiB")


def memory_map(pid: int) -> MemoryMap:
    heap = arenas = anon = files = 0
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return MemoryMap()
    kind = "anon"
    for line in text.splitlines():
        head = line.split(None, 6)
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            start = int(head[0].split("-")[0], 16)
            name = head[5] if len(head) > 5 else ""
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("/"):
                kind = "files"
            elif not name and start % ARENA_ALIGN == 0:
                kind = "arenas"
            else:
                kind = "anon"
        elif line.startswith("Rss:"):
            kib = int(line.split()[1])
            if kind == "heap":
                heap += kib
            elif kind == "arenas":
                arenas += kib
            elif kind == "files":
                files += kib
            else:
                anon += kib
    return MemoryMap(heap, arenas, anon, files)


@dataclass(frozen=True)
class Sample:
    """One reading of a process tree (sums over its processes)."""

    processes: int
    rss_kib: int
    hwm_kib: int  # sum of the live processes' own peaks
    fds: int
    threads: int
    #: Each process's own RSS, the tree's root first: a sum can hide one worker that grows.
    rss_each_kib: tuple[int, ...] = ()

    def line(self) -> str:
        return (f"RSS {self.rss_kib / 1024:.1f} MiB, {self.fds} fds, {self.threads} threads, "
                f"{self.processes} processes")


def sample(pid: int) -> Sample:
    pids = tree(pid)
    rss = hwm = fds = threads = 0
    each = []
    for p in pids:
        st = _status(p)
        rss += st.get("VmRSS", 0)
        each.append(st.get("VmRSS", 0))
        hwm += st.get("VmHWM", 0)
        threads += st.get("Threads", 0)
        fds += fd_count(p)
    return Sample(len(pids), rss, hwm, fds, threads, tuple(each))


def count_named(pid: int, name: str) -> int:
    """Processes in ``pid``'s tree whose command name starts with ``name`` (e.g. qemu)."""
    n = 0
    for p in tree(pid):
        try:
            if Path(f"/proc/{p}/comm").read_text().startswith(name):
                n += 1
        except OSError:
            pass
    return n


class PeakSampler:
    """Samples process trees every ``interval`` seconds in a thread.  Per tree: ``peak_kib``,
    the largest sum of RSS seen at one instant; ``peak_pss_kib``, the same for PSS (shared
    pages counted once: the fair figure for a forking server); ``largest_process_kib``, the
    largest VmHWM of any one process.  Use as a context manager."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_kib = {name: 0 for name in pids}
        self.peak_pss_kib = {name: 0 for name in pids}
        self.largest_process_kib = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.take()
            self._stop.wait(self.interval)

    def take(self) -> None:
        for name, pid in self.pids.items():
            total = pss = 0
            for p in tree(pid):
                st = _status(p)
                total += st.get("VmRSS", 0)
                pss += pss_kib(p)
                self.largest_process_kib[name] = max(self.largest_process_kib[name],
                                                     st.get("VmHWM", 0))
            self.peak_kib[name] = max(self.peak_kib[name], total)
            self.peak_pss_kib[name] = max(self.peak_pss_kib[name], pss)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.take()


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
