"""The escape corpus (issue 11): traversal attempts every door must refuse, in one place.

`tests/security/test_escapes.py` sends it through vfsroot-tftpd (over the mount and over the
plain source root) and through the FUSE tree; `tests/e2e/test_http_escapes.py` sends it through
nginx per the docs/recipes.md recipe.  Each attempt is the bytes of a file name relative to the
asking client's root, tagged with its class (what kind of escape it tries), so a door can state
per class what it answers.

`build_tree` makes the source root the attempts aim at: two clients, each with a secret the
other must never get, a host file outside the source root, and symlinks in both client
directories that lead out (a host file, /etc/passwd, /etc, /proc, /, a chain that leaves and
comes back out, a relative climb, a loop).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

#: Clients: two "machines" on loopback (same addresses as tests/security/tftp.py).
A = "127.0.0.10"
B = "127.0.0.11"

SECRET_B = b"B's secret: never for A\n"
SECRET_A = b"A's secret: never for B\n"
HOST_SECRET = b"host file outside the source root\n"

#: The classes of `attempts()`, in corpus order.
CLASSES = ("traversal", "encoded", "absolute", "other-client", "control", "over-long",
           "symlink")


def attempts(other: str = B, secret: str = "secret-b") -> list[tuple[str, bytes]]:
    """Every attempt as (class, name) for a client whose neighbour is `other`, holding
    `secret` (a file name in its directory)."""
    o = other.encode()
    s = secret.encode()
    targets = [o + b"/" + s, b"outside/host-secret", b"etc/passwd"]
    out: list[tuple[str, bytes]] = []

    def add(kind: str, names: list[bytes]) -> None:
        out.extend((kind, n) for n in names)

    ups = [b"../", b"../../", b"../../../../../../", b"..\\", b"..\\..\\", b"./../",
           b"sub/../../", b"sub\\..\\..\\", b"//..//", b"/../", b".../../", b"..//"]
    add("traversal", [up + t for up in ups for t in targets])
    add("traversal", [b"..", b"../", b"..\\", b"sub/..", b"sub/../..", b"./.."])
    # encoded and look-alike forms: plain names to a TFTP server, never decoded into ".."/"/"
    for enc in (b"%2e%2e/", b"%2e%2e%2f", b"%2E%2E%5C", b"..%2f", b"..%5c", b"%252e%252e/",
                b"..%00/", b"..%c0%af", b"%c0%ae%c0%ae/", b"\xef\xbc\x8e\xef\xbc\x8e/",
                b"..\xe2\x88\x95", b"\xc0\xae\xc0\xae/", b"..;/", b".%2e/", b"%2e./"):
        add("encoded", [enc + o + b"/" + s, enc + b"outside/host-secret"])
    add("absolute", [b"/etc/passwd", b"/etc/shadow", b"/proc/self/environ",
                     b"/proc/1/root/etc/passwd", b"//etc/passwd", b"\\etc\\passwd",
                     b"C:\\Windows\\win.ini", b"file:///etc/passwd", b"~/.ssh/id_rsa",
                     b"~root/.bashrc"])
    # the neighbour's IP in the path (a client has no such directory in its view)
    add("other-client", [o + b"/" + s, b"/" + o + b"/" + s, b"\\" + o + b"\\" + s,
                         b"127.0.0.1/" + o + b"/" + s, b"default/../" + o + b"/" + s,
                         b"::ffff:" + o + b"/" + s, o.replace(b".0.0.", b".0.0.0") + b"/" + s,
                         s])
    add("control", [b"whoami\x00../" + o + b"/" + s, b"..\x00/" + s, b"\x00", b"who\nami",
                    b"who\rami", b"whoami\x7f", b"\x1b[2J", b"sub/\x01"])
    add("over-long", [b"a" * 256, b"a" * 4096, b"a/" * 600, b"../" * 400 + b"etc/passwd",
                      b"\xc3\xa9" * 300, b"sub/" + b"b" * 300])
    add("symlink", [b"link-host", b"link-passwd", b"link-etc/passwd", b"link-etc/shadow",
                    b"link-chain", b"link-up-host", b"link-proc/self/environ",
                    b"link-root/etc/passwd", b"link-loop", b"sub/link-host"])
    names = [n for _, n in out]
    assert len(names) == len(set(names)), "duplicates in the corpus"
    return out


#: The corpus of client A (its neighbour B holds `secret-b`), as file names.
CORPUS = [name for _, name in attempts()]


def fuse_applicable(name: bytes) -> bool:
    """The attempts the kernel hands to vfsroot as such (not absolute, no `..` component, no
    NUL); the kernel resolves the others itself, so the server in front must refuse them."""
    return not name.startswith(b"/") and b".." not in name.split(b"/") and b"\0" not in name


def secrets() -> list[bytes]:
    """Every byte string no attempt may return (the secrets and readable host files)."""
    out = [SECRET_A, SECRET_B, HOST_SECRET]
    for host in ("/etc/passwd", "/etc/shadow", "/root/.bashrc"):
        with contextlib.suppress(OSError):
            out.append(Path(host).read_bytes())
    return [s for s in out if s]


def leaks(got: bytes, secret_list: list[bytes]) -> bool:
    """`got` holds a secret, or is a non-empty piece of one."""
    return any(s in got or (got and got in s) for s in secret_list)


def build_tree(src: Path, outside: Path, secret_a: bool = False) -> None:
    """The source root of the corpus: `default/`, A and B (each with `whoami` and `sub/`),
    B's `secret-b` (and A's `secret-a` with `secret_a`), and the escaping symlinks in A's
    directory (in both with `secret_a`, so either client can be the attacker)."""
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "host-secret").write_bytes(HOST_SECRET)
    (outside / "hop").symlink_to(outside / "host-secret")
    (src / "default").mkdir(parents=True)
    (src / "default" / "kernel").write_bytes(b"default kernel\n")
    a, b = src / A, src / B
    for d, ip in ((a, A), (b, B)):
        (d / "sub").mkdir(parents=True)
        (d / "whoami").write_bytes(ip.encode() + b"\n")
    (b / "secret-b").write_bytes(SECRET_B)
    if secret_a:
        (a / "secret-a").write_bytes(SECRET_A)
    for d in (a, b) if secret_a else (a,):
        (d / "link-host").symlink_to(outside / "host-secret")
        (d / "link-passwd").symlink_to("/etc/passwd")
        (d / "link-etc").symlink_to("/etc")
        (d / "link-chain").symlink_to(outside / "hop")
        (d / "link-up-host").symlink_to("../../outside/host-secret")
        (d / "link-proc").symlink_to("/proc")
        (d / "link-root").symlink_to("/")
        (d / "link-loop").symlink_to("link-loop")
        (d / "sub" / "link-host").symlink_to("../../../outside/host-secret")
