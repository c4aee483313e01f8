"""What is mounted where, from ``/proc/self/mountinfo`` (the one parser of it).

The daemon uses it to tell a stale FUSE mount from a busy mountpoint, the demo to see whether
its mount is up, the tests to see that nothing is left mounted.  Mount points are compared as
bytes: they are byte strings in the kernel, and a non-ASCII name must match too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: the fields vfsroot needs."""

    mount_id: int
    mountpoint: bytes
    fstype: str


def unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal escapes."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def parse_line(line: bytes) -> Mount:
    """One mountinfo line (see proc(5)): the fields after the optional ones follow ``-``."""
    fields = line.split()
    sep = fields.index(b"-")
    return Mount(int(fields[0]), unescape(fields[4]), os.fsdecode(fields[sep + 1]))


def mounts_at(mountpoint: Path | str) -> list[Mount]:
    """Everything mounted exactly at `mountpoint`, bottom first (the last one is visible)."""
    target = os.fsencode(os.path.abspath(mountpoint))
    with open(MOUNTINFO, "rb") as f:
        return [m for m in map(parse_line, f) if m.mountpoint == target]


def mounted_fstype(mountpoint: Path | str) -> str | None:
    """The file system type visible at `mountpoint`, or None if nothing is mounted there."""
    found = mounts_at(mountpoint)
    return found[-1].fstype if found else None
