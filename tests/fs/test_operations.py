"""`VfsOperations` called directly: inodes, lookup counts, readdir, EROFS, xattrs, errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from vfsroot.fs import ROOT_INODE, VfsOperations
from vfsroot.layers.base import LayerUnavailable
from vfsroot.sources import SourceRoot
from vfsroot.view import View

from .fakes import FakeLayer

CTX = pyfuse3.RequestContext()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "default" / "pxelinux.cfg").mkdir(parents=True)
    (root / "default" / "pxelinux.cfg" / "default").write_bytes(b"default cfg\n")
    (root / "default" / "vmlinuz").write_bytes(b"default kernel")
    (root / "default" / "common").write_bytes(b"common")
    (root / "10.0.0.1").mkdir()
    (root / "10.0.0.1" / "vmlinuz").write_bytes(b"client kernel")
    (root / "10.0.0.1" / "thing").write_bytes(b"a file for now")
    (root / "fe80::1").mkdir()
    (root / "10.0.0.2.nbd").write_text("")
    return root


@pytest.fixture
def ops(src: Path) -> VfsOperations:
    return VfsOperations(SourceRoot(src))


async def lookup(ops: VfsOperations, *names: str) -> pyfuse3.EntryAttributes:
    inode = ROOT_INODE
    attrs = None
    for name in names:
        attrs = await ops.lookup(inode, os.fsencode(name), CTX)
        inode = attrs.st_ino
    assert attrs is not None
    return attrs


async def read_all(ops: VfsOperations, inode: int) -> bytes:
    info = await ops.open(inode, os.O_RDONLY, CTX)
    try:
        return await ops.read(info.fh, 0, 1 << 20)
    finally:
        await ops.release(info.fh)


def errno_of(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return excinfo.value.errno


class Replies:
    """Stands in for pyfuse3.readdir_reply: records entries, accepts `budget` of them."""

    def __init__(self, budget: int = 10**9) -> None:
        self.budget = budget
        self.entries: list[tuple[str, int, int]] = []

    def __call__(self, token: Any, name: bytes, attrs: pyfuse3.EntryAttributes,
                 next_id: int) -> bool:
        if self.budget <= 0:
            return False
        self.budget -= 1
        self.entries.append((os.fsdecode(name), attrs.st_ino, next_id))
        return True


async def readdir(ops: VfsOperations, inode: int, monkeypatch: pytest.MonkeyPatch,
                  budget: int = 10**9, start: int = 0) -> list[tuple[str, int, int]]:
    replies = Replies(budget)
    monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
    fh = await ops.opendir(inode, CTX)
    try:
        await ops.readdir(fh, start, None)  # type: ignore[arg-type]
    finally:
        await ops.releasedir(fh)
    return replies.entries


# -- lookups ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "10.0.0.1", "10.0.0.2", "10.9.9.9", "fe80::1",
                                  "2001:db8::77"])
async def test_root_lookup_of_any_valid_client_is_a_directory(ops: VfsOperations,
                                                              name: str) -> None:
    attrs = await lookup(ops, name)
    assert stat.S_ISDIR(attrs.st_mode)
    assert attrs.st_ino > ROOT_INODE
    assert attrs.st_mode & 0o777 == 0o555


@pytest.mark.parametrize("name", ["nope", "010.0.0.1", "FE80::1", "fe80:0:0:0:0:0:0:1",
                                  "10.0.0.2.nbd", "10.0.0.1.", "..", "."])
async def test_root_lookup_of_other_names_is_enoent(ops: VfsOperations, name: str) -> None:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await lookup(ops, name)
    assert errno_of(e) == errno.ENOENT


async def test_views_serve_the_right_bytes(ops: VfsOperations) -> None:
    assert await read_all(ops, (await lookup(ops, "10.0.0.1", "vmlinuz")).st_ino) \
        == b"client kernel"
    assert await read_all(ops, (await lookup(ops, "10.0.0.1", "common")).st_ino) == b"common"
    assert await read_all(ops, (await lookup(ops, "10.9.9.9", "vmlinuz")).st_ino) \
        == b"default kernel"
    attrs = await lookup(ops, "10.0.0.1", "vmlinuz")
    assert attrs.st_size == 13 and stat.S_ISREG(attrs.st_mode) and attrs.st_mode & 0o777 == 0o444
    assert 0 < attrs.entry_timeout <= 1 and 0 < attrs.attr_timeout <= 1


async def test_lookup_counts_are_exact_and_inodes_never_reused(ops: VfsOperations) -> None:
    a = (await lookup(ops, "10.0.0.1")).st_ino
    f1 = (await ops.lookup(a, b"vmlinuz", CTX)).st_ino
    f2 = (await ops.lookup(a, b"vmlinuz", CTX)).st_ino
    assert f1 == f2
    assert ops.inodes.get(f1).lookups == 2  # type: ignore[union-attr]
    await ops.forget([(f1, 1)])
    assert ops.inodes.get(f1).lookups == 1  # type: ignore[union-attr]
    assert (await ops.getattr(f1, CTX)).st_size == 13
    await ops.forget([(f1, 1)])
    assert ops.inodes.get(f1) is None
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(f1, CTX)
    assert errno_of(e) == errno.ENOENT
    f3 = (await ops.lookup(a, b"vmlinuz", CTX)).st_ino
    assert f3 not in (f1, a, ROOT_INODE)
    assert f3 > f1
    # forgetting the root never frees it
    await ops.forget([(ROOT_INODE, 5)])
    assert (await ops.getattr(ROOT_INODE, CTX)).st_ino == ROOT_INODE


async def test_failed_lookup_takes_no_reference(ops: VfsOperations) -> None:
    a = (await lookup(ops, "10.0.0.1")).st_ino
    before = len(ops.inodes)
    with pytest.raises(pyfuse3.FUSEError):
        await ops.lookup(a, b"missing", CTX)
    assert len(ops.inodes) == before


async def test_file_turned_into_directory_gets_a_new_inode(ops: VfsOperations,
                                                           src: Path) -> None:
    client = (await lookup(ops, "10.0.0.1")).st_ino
    old = await ops.lookup(client, b"thing", CTX)
    assert stat.S_ISREG(old.st_mode)
    (src / "10.0.0.1" / "thing").unlink()
    (src / "10.0.0.1" / "thing").mkdir()
    new = await ops.lookup(client, b"thing", CTX)
    assert stat.S_ISDIR(new.st_mode)
    assert new.st_ino != old.st_ino
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(old.st_ino, CTX)
    assert errno_of(e) == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(old.st_ino, os.O_RDONLY, CTX)
    assert errno_of(e) == errno.ENOENT
    # and back: the directory's inode goes stale, the file is new again
    shutil.rmtree(src / "10.0.0.1" / "thing")
    (src / "10.0.0.1" / "thing").write_bytes(b"a file again")
    ino = new.st_ino
    for stale in (lambda: ops.getattr(ino, CTX), lambda: ops.opendir(ino, CTX),
                  lambda: ops.getxattr(ino, b"user.vfsroot.layer", CTX),
                  lambda: ops.lookup(ino, b"x", CTX)):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await stale()
        assert errno_of(e) == errno.ENOENT


# -- readdir ------------------------------------------------------------------------------

async def test_root_listing(ops: VfsOperations, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = await readdir(ops, ROOT_INODE, monkeypatch)
    assert [name for name, _, _ in entries] == ["default", "10.0.0.1", "10.0.0.2", "fe80::1"]
    assert [next_id for _, _, next_id in entries] == [1, 2, 3, 4]


async def test_readdir_counts_every_accepted_entry(ops: VfsOperations,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    client = (await lookup(ops, "10.0.0.1")).st_ino
    entries = await readdir(ops, client, monkeypatch)
    assert [n for n, _, _ in entries] == ["common", "pxelinux.cfg", "thing", "vmlinuz"]
    ino = {n: i for n, i, _ in entries}
    assert all(ops.inodes.get(i).lookups == 1 for i in ino.values())  # type: ignore[union-attr]
    again = await ops.lookup(client, b"vmlinuz", CTX)
    assert again.st_ino == ino["vmlinuz"]
    assert ops.inodes.get(ino["vmlinuz"]).lookups == 2  # type: ignore[union-attr]
    await ops.forget([(ino["vmlinuz"], 2), (ino["common"], 1)])
    assert ops.inodes.get(ino["vmlinuz"]) is None
    assert ops.inodes.get(ino["common"]) is None
    assert ops.inodes.get(ino["thing"]).lookups == 1  # type: ignore[union-attr]


async def test_readdir_resumes_at_the_offset_and_counts_only_accepted(
    ops: VfsOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = (await lookup(ops, "10.0.0.1")).st_ino
    replies = Replies(budget=2)
    monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
    fh = await ops.opendir(client, CTX)
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    assert [(n, nid) for n, _, nid in replies.entries] == [("common", 1), ("pxelinux.cfg", 2)]
    live_before = len(ops.inodes)
    # the refused third entry ("thing") took no reference and left no inode behind
    assert not any(e.key.path == ("thing",) for _, e in ops.inodes.live())
    # the listing is a snapshot from opendir: a file added meanwhile does not appear
    replies.budget = 10
    await ops.readdir(fh, 2, None)  # type: ignore[arg-type]
    await ops.readdir(fh, 4, None)  # type: ignore[arg-type]
    await ops.releasedir(fh)
    assert [(n, nid) for n, _, nid in replies.entries] == [
        ("common", 1), ("pxelinux.cfg", 2), ("thing", 3), ("vmlinuz", 4)]
    assert len(ops.inodes) == live_before + 2
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    assert errno_of(e) == errno.EBADF


async def test_readdir_is_a_snapshot_taken_at_opendir(ops: VfsOperations, src: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = (await lookup(ops, "10.0.0.1")).st_ino
    replies = Replies()
    monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
    fh = await ops.opendir(client, CTX)
    (src / "10.0.0.1" / "aaa-new").write_bytes(b"")
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    await ops.releasedir(fh)
    assert "aaa-new" not in [n for n, _, _ in replies.entries]
    assert "aaa-new" in [n for n, _, _ in await readdir(ops, client, monkeypatch)]


async def test_opendir_of_a_file_is_enotdir(ops: VfsOperations) -> None:
    f = (await lookup(ops, "10.0.0.1", "vmlinuz")).st_ino
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.opendir(f, CTX)
    assert errno_of(e) == errno.ENOTDIR


# -- files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND,
                                   os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_CREAT])
async def test_write_opens_are_erofs(ops: VfsOperations, flags: int) -> None:
    f = (await lookup(ops, "10.0.0.1", "vmlinuz")).st_ino
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(f, flags, CTX)
    assert errno_of(e) == errno.EROFS


async def test_open_directory_is_eisdir(ops: VfsOperations) -> None:
    d = (await lookup(ops, "10.0.0.1", "pxelinux.cfg")).st_ino
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(d, os.O_RDONLY, CTX)
    assert errno_of(e) == errno.EISDIR


async def test_reads_are_exact_and_keep_cache_follows_the_content(ops: VfsOperations,
                                                                  src: Path) -> None:
    data = os.urandom(200_000)
    (src / "10.0.0.1" / "big").write_bytes(data)
    f = (await lookup(ops, "10.0.0.1", "big")).st_ino
    first = await ops.open(f, os.O_RDONLY, CTX)
    assert await ops.read(first.fh, 0, 131072) == data[:131072]
    assert await ops.read(first.fh, 131072, 131072) == data[131072:]
    assert await ops.read(first.fh, 200_000, 4096) == b""
    second = await ops.open(f, os.O_RDONLY, CTX)
    assert first.keep_cache is False and second.keep_cache is True
    await ops.release(first.fh)
    await ops.release(second.fh)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(first.fh, 0, 1)
    assert errno_of(e) == errno.EBADF
    (src / "10.0.0.1" / "big").write_bytes(bytes(200_000))  # same size, new content
    third = await ops.open(f, os.O_RDONLY, CTX)
    assert third.keep_cache is False
    assert await ops.read(third.fh, 0, 10) == bytes(10)
    await ops.release(third.fh)


# -- xattrs -------------------------------------------------------------------------------

async def test_xattrs_name_layer_and_source(ops: VfsOperations, src: Path) -> None:
    own = (await lookup(ops, "10.0.0.1", "vmlinuz")).st_ino
    shared = (await lookup(ops, "10.0.0.1", "common")).st_ino
    assert await ops.getxattr(own, b"user.vfsroot.layer", CTX) == b"client"
    assert await ops.getxattr(own, b"user.vfsroot.source", CTX) \
        == os.fsencode(src / "10.0.0.1" / "vmlinuz")
    assert await ops.getxattr(shared, b"user.vfsroot.layer", CTX) == b"default"
    assert await ops.getxattr(shared, b"user.vfsroot.source", CTX) \
        == os.fsencode(src / "default" / "common")
    assert sorted(await ops.listxattr(own, CTX)) == [b"user.vfsroot.layer",
                                                     b"user.vfsroot.source"]
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(own, b"user.other", CTX)
    assert errno_of(e) == errno.ENODATA
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(ROOT_INODE, b"user.vfsroot.layer", CTX)
    assert errno_of(e) == errno.ENODATA
    explained = json.loads(await ops.getxattr(own, b"user.vfsroot.explain", CTX))
    assert explained == [
        {"layer": "client", "source": str(src / "10.0.0.1" / "vmlinuz"), "kind": "file",
         "size": 13},
        {"layer": "default", "source": str(src / "default" / "vmlinuz"), "kind": "file",
         "size": 14},
    ]


# -- errors -------------------------------------------------------------------------------

class FakeSource:
    """A SourceRoot stand-in whose client 10.0.0.1 has the given layers."""

    def __init__(self, *layers: FakeLayer) -> None:
        self._layers = layers

    def clients(self) -> list[str]:
        return ["10.0.0.1"]

    def view(self, client: str) -> View:
        return View(client, self._layers)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [(RuntimeError("bug in a layer"), errno.EIO), (LayerUnavailable("attaching"), errno.EIO),
     (PermissionError(errno.EACCES, "denied"), errno.EACCES), (KeyError("x"), errno.EIO)],
)
async def test_handler_errors_become_fuse_errors(failure: BaseException, expected: int) -> None:
    good = FakeLayer("client", {"vmlinuz": b"k", "d": {}})
    bad = FakeLayer("default", {"vmlinuz": b"x", "d": {}})
    ops = VfsOperations(FakeSource(good, bad))  # type: ignore[arg-type]
    client = (await lookup(ops, "10.0.0.1")).st_ino
    d = (await ops.lookup(client, b"d", CTX)).st_ino
    bad.fail = failure
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(client, b"missing", CTX)
    assert errno_of(e) == expected
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.opendir(d, CTX)
    assert errno_of(e) == expected
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(d, b"user.vfsroot.explain", CTX)
    assert errno_of(e) == expected
    # the operations object still works for what does not touch the failing layer
    f = (await ops.lookup(client, b"vmlinuz", CTX)).st_ino
    assert await read_all(ops, f) == b"k"


async def test_readdir_reply_failure_is_eio(ops: VfsOperations,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(pyfuse3, "readdir_reply", broken)
    fh = await ops.opendir(ROOT_INODE, CTX)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    assert errno_of(e) == errno.EIO
    await ops.releasedir(fh)


async def test_unknown_inodes_are_enoent(ops: VfsOperations) -> None:
    for call in (lambda: ops.getattr(999, CTX), lambda: ops.opendir(999, CTX),
                 lambda: ops.open(999, os.O_RDONLY, CTX),
                 lambda: ops.getxattr(999, b"user.vfsroot.layer", CTX),
                 lambda: ops.lookup(999, b"x", CTX)):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await call()
        assert errno_of(e) == errno.ENOENT
    await ops.forget([(999, 1)])  # never raises


# -- invalidation -------------------------------------------------------------------------

async def test_invalidate_reaches_every_view_that_shows_the_path(
    ops: VfsOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, bytes]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async",
                        lambda inode, name, ignore_enoent=False: calls.append((inode, name)))
    a = (await lookup(ops, "10.0.0.1")).st_ino
    b = (await lookup(ops, "10.9.9.9")).st_ino
    d = (await lookup(ops, "default")).st_ino
    cfg = (await lookup(ops, "10.0.0.1", "pxelinux.cfg")).st_ino
    ops.invalidate(None, ("vmlinuz",))
    assert sorted(calls) == sorted([(a, b"vmlinuz"), (b, b"vmlinuz"), (d, b"vmlinuz")])
    calls.clear()
    ops.invalidate("10.0.0.1", ("vmlinuz",))
    assert calls == [(a, b"vmlinuz")]
    calls.clear()
    ops.invalidate(None, ("pxelinux.cfg", "default"))
    assert calls == [(cfg, b"default")]
    calls.clear()
    ops.invalidate_client("10.0.0.7")
    assert calls == [(ROOT_INODE, b"10.0.0.7")]
