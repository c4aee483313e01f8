"""The inline open: files opened on the event loop where nothing in the open can wait.

What must hold: it serves only regular files that the helper's :meth:`ClientRoots.open`
serves too, with the same bytes (a property test over a tree full of hostile symlinks), and
it steps aside -- returns None -- for everything else: refusals, special files, names that
leave the client's directory or its mount, filesystems that can wait (FUSE, procfs).  The
mount table is real (/proc/self/mountinfo, tmpfs and proc mounted by the test); the server
tests count what was opened inline, over a local tree and over a real vfsroot FUSE mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tftpd.client import TftpError, fetch
from tftpd.inline_open import InlineOpener
from tftpd.mounts import BLOCK, KINDS, MEMORY, MountTable, parse_mountinfo
from tftpd.opener_process import WHOLE_MAX
from tftpd.roots import ClientRoots, OpenRefused

from ..hostile_tree import make_hostile_tree
from ..serving import serving
from .conftest import CLIENT_A, CLIENT_B
from .helpers import file_sha256, running

A, B = CLIENT_A, CLIENT_B
SMALL = 4096


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The path tests' tree (tests/hostile_tree.py), plus files for the inline open's cases."""
    base = tmp_path_factory.mktemp("inline")
    root = base / "root"
    make_hostile_tree(root, base / "outside", A, B)
    a = root / A
    (a / "big").write_bytes(os.urandom(3 * SMALL))
    (a / "empty").write_bytes(b"")
    (a / "sub" / "link-up-ok").symlink_to("../whoami")
    (a / "link-abs-inside").symlink_to(a / "whoami")
    return root


@pytest.fixture(scope="module")
def inline(hostile: Path) -> Iterator[InlineOpener]:
    opener = InlineOpener(ClientRoots(hostile))
    yield opener
    opener.close()


def _resident(fd: int, size: int) -> bool:
    """Whether any page of the file is in the page cache (``mincore`` on a private mapping,
    which itself reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        view = ctypes.c_char.from_buffer(m)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        rc = libc.mincore(ctypes.addressof(view), size, vec)
        del view
        assert rc == 0, os.strerror(ctypes.get_errno())
        return any(b & 1 for b in vec.raw)
    finally:
        m.close()


@contextlib.contextmanager
def mounted(fstype: str, where: Path) -> Iterator[Path]:
    """``mount -t fstype`` at ``where`` for the block (the tests run as root, like the FUSE
    tests); skipped where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", fstype, "none", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {fstype}: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


# -- the mount table ------------------------------------------------------------------------


def test_mountinfo_lines_give_id_and_type_past_the_optional_fields() -> None:
    text = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "30 25 0:27 / /dev/shm rw,relatime shared:5 master:2 - tmpfs tmpfs rw\n"
        "61 27 0:50 / /run/vfsroot ro,nosuid shared:9 - fuse.vfsroot vfsroot ro\n"
        "garbage line\n"
        "x 1 0:1 / /a rw - ext4 /dev/x rw\n"
        "\n"
    )
    assert parse_mountinfo(text) == {27: "ext4", 30: "tmpfs", 61: "fuse.vfsroot"}


def test_only_local_filesystems_are_kinds() -> None:
    assert KINDS["tmpfs"] == MEMORY and KINDS["ext4"] == BLOCK and KINDS["xfs"] == BLOCK
    for waits in ("fuse", "fuse.vfsroot", "fuseblk", "nfs", "nfs4", "cifs", "smb3", "9p",
                  "ceph", "virtiofs", "overlay", "proc", "sysfs", "autofs"):
        assert waits not in KINDS


def test_the_table_names_this_machines_mounts() -> None:
    table = MountTable()
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            fd = os.open(shm, os.O_PATH | os.O_DIRECTORY)
            try:
                assert table.fstype(fd) == "tmpfs" and table.kind_of(fd) == MEMORY
            finally:
                os.close(fd)
        fd = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY)
        try:  # (procfs has no file handles: the kernel does not even name its mount)
            assert table.fstype(fd) in ("proc", None) and table.kind_of(fd) is None
        finally:
            os.close(fd)
    finally:
        table.close()


def test_a_mount_made_or_replaced_later_is_seen(tmp_path: Path) -> None:
    """The table is read again when the mount table changes: a mount id freed by an unmount
    and given to a mount of another type must not keep its old type."""
    table = MountTable()
    where = tmp_path / "m"
    try:
        with mounted("tmpfs", where):
            fd = os.open(where, os.O_PATH | os.O_DIRECTORY)
            assert table.fstype(fd) == "tmpfs"
            first = table.mount_id(fd)
            os.close(fd)
        with mounted("cgroup2", where):
            fd = os.open(where, os.O_PATH | os.O_DIRECTORY)
            assert table.fstype(fd) == "cgroup2" and table.kind_of(fd) is None
            assert table.mount_id(fd) is not None and first is not None
            os.close(fd)
    finally:
        table.close()


def test_an_id_the_table_does_not_list_is_not_read_for_again_and_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An id missing after a fresh read (a detached mount) costs one read, not one per
    request; a change of the mount table clears that."""
    listing = tmp_path / "mountinfo"
    listing.write_text("1 0 0:1 / / rw - ext4 /dev/x rw\n")
    table = MountTable(str(listing))  # a regular file: no POLLPRI, only our reads
    reads = []
    real = table._reload
    monkeypatch.setattr(table, "_reload", lambda: (reads.append(1), real())[1])
    fd = os.open("/dev/shm", os.O_PATH | os.O_DIRECTORY)
    try:
        assert table.fstype(fd) is None and len(reads) == 1
        assert table.fstype(fd) is None and table.kind_of(fd) is None and len(reads) == 1
        listing.write_text(f"{table.mount_id(fd)} 0 0:1 / /dev/shm rw - tmpfs tmpfs rw\n")
        real()  # what a POLLPRI would cause
        assert table.kind_of(fd) == MEMORY and len(reads) == 1
    finally:
        os.close(fd)
        table.close()


# -- the inline open ------------------------------------------------------------------------


def test_a_small_cached_file_comes_back_whole(hostile: Path, inline: InlineOpener) -> None:
    before = inline.opened
    got = inline.open(A, "sub/inner", SMALL)
    assert got is not None
    opened, whole = got
    st_ = os.stat(hostile / A / "sub" / "inner")
    assert whole == (hostile / A / "sub" / "inner").read_bytes()
    assert opened.fd == -1 and opened.size == st_.st_size and opened.mtime_ns == st_.st_mtime_ns
    assert opened.path == f"{hostile}/{A}/sub/inner"
    assert inline.opened == before + 1
    empty = inline.open(A, "empty", SMALL)
    assert empty is not None and empty[1] == b""


def test_a_file_above_the_helpers_whole_read_limit_is_handed_on_open(tmp_path: Path) -> None:
    """Read whole only up to WHOLE_MAX, like the helper, whatever ``small`` allows: a large
    copy would be the event loop's time."""
    root = tmp_path / "root"
    (root / A).mkdir(parents=True)
    (root / A / "mid").write_bytes(os.urandom(WHOLE_MAX + 1))
    (root / A / "edge").write_bytes(os.urandom(WHOLE_MAX))
    inline = InlineOpener(ClientRoots(root))
    try:
        got = inline.open(A, "mid", 4 * WHOLE_MAX)
        assert got is not None and got[1] is None and got[0].fd >= 0
        os.close(got[0].fd)
        edge = inline.open(A, "edge", 4 * WHOLE_MAX)
        assert edge is not None and edge[1] == (root / A / "edge").read_bytes()
    finally:
        inline.close()


def test_a_large_file_comes_back_open_and_blocking(hostile: Path, inline: InlineOpener) -> None:
    got = inline.open(A, "big", SMALL)
    assert got is not None
    opened, whole = got
    try:
        assert whole is None and opened.fd >= 0 and opened.size == 3 * SMALL
        assert os.get_blocking(opened.fd)
        assert os.pread(opened.fd, opened.size + 1, 0) == (hostile / A / "big").read_bytes()
    finally:
        os.close(opened.fd)


def test_a_missing_name_the_kernel_knows_is_refused_in_the_helpers_words(
        hostile: Path, inline: InlineOpener) -> None:
    """A name never looked up is not in the cache: the helper is asked (and its lookup leaves
    a negative dentry).  From then on the kernel knows it is missing: refused here."""
    assert inline.open(A, "probe-01-52-54-00", SMALL) is None
    with pytest.raises(OpenRefused) as helper:
        ClientRoots(hostile).open(A, "probe-01-52-54-00")
    before = inline.refused
    with pytest.raises(OpenRefused) as here:
        inline.open(A, "probe-01-52-54-00", SMALL)
    assert (here.value.code, str(here.value)) == (helper.value.code, str(helper.value))
    assert here.value.code == 1 and str(here.value) == "file not found"
    assert inline.refused == before + 1


def test_a_file_not_in_the_page_cache_is_handed_on_open_not_read(tmp_path: Path) -> None:
    """On a disk filesystem the read asks RWF_NOWAIT: a file whose pages were dropped comes
    back as a descriptor, for the transfer's read-ahead to read in a worker thread."""
    root = tmp_path / "root"
    (root / A).mkdir(parents=True)
    path = root / A / "cold"
    path.write_bytes(os.urandom(SMALL // 2))
    inline = InlineOpener(ClientRoots(root))
    fd = os.open(path, os.O_RDONLY)
    try:
        if inline._mounts.kind_of(fd) != BLOCK:
            pytest.skip("the test directory is not on a disk filesystem")
        os.fsync(fd)
        for _ in range(20):  # dropped unless the page is busy (writeback on a loaded host)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not _resident(fd, SMALL // 2):
                break
            time.sleep(0.05)
        else:
            pytest.skip("the kernel keeps the file's page cached")
    finally:
        os.close(fd)
    try:
        got = inline.open(A, "cold", SMALL)
        assert got is not None
        opened, whole = got
        assert whole is None and opened.fd >= 0
        assert os.pread(opened.fd, SMALL, 0) == path.read_bytes()
        os.close(opened.fd)
        warm = inline.open(A, "cold", SMALL)  # read above: cached now, so read whole
        assert warm is not None and warm[1] == path.read_bytes()
    finally:
        inline.close()


@pytest.mark.parametrize("name", [
    "sub", "self-dir", "fifo", "devzero", "link-b", "link-abs-b", "link-host",
    "passwd", "dir-b/secret-b", f"dir-up/{B}/secret-b", "loop",
    "link-abs-inside",  # inside, but absolute: left to the helper, which serves it
])
def test_everything_else_is_left_to_the_helper(inline: InlineOpener, name: str) -> None:
    before = inline.opened
    assert inline.open(A, name, SMALL) is None
    assert inline.opened == before


def _inotify_opens(directory: Path, action: Callable[[], object]) -> set[str]:
    """Names below ``directory`` opened (IN_OPEN: an open that is not O_PATH) during
    ``action()``, as inotify saw them."""
    libc = ctypes.CDLL(None, use_errno=True)
    ifd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert ifd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.inotify_add_watch(ifd, os.fsencode(directory), 0x20) >= 0  # IN_OPEN
        action()
        try:
            raw = os.read(ifd, 65536)
        except BlockingIOError:
            return set()
    finally:
        os.close(ifd)
    names, at = set(), 0
    while at < len(raw):  # struct inotify_event: wd, mask, cookie, len, name[len]
        length = int.from_bytes(raw[at + 12:at + 16], "little")
        names.add(raw[at + 16:at + 16 + length].rstrip(b"\0").decode())
        at += 16 + length
    return names


def test_a_special_file_is_never_opened_for_reading_on_the_event_loop(tmp_path: Path) -> None:
    """A device node's open runs its driver (a block device's may wait on I/O): the name is
    resolved O_PATH and only a regular file is opened for reading.  Seen by inotify, which
    reports every open but an O_PATH one."""
    root = tmp_path / "root"
    (root / A).mkdir(parents=True)
    os.mknod(root / A / "devnull", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / A / "fifo")
    (root / A / "plain").write_bytes(b"x" * 100)
    roots = ClientRoots(root)
    for name in ("devnull", "fifo", "plain"):  # the names into the dentry cache
        with contextlib.suppress(OpenRefused):
            ClientRoots(root).open(A, name)
    inline = InlineOpener(roots)
    try:
        got: dict[str, object] = {}
        opened = _inotify_opens(root / A, lambda: got.update(
            {n: inline.open(A, n, SMALL) for n in ("devnull", "fifo", "plain")}))
    finally:
        inline.close()
    assert got["devnull"] is None and got["fifo"] is None
    assert got["plain"] is not None  # the watch works: the regular file was opened
    assert opened == {"plain"}


@pytest.mark.parametrize("name", [f"../{B}/secret-b", f"sub/../../{B}/secret-b",
                                  "../../etc/passwd"])
def test_even_a_name_with_dotdot_cannot_leave_the_directory(inline: InlineOpener,
                                                             name: str) -> None:
    """tftpd/paths.py refuses '..' before any open; the kernel's RESOLVE_BENEATH refuses it
    here too, so this path is safe on its own."""
    assert inline.open(A, name, SMALL) is None


def test_a_nul_in_the_name_is_not_cut_short(inline: InlineOpener) -> None:
    """tftpd/paths.py refuses control characters first; a NUL reaching the system call
    would open the shorter name before it."""
    assert inline.open(A, "whoami\0/../../secret", SMALL) is None


def test_a_file_across_a_mount_inside_the_directory_is_left_to_the_helper(
        tmp_path: Path) -> None:
    """RESOLVE_NO_XDEV: the mount checked is the directory's, so the file must be on it."""
    root = tmp_path / "root"
    (root / A).mkdir(parents=True)
    inline = InlineOpener(ClientRoots(root))
    try:
        with mounted("tmpfs", root / A / "m"):
            (root / A / "m" / "f").write_bytes(b"on another mount\n")
            assert inline.open(A, "m/f", SMALL) is None
            opened = ClientRoots(root).open(A, "m/f")  # the helper's open serves it
            os.close(opened.fd)
    finally:
        inline.close()


def test_a_directory_on_a_filesystem_that_may_wait_is_left_to_the_helper() -> None:
    inline = InlineOpener(ClientRoots(Path("/proc"), flat=True))
    try:
        assert inline.open(A, "version", SMALL) is None
        assert inline.opened == 0
    finally:
        inline.close()


def test_a_client_address_that_names_no_directory_is_left_to_the_helper(
        inline: InlineOpener) -> None:
    assert inline.open("..", "whoami", SMALL) is None


NAMES = ["whoami", "sub", "inner", "link-ok", "link-up-ok", "link-abs-inside", "link-b",
         "link-abs-b", "link-host", "passwd", "hostdir", "dir-b", "dir-up", "self-dir", "loop",
         "dangling", "fifo", "devzero", "big", "empty", "secret-b", A, B, ".", ".."]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(parts=["..", B, "secret-b"], client=A)
@example(parts=["dir-b", "secret-b"], client=A)
@given(parts=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4),
       client=st.sampled_from([A, B]))
def test_inline_serves_only_what_the_helper_serves_with_the_same_bytes(
        hostile: Path, inline: InlineOpener, parts: list[str], client: str) -> None:
    """Whether a symlink that stays inside is taken inline depends on the kernel's caches
    (RESOLVE_CACHED answers EAGAIN when following it needs more than RCU lookup); what is
    taken must be exactly what the helper serves, and what is refused refused in its words."""
    relpath = "/".join(parts)
    try:
        got = inline.open(client, relpath, SMALL)
    except OpenRefused as exc:
        with pytest.raises(OpenRefused) as helper:
            ClientRoots(hostile).open(client, relpath)
        assert (exc.code, str(exc)) == (helper.value.code, str(helper.value))
        return
    if got is None:
        return
    opened, whole = got
    try:
        ref = ClientRoots(hostile).open(client, relpath)
    except OpenRefused as exc:  # pragma: no cover (the property's failure)
        raise AssertionError(f"{client} {relpath!r} served inline, refused by the helper: "
                             f"{exc}") from None
    try:
        expected = os.pread(ref.fd, ref.size + 1, 0)
        data = whole if whole is not None else os.pread(opened.fd, opened.size + 1, 0)
        assert data == expected and opened.size == ref.size
    finally:
        os.close(ref.fd)
        if opened.fd >= 0:
            os.close(opened.fd)


# -- in the server -------------------------------------------------------------------------


async def test_the_server_opens_a_local_tree_inline_and_counts_it(tree: Path) -> None:
    async with running(tree) as (server, addr):
        for name in ("whoami", "pxelinux.cfg/default", "1m.bin"):
            res = await fetch(addr, name, bind=CLIENT_A)
            assert res.sha256 == file_sha256(tree / CLIENT_A / name)
        for _ in range(2):  # the first lookup is the helper's; then the kernel knows
            with pytest.raises(TftpError, match="file not found"):
                await fetch(addr, "no-such-file", bind=CLIENT_A)
    assert server.stats.opened_inline == 4
    assert server.stats.completed == 3 and server.stats.not_found == 2


async def test_switched_off_every_open_goes_to_the_helper(tree: Path) -> None:
    async with running(tree, inline_open=False) as (server, addr):
        res = await fetch(addr, "whoami", bind=CLIENT_A)
        assert res.size == len(CLIENT_A) + 1
    assert server.stats.opened_inline == 0 and server.stats.completed == 1


async def test_a_fuse_tree_is_never_opened_inline(tmp_path: Path) -> None:
    """The vfsroot FUSE tree waits on disks: every file is opened by the helper."""
    source = tmp_path / "source"
    (source / "default").mkdir(parents=True)
    (source / "default" / "pxelinux.0").write_bytes(os.urandom(20_000))
    (source / CLIENT_A).mkdir()
    (source / CLIENT_A / "whoami").write_text(CLIENT_A + "\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with serving(source, mnt, tmp_path / "serve.log"):
        table = MountTable()
        fd = os.open(mnt / CLIENT_A, os.O_PATH | os.O_DIRECTORY)
        try:
            assert (table.fstype(fd) or "").startswith("fuse") and table.kind_of(fd) is None
        finally:
            os.close(fd)
            table.close()
        async with running(mnt) as (server, addr):
            res = await fetch(addr, "whoami", bind=CLIENT_A)
            assert res.size == len(CLIENT_A) + 1
            res = await fetch(addr, "pxelinux.0", bind=CLIENT_A)
            assert res.sha256 == file_sha256(source / "default" / "pxelinux.0")
        assert server.stats.completed == 2 and server.stats.opened_inline == 0


def _deep_tree(client_dir: Path, top: Path) -> str:
    """20 nested directories of 242-byte names (about 4.9 KiB of path: more than PATH_MAX)
    below ``top``, a file at the bottom, and relative symlinks -- the first in the client's
    directory -- that reach it with a short name; returns that name."""
    parts = [f"{i:02d}" + "d" * 240 for i in range(20)]
    top.mkdir(exist_ok=True)
    fd = os.open(top, os.O_PATH | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            os.mkdir(part, dir_fd=fd)
            nfd = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if i == 9:
                os.symlink("/".join(parts[10:]), "s2", dir_fd=fd)
        w = os.open("deep", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(w, b"deep file\n")
        os.close(w)
    finally:
        os.close(fd)
    hop = "" if top == client_dir else f"../{top.name}/"
    (client_dir / "s1").symlink_to(hop + "/".join(parts[:10]))
    return "s1/s2/deep"


@pytest.mark.parametrize("outside", [False, True])
def test_a_file_the_kernel_cannot_name_is_judged_by_where_its_name_resolves(
        tmp_path: Path, outside: bool) -> None:
    """A real path longer than PATH_MAX (reached through symlinks) has no name in
    /proc/self/fd, so ClientRoots.open asks the kernel instead whether the request's name
    resolves below the client's directory to that file (RESOLVE_BENEATH): served if so,
    refused as outside if not.  The inline open never serves what it refuses."""
    root = tmp_path / "root"
    (root / A).mkdir(parents=True)
    name = _deep_tree(root / A, root / "elsewhere" if outside else root / A)
    roots = ClientRoots(root)
    inline = InlineOpener(roots)
    try:
        if outside:
            with pytest.raises(OpenRefused) as refused:
                roots.open(A, name)
            assert refused.value.code == 2 and "outside" in str(refused.value)
            assert inline.open(A, name, SMALL) is None
        else:
            opened = roots.open(A, name)
            try:
                assert os.pread(opened.fd, 100, 0) == b"deep file\n"
            finally:
                os.close(opened.fd)
            got = inline.open(A, name, SMALL)  # served, or left to the helper
            assert got is None or got[1] == b"deep file\n"
    finally:
        inline.close()
