"""Escapes (issue 11): one corpus of traversal attempts, sent through every door, all refused.

The corpus (`CORPUS`) holds traversal spellings (`..` with `/` and `\\`), their encoded and
look-alike forms, absolute host paths, NULs and control characters, over-long names, other
clients' IPs in the path, and symlinks in the client's directory that point out of the source
root (to a host file, a host directory, a chain that leaves and comes back out).  Client A
(127.0.0.10) sends each one:

* through `vfsroot-tftpd` over the vfsroot mount (the product's own pairing);
* through `vfsroot-tftpd` over the plain source root (`SRC/<ip>/`);
* through the FUSE tree, as the path `MOUNT/127.0.0.10/<attempt>` (only attempts the kernel
  hands to vfsroot as such: not absolute, no `..` component, no NUL; the kernel resolves
  those itself and a TFTP server in front must refuse them, which the two rows above check).

Refused means: an ERROR packet (never silence) or an OSError, and never a byte of any secret.
The test prints the corpus size per door.  Guest-disk symlinks pointing out are refused by
the guest layer (tests/disk/test_guest_layer.py::test_escape_dangling_and_loop, which needs an
appliance); the HTTP recipe is not covered here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tftpd.helpers import running
from tftpd import packets

from .mount import ServeDaemon, have_fuse
from .tftp import A, B, fetch_raw, request_bytes

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not have_fuse(), reason="no /dev/fuse or fusermount3")]

SECRET_B = b"B's secret: never for A\n"
HOST_SECRET = b"host file outside the source root\n"


def _corpus() -> list[bytes]:
    """Every attempt, as the bytes of a TFTP file name."""
    b = B.encode()
    targets = [b + b"/secret-b", b"outside/host-secret", b"etc/passwd"]
    ups = [b"../", b"../../", b"../../../../../../", b"..\\", b"..\\..\\", b"./../",
           b"sub/../../", b"sub\\..\\..\\", b"//..//", b"/../", b".../../", b"..//"]
    out = [up + t for up in ups for t in targets]
    out += [b"..", b"../", b"..\\", b"sub/..", b"sub/../..", b"./.."]
    # encoded and look-alike forms: plain names, never decoded into ".." or "/"
    for enc in (b"%2e%2e/", b"%2e%2e%2f", b"%2E%2E%5C", b"..%2f", b"..%5c", b"%252e%252e/",
                b"..%00/", b"..%c0%af", b"%c0%ae%c0%ae/", b"\xef\xbc\x8e\xef\xbc\x8e/",
                b"..\xe2\x88\x95", b"\xc0\xae\xc0\xae/", b"..;/", b".%2e/", b"%2e./"):
        out += [enc + b + b"/secret-b", enc + b"outside/host-secret"]
    # absolute host paths and other roots
    out += [b"/etc/passwd", b"/etc/shadow", b"/proc/self/environ", b"/proc/1/root/etc/passwd",
            b"//etc/passwd", b"\\etc\\passwd", b"C:\\Windows\\win.ini", b"file:///etc/passwd",
            b"~/.ssh/id_rsa", b"~root/.bashrc"]
    # other clients' IPs in the path (A has no such directory)
    out += [b + b"/secret-b", b"/" + b + b"/secret-b", b"\\" + b + b"\\secret-b",
            b"127.0.0.1/" + b + b"/secret-b", b"default/../" + b + b"/secret-b",
            b"::ffff:127.0.0.11/secret-b", b"127.0.0.011/secret-b", b"secret-b"]
    # NUL and control characters
    out += [b"whoami\x00../" + b + b"/secret-b", b"..\x00/secret-b", b"\x00", b"who\nami",
            b"who\rami", b"whoami\x7f", b"\x1b[2J", b"sub/\x01"]
    # over-long names and paths
    out += [b"a" * 256, b"a" * 4096, b"a/" * 600, b"../" * 400 + b"etc/passwd",
            b"\xc3\xa9" * 300, b"sub/" + b"b" * 300]
    # symlinks in A's own directory that lead out of the source root
    out += [b"link-host", b"link-passwd", b"link-etc/passwd", b"link-etc/shadow",
            b"link-chain", b"link-up-host", b"link-proc/self/environ", b"link-root/etc/passwd",
            b"link-loop", b"sub/link-host"]
    assert len(out) == len(set(out)), "duplicates in the corpus"
    return out


CORPUS = _corpus()


def _fuse_applicable(name: bytes) -> bool:
    return not name.startswith(b"/") and b".." not in name.split(b"/") and b"\0" not in name


def _secrets() -> list[bytes]:
    out = [SECRET_B, HOST_SECRET]
    for host in ("/etc/passwd", "/etc/shadow", "/root/.bashrc"):
        with contextlib.suppress(OSError):
            out.append(Path(host).read_bytes())
    return [s for s in out if s]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("escapes")
    src, mnt, outside = base / "src", base / "mnt", base / "outside"
    mnt.mkdir()
    outside.mkdir()
    (outside / "host-secret").write_bytes(HOST_SECRET)
    (outside / "hop").symlink_to(outside / "host-secret")
    (src / "default").mkdir(parents=True)
    (src / "default" / "kernel").write_bytes(b"default kernel\n")
    a, b = src / A, src / B
    for d, ip in ((a, A), (b, B)):
        (d / "sub").mkdir(parents=True)
        (d / "whoami").write_bytes(ip.encode() + b"\n")
    (b / "secret-b").write_bytes(SECRET_B)
    (a / "link-host").symlink_to(outside / "host-secret")
    (a / "link-passwd").symlink_to("/etc/passwd")
    (a / "link-etc").symlink_to("/etc")
    (a / "link-chain").symlink_to(outside / "hop")
    (a / "link-up-host").symlink_to("../../outside/host-secret")
    (a / "link-proc").symlink_to("/proc")
    (a / "link-root").symlink_to("/")
    (a / "link-loop").symlink_to("link-loop")
    (a / "sub" / "link-host").symlink_to("../../../outside/host-secret")
    daemon = ServeDaemon(src, mnt, base / "serve.log").start()
    try:
        yield src, mnt
    finally:
        daemon.stop()


def _describe(got: object) -> str:
    if isinstance(got, bytes):
        return f"served {len(got)} bytes"
    return repr(got)


async def test_every_escape_attempt_is_refused(env: tuple[Path, Path]) -> None:
    src, mnt = env
    secrets = _secrets()
    escaped: list[str] = []
    sizes: dict[str, int] = {}

    def check(door: str, name: bytes, got: object) -> None:
        sizes[door] = sizes.get(door, 0) + 1
        leaked = isinstance(got, bytes) and any(s in got or (got and got in s)
                                                for s in secrets)
        refused = isinstance(got, packets.Error | OSError | ValueError)
        if leaked or not refused:
            escaped.append(f"{door}: {name[:60]!r} -> {_describe(got)}")

    # the honest request first, through every door: the doors are open
    assert (mnt / A / "whoami").read_bytes() == A.encode() + b"\n"
    for door, root in (("tftpd over the mount", mnt), ("tftpd over SRC", src)):
        async with running(root) as (_server, addr):
            assert await fetch_raw(addr, request_bytes(b"whoami"), bind=A) == A.encode() + b"\n"
            for name in CORPUS:
                check(door, name, await fetch_raw(addr, request_bytes(name), bind=A))
    for name in CORPUS:
        if not _fuse_applicable(name):
            continue
        try:
            with open(os.path.join(os.fsencode(mnt / A), name), "rb") as f:
                got: object = f.read()
        except (OSError, ValueError) as e:
            got = e
        check("FUSE tree", name, got)
    print(f"\nescape corpus: {len(CORPUS)} attempts; "
          + ", ".join(f"{door}: {n} sent" for door, n in sizes.items())
          + f"; escaped or served: {len(escaped)}")
    assert not escaped, "\n".join(escaped)
    assert sizes["tftpd over the mount"] == sizes["tftpd over SRC"] == len(CORPUS)
    assert sizes["FUSE tree"] > len(CORPUS) // 3
