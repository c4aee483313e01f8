"""Real mounts: `vfsroot serve` in a subprocess, checked with plain tools."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import MANY, Daemon, mount_ids, mounted, vfsroot_cmd

pytestmark = pytest.mark.mount

ENOENT_MSG = "No such file or directory"
EROFS_MSG = "Read-only file system"
VISIBLE_WITHIN = 1.0


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, (cmd, result.stderr)
    return result


def cat(path: Path) -> str:
    return run("cat", str(path)).stdout


def ls(path: Path) -> list[str]:
    return run("ls", "-1A", str(path)).stdout.splitlines()


def assert_enoent(path: Path, message: str = ENOENT_MSG) -> None:
    result = run("stat", str(path), check=False)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    result = run("cat", str(path), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def eventually(check, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll `check()` until true; fail once a check that *began* VISIBLE_WITHIN seconds or more
    after the call still sees the old state.  Returns the delay.

    The bound is on when a read starts, not on when it returns: each check forks `cat` or
    `stat`, and on a loaded machine one fork can take longer than the bound itself, so a
    stale answer to a check begun before the bound is no failure (it was flaky under load).
    At least one check always begins after the bound before this can fail."""
    start = time.monotonic()
    while True:
        began = time.monotonic() - start
        if check():
            return time.monotonic() - start
        if began >= VISIBLE_WITHIN:
            pytest.fail(f"{what}: not visible through the mount within {VISIBLE_WITHIN}s "
                        f"(a read begun {began:.2f} s after the change still saw the old state)")
        time.sleep(0.02)


def cat_or_none(path: Path) -> str | None:
    result = run("cat", str(path), check=False)
    return result.stdout if result.returncode == 0 else None


@pytest.fixture
def m(shared_mount: tuple[Daemon, dict]) -> Path:
    return shared_mount[0].mountpoint


@pytest.fixture
def src(shared_mount: tuple[Daemon, dict]) -> Path:
    return shared_mount[0].source


# -- what the views show ------------------------------------------------------------------

def test_client_files_win_per_file(m: Path) -> None:
    assert cat(m / "10.0.0.1" / "vmlinuz") == "client kernel\n"
    assert cat(m / "10.0.0.1" / "initrd.img") == "default initrd\n"
    assert cat(m / "10.0.0.1" / "pxelinux.cfg" / "default") == "CLIENT menu\n"
    assert cat(m / "10.0.0.1" / "pxelinux.cfg" / "extra") == "extra\n"
    assert cat(m / "10.0.0.10" / "vmlinuz") == "ten kernel\n"
    assert cat(m / "10.0.0.10" / "pxelinux.cfg" / "default") == "DEFAULT menu\n"
    assert cat(m / "default" / "vmlinuz") == "default kernel\n"
    assert ls(m / "10.0.0.1" / "pxelinux.cfg") == ["default", "extra"]


def test_merged_listing_has_no_duplicates(m: Path) -> None:
    assert ls(m / "10.0.0.1") == sorted([
        "big.img", "boot", "boot-link", "common", "initrd.img", "pxelinux.cfg",
        "shadowed-dir", "shadowed-file", "shared-link", "vmlinuz",
    ])
    found = run("find", str(m / "10.0.0.1"), "-printf", "%y %P\n").stdout.splitlines()
    assert sorted(found) == sorted([
        "d ", "f big.img", "d boot", "f boot/grub.cfg", "d boot-link", "f boot-link/grub.cfg",
        "f common", "f initrd.img", "d pxelinux.cfg", "f pxelinux.cfg/default",
        "f pxelinux.cfg/extra", "f shadowed-dir", "d shadowed-file", "f shadowed-file/mine",
        "f shared-link", "f vmlinuz",
    ])


def test_file_and_directory_shadow_each_other(m: Path) -> None:
    assert cat(m / "10.0.0.1" / "shadowed-dir") == "a file shadowing a dir\n"
    assert_enoent(m / "10.0.0.1" / "shadowed-dir" / "inside", "Not a directory")
    assert ls(m / "10.0.0.1" / "shadowed-file") == ["mine"]
    assert cat(m / "10.0.0.10" / "shadowed-file") == "a file in default\n"


@pytest.mark.parametrize("client", ["10.9.9.9", "10.0.0.100", "fe80::99", "2001:db8::6"])
def test_unknown_client_sees_the_default_view(m: Path, client: str) -> None:
    assert cat(m / client / "vmlinuz") == "default kernel\n"
    assert cat(m / client / "pxelinux.cfg" / "default") == "DEFAULT menu\n"
    assert ls(m / client) == ls(m / "default")
    assert "big.img" in ls(m / client)


def test_ipv6_clients(m: Path) -> None:
    assert cat(m / "fe80::1" / "id") == "I am fe80::1\n"
    assert cat(m / "2001:db8::5" / "id") == "I am 2001:db8::5\n"
    assert cat(m / "2001:db8::5" / "vmlinuz") == "default kernel\n"


@pytest.mark.parametrize("name", ["FE80::1", "fe80:0:0:0:0:0:0:1", "fe80::0001", "2001:0db8::5",
                                  "2001:DB8::5", "010.0.0.1", "10.0.0.01", "fe80::1%eth0",
                                  "10.0.0.20.nbd", "nope"])
def test_non_canonical_names_are_enoent(m: Path, name: str) -> None:
    assert_enoent(m / name)
    assert_enoent(m / name / "vmlinuz")


def test_mount_root_lists_default_and_every_known_client(m: Path,
                                                         shared_mount: tuple[Daemon, dict]
                                                         ) -> None:
    names = ls(m)
    many = shared_mount[1]["many"]
    assert len(many) == MANY
    named = {"default", "10.0.0.1", "10.0.0.10", "10.0.0.20", "fe80::1", "2001:db8::5"}
    assert named | set(many) <= set(names)
    # other tests may add clients to the shared source root meanwhile; nothing else may show
    assert set(names) - named - set(many) <= {"10.0.0.77", "fe80::77", "10.0.0.88", "10.0.0.99"}
    assert len(names) == len(set(names))
    for sample in (many[0], many[MANY // 2], many[-1]):
        assert cat(m / sample / "vmlinuz") == "default kernel\n"


def test_symlinks_inside_followed_escapes_refused(m: Path) -> None:
    assert cat(m / "10.0.0.1" / "shared-link") == "common file\n"
    assert cat(m / "10.0.0.1" / "boot-link" / "grub.cfg") == "grub\n"
    for name in ("escape-abs", "escape-rel", "escape-dir", "broken"):
        assert_enoent(m / "10.0.0.1" / name)
    assert_enoent(m / "10.0.0.1" / "escape-dir" / "passwd")
    # nothing in the tree is a symlink the kernel could follow elsewhere
    links = run("find", str(m / "10.0.0.1"), "-type", "l").stdout
    assert links == ""


def test_writes_are_refused(m: Path, src: Path) -> None:
    target = m / "10.0.0.1"
    attempts = [
        ("touch", str(target / "new")),
        ("touch", str(target / "vmlinuz")),
        ("sh", "-c", f"echo x > '{target / 'vmlinuz'}'"),
        ("sh", "-c", f"echo x >> '{target / 'common'}'"),
        ("mkdir", str(target / "newdir")),
        ("rm", "-f", str(target / "vmlinuz")),
        ("mv", str(target / "vmlinuz"), str(target / "moved")),
    ]
    for cmd in attempts:
        result = run(*cmd, check=False)
        assert result.returncode != 0, cmd
        assert EROFS_MSG in result.stderr, (cmd, result.stderr)
    assert (src / "10.0.0.1" / "vmlinuz").read_bytes() == b"client kernel\n"
    assert not (src / "10.0.0.1" / "new").exists()
    assert cat(target / "vmlinuz") == "client kernel\n"
    assert "ro" in run("findmnt", "-n", "-o", "OPTIONS", str(m)).stdout.split(",")


def test_eight_parallel_readers_get_the_right_bytes(m: Path,
                                                    shared_mount: tuple[Daemon, dict]) -> None:
    want = shared_mount[1]["big_sha256"]
    paths = [m / "10.0.0.1" / "big.img"] * 4 + [m / f"10.0.0.{i}" / "big.img" for i in (2, 3)] \
        + [m / "default" / "big.img", m / "fe80::1" / "big.img"]
    procs = [subprocess.Popen(["sha256sum", str(p)], stdout=subprocess.PIPE, text=True)
             for p in paths]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8
    assert [out.split()[0] for out in outs] == [want] * 8
    assert run("stat", "-c", "%s", str(paths[0])).stdout.strip() == str(64 * 1024 * 1024)


def test_xattrs_name_layer_and_source(m: Path, src: Path) -> None:
    out = run("getfattr", "-d", str(m / "10.0.0.1" / "vmlinuz")).stdout
    assert 'user.vfsroot.layer="client"' in out.splitlines()
    assert f'user.vfsroot.source="{src}/10.0.0.1/vmlinuz"' in out.splitlines()
    out = run("getfattr", "-d", str(m / "10.0.0.1" / "initrd.img")).stdout
    assert 'user.vfsroot.layer="default"' in out.splitlines()
    assert f'user.vfsroot.source="{src}/default/initrd.img"' in out.splitlines()
    out = run("getfattr", "--only-values", "-n", "user.vfsroot.source",
              str(m / "10.0.0.1" / "shared-link")).stdout
    assert out == f"{src}/default/common"


def test_explain_names_serving_layer_and_shadowed_copy(m: Path, src: Path) -> None:
    out = run(*vfsroot_cmd("explain", "10.0.0.1", "vmlinuz", "--mount", str(m))).stdout
    lines = out.splitlines()
    assert lines[0] == "10.0.0.1:/vmlinuz"
    assert lines[1].split() == ["served", "by", "client", f"{src}/10.0.0.1/vmlinuz", "(14",
                                "bytes)"]
    assert lines[2].split() == ["shadows", "default", f"{src}/default/vmlinuz", "(15", "bytes)"]
    assert len(lines) == 3
    out = run(*vfsroot_cmd("explain", "10.0.0.1", "pxelinux.cfg/default", "--mount",
                           str(m))).stdout
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["served", "by", "client"], ["shadows", "default", f"{src}/default/pxelinux.cfg/default"]]
    missing = run(*vfsroot_cmd("explain", "10.0.0.1", "nothing", "--mount", str(m)), check=False)
    assert missing.returncode == 1
    assert "not in this client's view" in missing.stdout


# -- source edits show within 1 s ---------------------------------------------------------

def test_new_client_directory_is_visible(m: Path, src: Path) -> None:
    assert cat(m / "10.0.0.77" / "vmlinuz") == "default kernel\n"  # cached as default view
    assert "10.0.0.77" not in ls(m)
    (src / "10.0.0.77.tmp").mkdir()
    (src / "10.0.0.77.tmp" / "vmlinuz").write_bytes(b"seventy-seven\n")
    (src / "10.0.0.77.tmp").rename(src / "10.0.0.77")
    eventually(lambda: cat_or_none(m / "10.0.0.77" / "vmlinuz") == "seventy-seven\n",
               "file of a new client directory")
    eventually(lambda: "10.0.0.77" in ls(m), "new client in the mount root")
    (src / "fe80::77").mkdir()
    eventually(lambda: "fe80::77" in ls(m), "new IPv6 client in the mount root")


@pytest.mark.parametrize("where", ["10.0.0.1", "default"])
def test_new_file_is_visible(m: Path, src: Path, where: str) -> None:
    name = f"new-in-{where}"
    view = m / "10.0.0.1" / "pxelinux.cfg"
    assert_enoent(view / name)
    (src / where / "pxelinux.cfg" / name).write_bytes(b"fresh\n")
    eventually(lambda: cat_or_none(view / name) == "fresh\n", "new file")
    eventually(lambda: name in ls(view), "new file in the listing")
    if where == "default":
        eventually(lambda: cat_or_none(m / "10.200.0.1" / "pxelinux.cfg" / name) == "fresh\n",
                   "new default file in an unknown client's view")


@pytest.mark.parametrize("new", [b"EDITED-same-size\n", b"edited to a longer content\n",
                                 b"short\n"])
def test_edited_file_is_visible(m: Path, src: Path, new: bytes) -> None:
    name = f"edit-{len(new)}"
    host = src / "default" / name
    host.write_bytes(b"original content\n")
    view = m / "10.0.0.10" / name
    eventually(lambda: cat_or_none(view) == "original content\n", "file before the edit")
    assert run("stat", "-c", "%s", str(view)).stdout.strip() == "17"
    with open(host, "r+b") as f:  # edit in place: same inode
        f.truncate(0)
        f.write(new)
    eventually(lambda: cat_or_none(view) == new.decode(), "edited content")
    eventually(lambda: run("stat", "-c", "%s", str(view)).stdout.strip() == str(len(new)),
               "edited size")


def test_deleted_file_is_visible(m: Path, src: Path) -> None:
    (src / "10.0.0.10" / "common").write_bytes(b"ten's own common\n")
    (src / "10.0.0.10" / "only-here").write_bytes(b"only\n")
    view = m / "10.0.0.10"
    eventually(lambda: cat_or_none(view / "common") == "ten's own common\n", "override")
    assert cat(view / "only-here") == "only\n"
    (src / "10.0.0.10" / "common").unlink()
    (src / "10.0.0.10" / "only-here").unlink()
    eventually(lambda: cat_or_none(view / "common") == "common file\n",
               "deleted override falls back to default")
    # open() asks the daemon every time, stat() may answer from the kernel's entry cache
    # until the watcher's invalidation lands: both must show the delete within the bound
    # (CI once saw cat refused and a stat answered from the cache right after it).
    eventually(lambda: cat_or_none(view / "only-here") is None
               and run("stat", str(view / "only-here"), check=False).returncode == 1,
               "deleted file gone")
    assert_enoent(view / "only-here")
    assert "only-here" not in ls(view)


# -- daemon lifecycle ---------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(small_source: Path, tmp_path: Path, daemon_factory,
                                 signum: int) -> None:
    (tmp_path / "mnt").mkdir()
    d = daemon_factory.make(small_source, tmp_path / "mnt").start()
    assert cat(d.mountpoint / "10.0.0.1" / "vmlinuz") == "client kernel\n"
    assert d.signal(signum) == 0, d.log()
    assert not mounted(d.mountpoint)
    assert os.listdir(d.mountpoint) == []


def wait_dead(mnt: Path) -> None:
    """Until stat() of the mountpoint fails with ENOTCONN (its cached attributes expired)."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            os.stat(mnt)
        except OSError as e:
            assert e.errno == errno.ENOTCONN
            return
        time.sleep(0.05)
    pytest.fail("the dead mount still answers stat() after 3 s")


def test_sigkill_leaves_dead_mount_and_restart_recovers(small_source: Path, tmp_path: Path,
                                                        daemon_factory) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    first = daemon_factory.make(small_source, mnt).start()
    assert first.signal(signal.SIGKILL) == -signal.SIGKILL
    assert mounted(mnt)
    dead = run("ls", str(mnt / "10.0.0.1"), check=False)  # readdir always asks the daemon
    assert dead.returncode != 0 and "Transport endpoint is not connected" in dead.stderr
    wait_dead(mnt)
    second = daemon_factory.make(small_source, mnt).start()
    assert cat(mnt / "10.0.0.1" / "vmlinuz") == "client kernel\n"
    assert cat(mnt / "10.5.5.5" / "vmlinuz") == "default kernel\n"
    assert "stale FUSE mount" in second.log()
    assert second.signal(signal.SIGTERM) == 0
    assert not mounted(mnt)


def test_restart_right_after_sigkill_recovers(small_source: Path, tmp_path: Path,
                                              daemon_factory) -> None:
    from vfsroot.daemon import prepare_mountpoint
    from vfsroot.errors import QuietError

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    first = daemon_factory.make(small_source, mnt).start()
    os.stat(mnt)  # the kernel now holds the root's attributes for attr_timeout
    assert first.signal(signal.SIGKILL) == -signal.SIGKILL
    try:
        prepare_mountpoint(mnt)  # what a restarted daemon does first
    except QuietError as e:
        pytest.fail(f"restart refused: {e}")
    assert mount_ids(mnt) == set()


def test_second_daemon_on_a_busy_mountpoint_exits_4(m: Path, src: Path) -> None:
    result = subprocess.run(
        vfsroot_cmd("serve", "--source", str(src), "--mount", str(m), "--no-disks"),
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vfsroot: ") and str(m) in lines[0] and "busy" in lines[0]
    assert cat(m / "10.0.0.1" / "vmlinuz") == "client kernel\n"  # the first one still serves


def test_missing_source_root_exits_3(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-source"
    result = subprocess.run(
        vfsroot_cmd("serve", "--source", str(missing), "--mount", str(tmp_path / "mnt"),
                    "--no-disks"),
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vfsroot: ") and str(missing) in lines[0]
    assert not mounted(tmp_path / "mnt")


def test_replaced_file_is_visible(m: Path, src: Path) -> None:
    """The operator's atomic update: write a new file, rename it over the old one."""
    host = src / "10.0.0.10" / "replaced"
    host.write_bytes(b"version one\n")
    view = m / "10.0.0.10" / "replaced"
    eventually(lambda: cat_or_none(view) == "version one\n", "file before the rename")
    tmp = host.with_name(".replaced.tmp")
    tmp.write_bytes(b"version two!\n")
    tmp.rename(host)
    eventually(lambda: cat_or_none(view) == "version two!\n", "file renamed over")
    assert ".replaced.tmp" not in ls(m / "10.0.0.10")


def test_edit_behind_a_symlink_is_visible(m: Path, src: Path) -> None:
    target = src / "default" / "link-target"
    target.write_bytes(b"before\n")
    os.symlink("../default/link-target", src / "10.0.0.10" / "via-link")
    view = m / "10.0.0.10" / "via-link"
    eventually(lambda: cat_or_none(view) == "before\n", "symlinked file")
    target.write_bytes(b"after, and longer\n")
    eventually(lambda: cat_or_none(view) == "after, and longer\n", "edit behind a symlink")


def test_removed_client_directory_falls_back_to_default(m: Path, src: Path) -> None:
    (src / "10.0.0.88").mkdir()
    (src / "10.0.0.88" / "vmlinuz").write_bytes(b"eighty-eight\n")
    eventually(lambda: cat_or_none(m / "10.0.0.88" / "vmlinuz") == "eighty-eight\n",
               "new client")
    assert "10.0.0.88" in ls(m)
    shutil.rmtree(src / "10.0.0.88")
    eventually(lambda: cat_or_none(m / "10.0.0.88" / "vmlinuz") == "default kernel\n",
               "removed client's view falls back to default")
    eventually(lambda: "10.0.0.88" not in ls(m), "removed client gone from the mount root")


def test_new_disk_config_lists_the_client(m: Path, src: Path) -> None:
    """Backup and editor files beside configs never make a client.  They are written
    *before* the real config, so once the real one is listed the watcher has seen them too:
    their absence is then a decision, not a race the check won."""
    names = ls(m)
    assert not {"10.0.0.99", "10.0.0.97", "10.0.0.9"} & set(names)
    (src / "10.0.0.97.nbd.bak").write_text("# not a config\n")
    (src / "10.0.0.9.nbd~").write_text("# not a config\n")
    (src / "10.0.0.99.nbd").write_text("# config\n")
    eventually(lambda: "10.0.0.99" in ls(m), "client with a new .nbd config")
    names = ls(m)
    assert "10.0.0.97" not in names and "10.0.0.9" not in names
    assert not [n for n in names if ".nbd" in n]


@pytest.mark.parametrize("name", [
    "mnt with space",
    "mnt-é",
])
def test_busy_detection_with_unusual_mountpoint_names(tmp_path: Path, small_source: Path,
                                                      daemon_factory, name: str) -> None:
    mnt = tmp_path / name
    mnt.mkdir()
    first = daemon_factory.make(small_source, mnt).start()
    assert cat(mnt / "10.0.0.1" / "vmlinuz") == "client kernel\n"
    second = subprocess.Popen(
        vfsroot_cmd("serve", "--source", str(small_source), "--mount", str(mnt), "--no-disks"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while second.poll() is None and time.monotonic() < deadline:
            if len(mount_ids(mnt)) > 1:
                pytest.fail("the second daemon mounted on top of the first")
            time.sleep(0.05)
        assert second.returncode == 4
    finally:
        if second.poll() is None:
            second.terminate()
            second.wait(timeout=10)
        assert second.stderr is not None
        second.stderr.close()
    assert len(mount_ids(mnt)) == 1
    assert first.proc is not None and first.proc.poll() is None


def test_file_turned_into_directory_gets_a_new_inode(m: Path, src: Path) -> None:
    host = src / "10.0.0.10" / "morph"
    host.write_bytes(b"file\n")
    view = m / "10.0.0.10" / "morph"
    eventually(lambda: cat_or_none(view) == "file\n", "new file")
    before = run("stat", "-c", "%i %F", str(view)).stdout.split(maxsplit=1)
    assert before[1].strip() == "regular file"
    assert run("stat", "-c", "%i", str(view)).stdout.split()[0] == before[0]  # stable
    host.unlink()
    host.mkdir()
    (host / "inside").write_bytes(b"")

    def is_dir() -> bool:
        out = run("stat", "-c", "%i %F", str(view), check=False).stdout.split(maxsplit=1)
        return len(out) == 2 and out[1].strip() == "directory"

    eventually(is_dir, "file turned into a directory")
    after = run("stat", "-c", "%i", str(view)).stdout.split()[0]
    assert after != before[0]
    assert ls(view) == ["inside"]


def test_non_utf8_file_names_round_trip(m: Path, src: Path) -> None:
    raw = b"latin1-\xe9t\xe9"
    with open(os.path.join(os.fsencode(src / "10.0.0.10"), raw), "wb") as f:
        f.write(b"bytes name\n")
    view = os.path.join(os.fsencode(m / "10.0.0.10"), raw)
    eventually(lambda: os.path.exists(view), "non-UTF-8 name")
    assert raw in os.listdir(os.fsencode(m / "10.0.0.10"))
    assert run("cat", os.fsdecode(view)).stdout == "bytes name\n"


def test_open_file_survives_deletion_in_the_source(m: Path, src: Path) -> None:
    host = src / "10.0.0.10" / "doomed"
    data = os.urandom(1 << 20)
    host.write_bytes(data)
    view = m / "10.0.0.10" / "doomed"
    eventually(lambda: os.path.exists(view), "file before deletion")
    with open(view, "rb") as f:
        head = f.read(4096)
        host.unlink()
        rest = f.read()
    assert head + rest == data
    eventually(lambda: not os.path.exists(view), "deleted file")
