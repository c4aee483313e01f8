"""Path normalisation and client roots: nothing a client sends may leave its directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tftpd.paths import MAX_COMPONENT_BYTES, MAX_PATH_BYTES, PathRefused, normalise
from tftpd.roots import ClientRoots, OpenRefused, normalise_ip


@pytest.mark.parametrize(("raw", "want"), [
    ("pxelinux.0", "pxelinux.0"),
    ("/pxelinux.0", "pxelinux.0"),  # iPXE
    ("//boot//vmlinuz", "boot/vmlinuz"),
    ("\\Boot\\BCD", "Boot/BCD"),  # Windows PXE keeps its case
    ("./pxelinux.cfg/./01-aa-bb-cc-dd-ee-ff", "pxelinux.cfg/01-aa-bb-cc-dd-ee-ff"),
    ("a/b/", "a/b"),
    ("..foo/bar..", "..foo/bar.."),  # dots inside names are names
    ("kérnel", "kérnel"),
])
def test_normalise_examples(raw: str, want: str) -> None:
    assert normalise(raw) == want


@pytest.mark.parametrize("raw", [
    "", "/", "\\", ".", "./", "..", "../x", "a/../../x", "a/..", "\\..\\x", "/../127.0.0.11/f",
    "a\0b", "a\nb", "a\rb", "\x7f", "a\tb",
    "x" * (MAX_COMPONENT_BYTES + 1), "a/" * (MAX_PATH_BYTES // 2 + 1),
])
def test_normalise_refuses(raw: str) -> None:
    with pytest.raises(PathRefused):
        normalise(raw)


segment = st.one_of(
    st.sampled_from(["", ".", "..", "a", "b.c", "...", "C0A8025B", "01-aa", "é"]),
    st.text(min_size=1, max_size=8),
)


# No deadline or generation-speed check: a loaded machine slows the draw, not normalise().
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(segment, max_size=10), st.sampled_from(["/", "\\"]), st.booleans())
def test_normalised_paths_are_plain_relative_paths(parts: list[str], sep: str,
                                                   lead: bool) -> None:
    raw = (sep if lead else "") + sep.join(parts)
    try:
        out = normalise(raw)
    except PathRefused:
        # Refused exactly when something unsafe or empty was in it.
        pieces = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
        assert (not pieces or ".." in pieces or any(ord(c) < 32 or ord(c) == 127 for c in raw)
                or any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES
                       for p in pieces))
        return
    assert not out.startswith("/")
    assert "\\" not in out
    segs = out.split("/")
    assert all(s not in ("", ".", "..") for s in segs)
    # Joined to any root, the result stays inside it (lexically; symlinks are roots.py's job).
    root = "/run/vfsroot/10.0.0.1"
    assert os.path.normpath(os.path.join(root, out)).startswith(root + "/")


@pytest.mark.parametrize(("peer", "want"), [
    ("::ffff:127.0.0.10", "127.0.0.10"),
    ("127.0.0.10", "127.0.0.10"),
    ("fe80::1%eth0", "fe80::1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
])
def test_normalise_ip(peer: str, want: str) -> None:
    assert normalise_ip(peer) == want


def read_sha256(fd: int) -> str:
    """Read an opened file whole through its descriptor (then close it); its sha256."""
    try:
        h, offset = hashlib.sha256(), 0
        while chunk := os.pread(fd, 65536, offset):
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_roots_per_client_and_flat(tmp_path: Path) -> None:
    (tmp_path / "10.0.0.1").mkdir()
    (tmp_path / "10.0.0.1" / "f").write_bytes(b"one")
    (tmp_path / "10.0.0.10").mkdir()
    (tmp_path / "10.0.0.10" / "f").write_bytes(b"ten")
    (tmp_path / "f").write_bytes(b"flat")
    roots = ClientRoots(tmp_path)
    for ip, want in (("10.0.0.1", b"one"), ("::ffff:10.0.0.10", b"ten")):
        opened = roots.open(ip, "f")
        try:
            assert os.read(opened.fd, 10) == want
            assert opened.size == len(want)
        finally:
            os.close(opened.fd)
    # No prefix matching (rtftp's bug): 10.0.0.100 has no directory, so nothing is found.
    with pytest.raises(OpenRefused) as exc:
        roots.open("10.0.0.100", "f")
    assert exc.value.code == 1
    flat = ClientRoots(tmp_path, flat=True).open("10.0.0.99", "f")
    assert (flat.size, read_sha256(flat.fd)) == (4, sha256(b"flat"))


def test_roots_refuse_directories_specials_and_escaping_symlinks(tmp_path: Path) -> None:
    a, b = tmp_path / "10.0.0.1", tmp_path / "10.0.0.2"
    (a / "dir").mkdir(parents=True)
    b.mkdir()
    (b / "secret").write_bytes(b"b's")
    (a / "inside").write_bytes(b"ok")
    (a / "link-in").symlink_to("inside")
    (a / "link-out").symlink_to("../10.0.0.2/secret")
    (a / "link-abs").symlink_to(b / "secret")
    os.mkfifo(a / "fifo")
    roots = ClientRoots(tmp_path)
    assert read_sha256(roots.open("10.0.0.1", "link-in").fd) == sha256(b"ok")
    for name, code in (("dir", 2), ("link-out", 2), ("link-abs", 2), ("missing", 1),
                       ("inside/x", 1), ("fifo", 2)):
        with pytest.raises(OpenRefused) as exc:
            roots.open("10.0.0.1", name)
        assert exc.value.code == code, name
    # (The fifo above would block a plain open() forever; it is refused at once.)
    # Symlinked client directory itself is fine (operators link 10.0.0.3 -> 10.0.0.2).
    (tmp_path / "10.0.0.3").symlink_to("10.0.0.2")
    assert read_sha256(roots.open("10.0.0.3", "secret").fd) == sha256(b"b's")
    # ... unless the operator opts in to following links out of the client directory.
    opened = ClientRoots(tmp_path, follow_outside_symlinks=True).open("10.0.0.1", "link-out")
    assert read_sha256(opened.fd) == sha256(b"b's")
