"""A real `vfsroot serve --no-disks` mount: client names never alias, SRC symlinks stay in SRC,
and vfsroot-tftpd over the mount refuses '..' that the kernel itself would resolve."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tftpd.helpers import running
from tftpd import packets

from .mount import ServeDaemon, have_fuse
from .tftp import A, B, fetch

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not have_fuse(), reason="no /dev/fuse or fusermount3")]

C1, C2 = "10.0.0.1", "10.0.0.2"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, ServeDaemon]]:
    base = tmp_path_factory.mktemp("secmount")
    src, mnt, outside = base / "src", base / "mnt", base / "outside"
    mnt.mkdir()
    outside.mkdir()
    (outside / "host-secret").write_bytes(b"host\n")
    (outside / "hop").symlink_to(src / "default" / "kernel")  # exits SRC and comes back
    (outside / "hop-out").symlink_to(outside / "host-secret")
    (src / "default").mkdir(parents=True)
    (src / "default" / "kernel").write_bytes(b"default kernel\n")
    (src / "default" / "peek").symlink_to(f"../{C2}/secret")  # operator shares C2's file
    for ip in (C1, C2, "::ffff:a00:1", A, B):
        (src / ip).mkdir()
        (src / ip / "whoami").write_bytes(ip.encode() + b"\n")
    (src / C2 / "secret").write_bytes(b"secret of 10.0.0.2\n")
    (src / C1 / "chain").symlink_to(outside / "hop")
    (src / C1 / "chain-out").symlink_to(outside / "hop-out")
    (src / C1 / "passwd").symlink_to("/etc/passwd")
    (src / C1 / "loop1").symlink_to("loop2")
    (src / C1 / "loop2").symlink_to("loop1")
    (src / C1 / "to-nbd").symlink_to(f"../{C2}.nbd")
    (src / f"{C2}.nbd").write_text("{}")  # a config is never a client's file by itself
    (src / "10.0.0.3").symlink_to(C2)  # client directory linked to another: inside SRC
    (src / "10.0.0.4").symlink_to("/etc")  # client directory leading out of SRC
    (src / A / "link-b").symlink_to(f"../{B}/whoami")  # via FUSE: a regular file
    with ServeDaemon(src, mnt, base / "serve.log") as daemon:
        yield src, mnt, daemon


@pytest.mark.parametrize("alias", [
    "10.0.0.1 ", " 10.0.0.1", "010.0.0.1", "10.0.0.01", "10.0.0.1.", "10.1",
    "167772161", "0x0a.0.0.1", "::ffff:10.0.0.1", "10.0.0.1%lo",
    "FE80::1", "fe80::0001", "fe80::1%lo", "...", "default ",
])
def test_no_alias_of_a_client_name(env: tuple[Path, Path, ServeDaemon], alias: str) -> None:
    _src, mnt, _d = env
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / alias)
    with pytest.raises(FileNotFoundError):
        (mnt / alias / "whoami").read_bytes()


def test_canonical_v4_mapped_name_is_its_own_client(env: tuple[Path, Path, ServeDaemon]) -> None:
    _src, mnt, _d = env
    assert (mnt / "::ffff:a00:1" / "whoami").read_bytes() == b"::ffff:a00:1\n"
    assert (mnt / C1 / "whoami").read_bytes() == b"10.0.0.1\n"


def test_symlinks_leaving_src_are_absent(env: tuple[Path, Path, ServeDaemon]) -> None:
    _src, mnt, daemon = env
    for name in ("passwd", "chain-out", "loop1"):
        with pytest.raises(FileNotFoundError):
            (mnt / C1 / name).read_bytes()
    names = os.listdir(mnt / C1)
    assert {"passwd", "chain-out", "loop1", "loop2"}.isdisjoint(names), names
    assert "symlink escapes the source root" in daemon.log()
    # a client directory linked out of SRC contributes nothing: default only
    assert sorted(os.listdir(mnt / "10.0.0.4")) == ["kernel", "peek"]
    with pytest.raises(FileNotFoundError):
        (mnt / "10.0.0.4" / "passwd").read_bytes()


def test_recorded_behaviour_of_links_inside_src(env: tuple[Path, Path, ServeDaemon]) -> None:
    """Documented (docs/configuration.md): links are followed while the *final* target is in
    SRC.  So an operator's link shares files across clients, and a chain that leaves SRC and
    comes back is served.  Recorded here so a change is a decision, not an accident."""
    _src, mnt, _d = env
    assert (mnt / C1 / "peek").read_bytes() == b"secret of 10.0.0.2\n"  # via default/
    assert (mnt / C1 / "chain").read_bytes() == b"default kernel\n"
    assert (mnt / "10.0.0.3" / "whoami").read_bytes() == b"10.0.0.2\n"
    assert (mnt / C1 / "to-nbd").read_bytes() == b"{}"  # only because the operator linked it
    assert not os.path.islink(mnt / C1 / "peek")  # links are never exposed as links


def test_kernel_dotdot_is_the_kernels(env: tuple[Path, Path, ServeDaemon]) -> None:
    """`/mnt/10.0.0.1/../10.0.0.2` is resolved by the kernel: expected, and the reason the TFTP
    server must refuse '..' (next test)."""
    _src, mnt, _d = env
    assert (Path(f"{mnt}/{C1}/../{C2}/secret")).read_bytes() == b"secret of 10.0.0.2\n"


def test_mount_is_read_only(env: tuple[Path, Path, ServeDaemon]) -> None:
    _src, mnt, _d = env
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_CREAT):
        with pytest.raises(OSError) as info:
            os.close(os.open(mnt / C1 / "whoami", flags))
        assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), info.value
    with pytest.raises(OSError):
        os.symlink("/etc/passwd", mnt / C1 / "new-link")


async def test_tftpd_over_the_mount(env: tuple[Path, Path, ServeDaemon]) -> None:
    _src, mnt, _d = env
    async with running(mnt) as (_server, addr):
        assert await fetch(addr, "whoami", bind=A) == A.encode() + b"\n"
        assert await fetch(addr, "whoami", bind=B) == B.encode() + b"\n"
        for name in (f"../{B}/whoami", f"..\\{B}\\whoami", f"/../{B}/whoami",
                     f"./../{C2}/secret", "../../etc/passwd"):
            got = await fetch(addr, name, bind=A)
            assert isinstance(got, packets.Error) and got.code == packets.ERR_ACCESS_VIOLATION, (
                name, got)
        got = await fetch(addr, "/etc/passwd", bind=A)
        assert isinstance(got, packets.Error) and got.code == packets.ERR_FILE_NOT_FOUND
        # an operator's SRC link to B is a regular file in the tree: served (by design)
        assert await fetch(addr, "link-b", bind=A) == B.encode() + b"\n"
        assert await fetch(addr, "kernel", bind=A) == b"default kernel\n"
