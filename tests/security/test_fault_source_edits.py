"""Fault (issue 11): the source root edited while a TFTP transfer of the file is in flight.

A 2 MiB file is fetched by a client that acknowledges block by block; 512 KiB in, the test edits
the source root and waits 1.2 s (longer than the mount's 0.5 s attribute timeout, so whatever
the edit changes is visible to every later read), then the client acknowledges on to the end.
The edits: the file replaced by another (rename over), truncated in place, deleted, and for a
client without a directory, its directory added (holding its own copy of the file), and for a
client with one, its directory removed.  Two doors: `vfsroot-tftpd` over the vfsroot mount, and
`vfsroot-tftpd` over the plain source root.

What must hold, per case (`EXPECTED`): the in-flight transfer ends either with exactly the old
bytes (sha256) or with an ERROR whose message says the file changed -- never other bytes with
a normal end (a short last block is a normal end to a TFTP client); and the next request gets
exactly what the source root holds now (sha256), or "file not found".  (The directory cases
run over the mount only: over a plain tree a client without a directory has no files.)

Why the outcomes differ per door: tftpd over the source root holds the descriptor of the file
it opened, so a rename over it, a delete or a directory change leaves that file whole (old
bytes); a truncate shrinks that very file (ERROR).  Over the mount, the path keeps its inode
number whatever file it names (vfsroot's inodes are keyed by client and path), so the kernel
learns the new file's size and times for the open file too: tftpd sees the file change under
it and ends the transfer with an ERROR, instead of sending bytes cut at the new size.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.disk.images import payload
from tests.tftpd.helpers import running, sha256
from tftpd import packets
from tftpd.client import TftpError, fetch
from tftpd.session import TransferPolicy

from .mount import ServeDaemon, have_fuse
from .tftp import NOBODY, A, B, stepped_fetch

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not have_fuse(), reason="no /dev/fuse or fusermount3")]

SIZE = 2 * 1024 * 1024
CUT_AT = 512 * 1024
BLKSIZE = 1468
#: The client pauses 1.2 s after the edit: the server must keep the transfer alive meanwhile.
POLICY = TransferPolicy(retransmit_timeout=0.5, retries=10)


OLD = payload("old", SIZE)
NEW = payload("new", SIZE - 12345)  # another size: the kernel must see the change
DEFAULT = payload("default", SIZE + 777)
CLIENT_C = payload("client-c", SIZE + 99)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("edits")
    src, mnt = base / "src", base / "mnt"
    (src / "default").mkdir(parents=True)
    (src / A).mkdir()
    (src / B).mkdir()
    mnt.mkdir()
    with ServeDaemon(src, mnt, base / "serve.log"):
        yield src, mnt


def _edits(src: Path) -> dict[str, tuple[str, str, Callable[[], None], Callable[[], None],
                                         bytes | None]]:
    """name -> (client, file, set-up, edit, what a new request gets afterwards)."""
    a, nobody = src / A, src / NOBODY

    def truncate(path: Path) -> Callable[[], None]:
        def edit() -> None:
            with open(path, "r+b") as f:
                f.truncate(CUT_AT // 2)
        return edit

    def add_dir() -> None:
        tmp = src / f".{NOBODY}.new"
        tmp.mkdir()
        (tmp / "big-c").write_bytes(CLIENT_C)
        tmp.rename(nobody)

    def remove_dir() -> None:
        gone = src / f".{B}.gone"
        (src / B).rename(gone)
        shutil.rmtree(gone)

    def reset(*paths: Path) -> Callable[[], None]:
        def setup() -> None:
            for p in paths:
                atomic_write(p, OLD)
        return setup

    def setup_add_dir() -> None:
        shutil.rmtree(nobody, ignore_errors=True)
        atomic_write(src / "default" / "big-c", OLD)

    def setup_remove_dir() -> None:
        (src / B).mkdir(exist_ok=True)
        atomic_write(src / "default" / "big-b", DEFAULT)
        atomic_write(src / B / "big-b", OLD)

    return {
        "client file renamed over": (A, "big-r", reset(a / "big-r"),
                                     lambda: atomic_write(a / "big-r", NEW), NEW),
        "default file renamed over": (A, "big-dr", reset(src / "default" / "big-dr"),
                                      lambda: atomic_write(src / "default" / "big-dr", NEW),
                                      NEW),
        "client file truncated": (A, "big-t", reset(a / "big-t"), truncate(a / "big-t"),
                                  OLD[:CUT_AT // 2]),
        "default file truncated": (A, "big-dt", reset(src / "default" / "big-dt"),
                                   truncate(src / "default" / "big-dt"), OLD[:CUT_AT // 2]),
        "client file deleted": (A, "big-d", reset(a / "big-d"),
                                lambda: (a / "big-d").unlink(), None),
        "client dir added": (NOBODY, "big-c", setup_add_dir, add_dir, CLIENT_C),
        "client dir removed": (B, "big-b", setup_remove_dir, remove_dir, DEFAULT),
    }


#: door -> case -> "old bytes" or "ERROR"; the module docstring says why.
EXPECTED = {
    "tftpd over SRC": {
        "client file renamed over": "old bytes",
        "client file truncated": "ERROR",
        "client file deleted": "old bytes",
    },
    "tftpd over the mount": {
        "client file renamed over": "ERROR",
        "default file renamed over": "ERROR",
        "client file truncated": "ERROR",
        "default file truncated": "ERROR",
        "client file deleted": "ERROR",
        "client dir added": "ERROR",
        "client dir removed": "ERROR",
    },
}


@pytest.mark.parametrize("door", list(EXPECTED))
async def test_source_root_edited_during_transfers(tree: tuple[Path, Path], door: str) -> None:
    src, mnt = tree
    root = mnt if door == "tftpd over the mount" else src
    seen: dict[str, str] = {}
    wrong: list[str] = []
    async with running(root, policy=POLICY) as (_server, addr):
        # a plain tree has no default/ (or default/ is a client named so): no dir cases there
        cases = {k: v for k, v in _edits(src).items() if k in EXPECTED[door]}
        for _client, _name, setup, _edit, _after in cases.values():
            setup()
        time.sleep(1.1)  # the mount shows the set-up (attribute timeout 0.5 s)
        for case, (client, name, _setup, edit, after) in cases.items():
            got = await stepped_fetch(addr, name, client, BLKSIZE, CUT_AT, edit, pause=1.2)
            if isinstance(got, packets.Error):
                outcome = "ERROR"
                detail = got.message
                if "changed" not in got.message and "cannot read" not in got.message:
                    wrong.append(f"{case}: unclear ERROR {got}")
            elif sha256(got) == sha256(OLD):
                outcome, detail = "old bytes", ""
            else:
                outcome, detail = "WRONG BYTES", f"{len(got)} bytes, sha256 {sha256(got)[:12]}"
            seen[case] = f"{outcome} {detail}".strip()
            if outcome != EXPECTED[door][case]:
                wrong.append(f"{case}: {outcome} {detail} (expected {EXPECTED[door][case]})")
            # a new request sees what the source root holds now
            try:
                again: object = (await fetch(addr, name, bind=client, blksize=BLKSIZE,
                                             windowsize=8)).sha256
            except TftpError as e:
                again = e
            if after is None:
                if not (isinstance(again, TftpError) and again.code == 1):
                    wrong.append(f"{case}: a new request got {again!r:.80}, not 'not found'")
            elif again != sha256(after):
                wrong.append(f"{case}: a new request got {again!r:.80}, not the new file")
    print(f"\n{door}:\n" + "\n".join(f"  {case}: {what}" for case, what in seen.items()))
    assert not wrong, "\n".join(wrong)
    assert os.listdir(mnt / A) is not None  # the daemon still serves
