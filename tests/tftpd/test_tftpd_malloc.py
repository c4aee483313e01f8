"""vfsroot-tftpd's malloc policy (`tftpd.malloc`): freed read buffers go back to the kernel.

Each case runs in a fresh interpreter, because the policy is per process and glibc's dynamic
mmap threshold remembers the largest block ever freed.  The pattern is the server's: a large
block freed once (glibc then raises its mmap threshold, so later large blocks come from the
heap), then read-ahead-sized buffers interleaved with small objects that outlive them; the
buffers are freed and the resident memory they leave behind is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tftpd import malloc

REPO = Path(__file__).resolve().parents[2]
BUFFERS, BUFFER_SIZE = 100, 300 * 1024  # 29 MiB of read-ahead-sized buffers

SCRIPT = f"""
import ctypes, json, os, sys
from tftpd import malloc

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

mode, small = sys.argv[1], sys.argv[2]
fd = os.open(small, os.O_RDONLY)
if mode == "tuned":
    assert malloc.apply()
big = b"\\1" * (4 << 20)
del big  # the first large free: glibc's dynamic threshold rises to 4 MiB
before = rss_kib()
buffers, pins = [], []
for i in range({BUFFERS}):
    buffers.append(b"\\2" * {BUFFER_SIZE})  # filled: every page resident
    # A small file read the way a read-ahead-sized request is: 256 KiB asked, the buffer
    # shrunk to the file's 1,000 bytes, and kept (a transfer still running).
    pins.append(os.pread(fd, {BUFFER_SIZE} - 4096, 0))
del buffers
kept = rss_kib() - before
trimmed = bool(ctypes.CDLL(None).malloc_trim(0))
print(json.dumps({{"kept": kept, "after_trim": rss_kib() - before, "trimmed": trimmed}}))
"""


def run(mode: str, tmp: Path) -> dict:
    small = tmp / "small"
    small.write_bytes(b"s" * 1000)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(small)], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


needs_glibc = pytest.mark.skipif(malloc._glibc() is None, reason="glibc only")


@needs_glibc
def test_glibc_defaults_keep_freed_buffers(tmp_path: Path) -> None:
    """The failure the policy exists for: without it the freed buffers stay resident (most of
    the 29 MiB; ``malloc_trim`` shows they were free, not in use)."""
    got = run("glibc", tmp_path)
    total = BUFFERS * BUFFER_SIZE // 1024
    assert got["kept"] > total * 0.8, got
    assert got["trimmed"] is True
    assert got["after_trim"] < total * 0.2, got


@needs_glibc
def test_tuned_policy_returns_freed_buffers_at_once(tmp_path: Path) -> None:
    got = run("tuned", tmp_path)
    assert got["kept"] < BUFFERS * BUFFER_SIZE // 1024 * 0.1, got


def test_not_glibc_sets_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert malloc.apply() is False
