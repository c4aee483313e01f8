"""Escapes (issue 11): one corpus of traversal attempts, sent through every door, all refused.

The corpus (`CORPUS`, tests/security/escape_corpus.py) holds traversal spellings (`..` with
`/` and `\\`), their encoded and look-alike forms, absolute host paths, NULs and control
characters, over-long names, other clients' IPs in the path, and symlinks in the client's
directory that point out of the source root (to a host file, a host directory, a chain that
leaves and comes back out).  Client A
(127.0.0.10) sends each one:

* through `vfsroot-tftpd` over the vfsroot mount (the product's own pairing);
* through `vfsroot-tftpd` over the plain source root (`SRC/<ip>/`);
* through the FUSE tree, as the path `MOUNT/127.0.0.10/<attempt>` (only attempts the kernel
  hands to vfsroot as such: not absolute, no `..` component, no NUL; the kernel resolves
  those itself and a TFTP server in front must refuse them, which the two rows above check).

Refused means: an ERROR packet (never silence) or an OSError, and never a byte of any secret.
The test prints the corpus size per door.  Guest-disk symlinks pointing out are refused by
the guest layer (tests/disk/test_guest_layer.py::test_escape_dangling_and_loop, which needs an
appliance); the HTTP recipe's door is tests/e2e/test_http_escapes.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tftpd.helpers import running
from tftpd import packets

from .escape_corpus import CORPUS, A, build_tree, fuse_applicable, leaks, secrets
from .mount import ServeDaemon, have_fuse
from .tftp import fetch_raw, request_bytes

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not have_fuse(), reason="no /dev/fuse or fusermount3")]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("escapes")
    src, mnt = base / "src", base / "mnt"
    mnt.mkdir()
    build_tree(src, base / "outside")
    with ServeDaemon(src, mnt, base / "serve.log"):
        yield src, mnt


def _describe(got: object) -> str:
    if isinstance(got, bytes):
        return f"served {len(got)} bytes"
    return repr(got)


async def test_every_escape_attempt_is_refused(env: tuple[Path, Path]) -> None:
    src, mnt = env
    secret_list = secrets()
    escaped: list[str] = []
    sizes: dict[str, int] = {}

    def check(door: str, name: bytes, got: object) -> None:
        sizes[door] = sizes.get(door, 0) + 1
        leaked = isinstance(got, bytes) and leaks(got, secret_list)
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
        if not fuse_applicable(name):
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
