"""TFTP: no name, symlink or packet reaches outside the client's own directory.

The server runs in-process on 127.0.0.1:<free port>; clients are "machines" bound to
127.0.0.10 (A) and 127.0.0.11 (B).  Every refusal must be an ERROR with the right code and a
message that says why, and the server must serve a normal request right after.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.hostile_tree import DECOY, SECRET_B, make_hostile_tree
from tests.tftpd.helpers import RawClient, running
from tftpd import packets

from .tftp import NOBODY, A, B, fetch, fetch_raw, receive_rest, request_bytes

FOUND = 0  # marker: the request must be served
NOT_FOUND = packets.ERR_FILE_NOT_FOUND
DENIED = packets.ERR_ACCESS_VIOLATION
ILLEGAL = packets.ERR_ILLEGAL_OPERATION
RAW_NAME = b"\xff\xfe-latin1.bin"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    make_hostile_tree(root, tmp_path / "outside", A, B)
    (root / A / os.fsdecode(RAW_NAME)).write_bytes(b"raw bytes name\n")
    return root


# (name as sent, expected code or FOUND, expected bytes or message fragment)
CASES: list[tuple[str, int, bytes | str]] = [
    # --- traversal spellings: refused before the filesystem sees them
    (f"../{B}/secret-b", DENIED, "'..' is not allowed"),
    (f"..\\{B}\\secret-b", DENIED, "'..' is not allowed"),
    (f"/../{B}/secret-b", DENIED, "'..' is not allowed"),
    (f"./../{B}/secret-b", DENIED, "'..' is not allowed"),
    (f"sub/../../{B}/secret-b", DENIED, "'..' is not allowed"),
    (f"sub\\..\\..\\{B}\\secret-b", DENIED, "'..' is not allowed"),
    (f"//..//{B}//secret-b", DENIED, "'..' is not allowed"),
    ("sub/..", DENIED, "'..' is not allowed"),
    ("..", DENIED, "'..' is not allowed"),
    ("../../../../etc/passwd", DENIED, "'..' is not allowed"),
    # --- look-alikes of '..' are plain names (not found), never decoded into '..'
    (f"%2e%2e/{B}/secret-b", NOT_FOUND, "file not found"),
    (f"%2e%2e%2f{B}%2fsecret-b", NOT_FOUND, "file not found"),
    (f"..%00/{B}/secret-b", NOT_FOUND, "file not found"),
    (f"\uff0e\uff0e/{B}/secret-b", NOT_FOUND, "file not found"),  # fullwidth dots
    (f"..\u2215{B}\u2215secret-b", NOT_FOUND, "file not found"),  # division slash
    (f".../{B}/secret-b", NOT_FOUND, "file not found"),
    (f"..;/{B}/secret-b", NOT_FOUND, "file not found"),
    ("~/whoami", NOT_FOUND, "file not found"),
    # --- absolute host paths are relative to the client's root
    ("/etc/passwd", NOT_FOUND, "file not found"),
    ("/proc/self/environ", NOT_FOUND, "file not found"),
    ("C:\\Windows\\win.ini", NOT_FOUND, "file not found"),
    (f"/{B}/secret-b", FOUND, DECOY),  # A's own sub-directory named like B
    (f"//{B}//secret-b", FOUND, DECOY),
    (f"\\{B}\\secret-b", FOUND, DECOY),
    ("secret-b", NOT_FOUND, "file not found"),
    # --- spellings of A's own files that must work
    ("//whoami", FOUND, A.encode() + b"\n"),
    ("./sub/./inner", FOUND, b"inner of " + A.encode() + b"\n"),
    ("\\sub\\inner", FOUND, b"inner of " + A.encode() + b"\n"),
    ("link-ok", FOUND, b"inner of " + A.encode() + b"\n"),
    ("self-dir/whoami", FOUND, A.encode() + b"\n"),
    ("WHOAMI", NOT_FOUND, "file not found"),  # names are case-sensitive, never folded
    # --- symlinks that lead out of A's directory
    ("link-b", DENIED, "outside the client's directory"),
    ("link-abs-b", DENIED, "outside the client's directory"),
    ("link-host", DENIED, "outside the client's directory"),
    ("passwd", DENIED, "outside the client's directory"),
    ("hostdir/passwd", DENIED, "outside the client's directory"),
    ("dir-b/secret-b", DENIED, "outside the client's directory"),
    (f"dir-up/{B}/secret-b", DENIED, "outside the client's directory"),
    ("loop", DENIED, "invalid file name"),
    ("dangling", NOT_FOUND, "file not found"),
    # --- things that are not regular files
    ("fifo", DENIED, "not a regular file"),
    ("devzero", DENIED, "not a regular file"),
    ("sub", DENIED, "is a directory"),
    ("self-dir", DENIED, "is a directory"),
    ("/", DENIED, "names no file"),
    ("./", DENIED, "names no file"),
    ("\\\\", DENIED, "names no file"),
    # --- control characters and sizes
    ("whoami\x01", DENIED, "control character"),
    ("who\nami", DENIED, "control character"),
    ("whoami\x7f", DENIED, "control character"),
    ("a" * 1025, DENIED, "longer than 1024 bytes"),
    ("\u00e9" * 513, DENIED, "longer than 1024 bytes"),  # 1026 UTF-8 bytes
    ("a" * 256, DENIED, "component longer than 255"),
    ("sub/" + "a" * 255, NOT_FOUND, "file not found"),
]


def _id(case: tuple[str, int, bytes | str]) -> str:
    return repr(case[0][:40])


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
async def test_request_from_a(root: Path, case: tuple[str, int, bytes | str]) -> None:
    name, code, want = case
    async with running(root) as (_server, addr):
        got = await fetch(addr, name, bind=A)
        if code == FOUND:
            assert got == want
        else:
            assert isinstance(got, packets.Error), f"{name!r} was served: {got!r}"
            assert got.code == code, got
            assert isinstance(want, str) and want in got.message, got
        # still serving, and never B's file
        assert await fetch(addr, "whoami", bind=A) == A.encode() + b"\n"
    assert SECRET_B not in (got if isinstance(got, bytes) else b"")


async def test_each_address_gets_only_its_own_tree(root: Path) -> None:
    async with running(root) as (_server, addr):
        assert await fetch(addr, "whoami", bind=A) == A.encode() + b"\n"
        assert await fetch(addr, "whoami", bind=B) == B.encode() + b"\n"
        assert await fetch(addr, "secret-b", bind=B) == SECRET_B
        got = await fetch(addr, "whoami", bind=NOBODY)  # no directory: nothing, not a fallback
        assert isinstance(got, packets.Error) and got.code == NOT_FOUND


async def test_non_utf8_name_reaches_the_filesystem_exactly(root: Path) -> None:
    async with running(root) as (_server, addr):
        assert await fetch_raw(addr, request_bytes(RAW_NAME), bind=A) == b"raw bytes name\n"
        got = await fetch_raw(addr, request_bytes(b"\xff\xfe-LATIN1.bin"), bind=A)
        assert isinstance(got, packets.Error) and got.code == NOT_FOUND
        got = await fetch_raw(addr, request_bytes(b"\xc0\xae\xc0\xae/" + B.encode()
                                                  + b"/secret-b"), bind=A)  # overlong '.'
        assert isinstance(got, packets.Error) and got.code == NOT_FOUND


@pytest.mark.parametrize("mode, code, want", [
    ("OcTeT", FOUND, A.encode() + b"\n"),
    ("NetAscii", FOUND, A.encode() + b"\r\n"),
    ("mail", ILLEGAL, "transfer mode 'mail' is not supported"),
    ("octet ", ILLEGAL, "is not supported"),
    ("binary", ILLEGAL, "is not supported"),
])
async def test_modes(root: Path, mode: str, code: int, want: bytes | str) -> None:
    async with running(root) as (_server, addr):
        got = await fetch(addr, "whoami", bind=A, mode=mode)
        if code == FOUND:
            assert got == want
        else:
            assert isinstance(got, packets.Error) and got.code == code, got
            assert isinstance(want, str) and want in got.message
        assert await fetch(addr, "whoami", bind=A) == A.encode() + b"\n"


@pytest.mark.parametrize("raw, code, fragment", [
    # a NUL inside the name ends it: what follows is read as the mode and refused
    (b"\0\x01whoami\0../" + B.encode() + b"/secret-b\0octet\0", ILLEGAL, "is not supported"),
    # a NUL smuggled before the mode: the mode is checked first, so refused either way
    (request_bytes(b"../" + B.encode() + b"/secret-b\0junk"), ILLEGAL, "'junk'"),
    (b"\0\x01\0octet\0", ILLEGAL, "empty file name"),
    (b"\0\x01whoami", ILLEGAL, "without NUL-terminated"),
    (b"\0\x01whoami\0\xffoctet\0", ILLEGAL, "not ASCII"),
    (b"\0\x02whoami\0octet\0", DENIED, "uploads are not supported"),
    (b"\0\x02../" + B.encode() + b"/secret-b\0octet\0", DENIED, "uploads are not supported"),
    (b"\0\x09whoami\0octet\0", ILLEGAL, "unknown opcode"),
])
async def test_malformed_requests(root: Path, raw: bytes, code: int, fragment: str) -> None:
    async with running(root) as (_server, addr):
        got = await fetch_raw(addr, raw, bind=A)
        assert isinstance(got, packets.Error), got
        assert got.code == code and fragment in got.message, got
        assert await fetch(addr, "whoami", bind=A) == A.encode() + b"\n"


async def test_flat_mode_still_confined_to_the_root(root: Path, tmp_path: Path) -> None:
    """--flat: one tree for everybody (so B's directory is readable by design), but never
    anything outside --root."""
    (root / "escape").symlink_to(tmp_path / "outside" / "host-secret")
    async with running(root, flat=True) as (_server, addr):
        assert await fetch(addr, f"{B}/secret-b", bind=A) == SECRET_B  # shared tree
        for name, code in ((f"{A}/../{B}/secret-b", DENIED), ("../outside/host-secret", DENIED),
                           ("escape", DENIED), (f"{A}/passwd", DENIED),
                           (f"{A}/link-host", DENIED), ("/etc/passwd", NOT_FOUND)):
            got = await fetch(addr, name, bind=A)
            assert isinstance(got, packets.Error) and got.code == code, (name, got)
        assert await fetch(addr, f"{A}/whoami", bind=A) == A.encode() + b"\n"


async def test_symlinked_client_directory_is_the_operators_choice(root: Path) -> None:
    """`<root>/127.0.0.12 -> 127.0.0.11`: documented sharing (docs/tftpd.md), so .12 reads B's
    files; a link *below* it that leaves B's directory is still refused."""
    (root / NOBODY).symlink_to(B)
    (root / B / "up").symlink_to(f"../{A}/whoami")
    async with running(root) as (_server, addr):
        assert await fetch(addr, "whoami", bind=NOBODY) == B.encode() + b"\n"
        got = await fetch(addr, "up", bind=NOBODY)
        assert isinstance(got, packets.Error) and got.code == DENIED


async def test_another_address_cannot_steer_a_transfer(root: Path) -> None:
    """B sends ACKs (and junk) to A's transfer port: B gets nothing, A's transfer is intact."""
    big = bytes(range(256)) * 300  # 76800 bytes: 151 blocks
    (root / A / "big").write_bytes(big)
    async with running(root) as (_server, addr):
        with RawClient(addr, bind=A) as a, RawClient(addr, bind=B) as b:
            a.rrq("big")
            first = await a.expect(packets.Data)
            assert a.peer is not None
            for blk in (1, 2, 3, 1, 0):
                b.send_raw(packets.encode_ack(blk), a.peer)
            b.send_raw(request_bytes(f"../{B}/secret-b".encode()), a.peer)
            b.send_raw(b"\0\x05\0\0stop\0", a.peer)  # a forged ERROR must not abort A
            assert [p for p in await b.quiet(0.4) if isinstance(p, packets.Data)] == []
            assert await receive_rest(a, first) == big
