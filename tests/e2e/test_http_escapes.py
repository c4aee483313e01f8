"""Escapes through the HTTP recipe (issue 11): the escape corpus sent to nginx over a real mount.

nginx runs with the docs/recipes.md server block (`root /run/vfsroot/$remote_addr;`, from
tests/e2e/harness.py) over a real `vfsroot serve` mount of the corpus' source root
(tests/security/escape_corpus.py: two clients, each with a secret the other must not get, a
host file outside the source root, symlinks in both client directories that lead out).

Both clients, 127.0.0.10 and 127.0.0.11, send every attempt aimed at the other one, as an HTTP
request target in up to three spellings:

* ``raw``: ``/`` + the name's bytes as they are (only names made of printable ASCII without
  ``?`` and ``#``: the rest cannot stand in a request line);
* ``encoded``: every byte but unreserved ones and ``/`` percent-encoded (RFC 3986 section 2.1);
* ``encoded-slash``: ``/`` encoded too (``%2F``), so the separators exist only after nginx
  decodes the path.

Plus a control class, ``inside``: spellings that stay inside the client's own tree (``./``,
``sub/../``, doubled slashes, an encoded letter).  What must happen, per class:

* ``inside``: 200 with exactly the asking client's own ``whoami`` (sha256-equal bytes);
* every class of the corpus: a 4xx refusal, never 2xx/3xx/5xx, and no byte of any secret in the
  answer.  `STATUSES` states which 4xx each class gets (400: nginx refuses a ``..`` that climbs
  above the root, a NUL or a malformed request; 403: a directory (``autoindex off``); 404: a
  name the client's view does not have, including every symlink that leads out, since vfsroot
  never exposes those; 414: a request line longer than nginx's header buffers).

Requests are written on a plain socket bound to the client's address (no HTTP library
normalises them), one connection each.  The test prints the corpus size.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..security.escape_corpus import CLASSES, A, B, attempts, build_tree, leaks, secrets
from .harness import VfsrootMount, nginx_serving, tail, world_traversable_mount

pytestmark = pytest.mark.e2e

#: The 4xx statuses each class may get (see the module docstring for why each); within
#: them, `expected_status` says which one each attempt gets.
STATUSES: dict[str, set[int]] = {
    "traversal": {400, 403, 404},
    "encoded": {400, 404},
    "absolute": {404},
    "other-client": {404},
    "control": {400, 404},
    "over-long": {400, 404},
    "symlink": {404},
}


def expected_status(target: bytes) -> int:
    """What the recipe must answer to a corpus attempt: nginx decodes the path once
    (`%2F` included), then refuses a NUL or a `..` that climbs above the root (400); what
    stays inside names either a directory of the view (403, no autoindex) or nothing the
    view has (404: every corpus name that stays inside the view is missing or an escaping
    symlink, which vfsroot never shows)."""
    path = urllib.parse.unquote_to_bytes(target)
    if b"\0" in path:
        return 400
    stack: list[bytes] = []
    for seg in path.split(b"/"):
        if seg in (b"", b"."):
            continue
        if seg == b"..":
            if not stack:
                return 400
            stack.pop()
            continue
        stack.append(seg)
    return 403 if stack in ([], [b"sub"]) else 404

#: Request targets naming the asking client's own `whoami` (class "inside": must be served,
#: exactly), plain and encoded.
INSIDE = [b"/whoami", b"/./whoami", b"/sub/../whoami", b"/sub//..//whoami", b"//whoami",
          b"/%77hoami", b"/sub/./../whoami", b"/%2e/whoami", b"/sub/%2e%2e/whoami",
          b"/sub%2F..%2Fwhoami", b"/sub%2f%2E%2E%2fwhoami"]


def spellings(name: bytes) -> list[tuple[str, bytes]]:
    """The request targets of one attempt (see the module docstring)."""
    out = []
    if all(0x21 <= c <= 0x7E for c in name) and b"?" not in name and b"#" not in name:
        out.append(("raw", b"/" + name))
    out.append(("encoded", b"/" + urllib.parse.quote_from_bytes(name, safe="/").encode()))
    slashless = b"/" + urllib.parse.quote_from_bytes(name, safe="").encode()
    if slashless not in (t for _, t in out):
        out.append(("encoded-slash", slashless))
    return out


def get(port: int, target: bytes, client: str) -> tuple[int, bytes]:
    """(status, body) of `GET target` from `client`, the target sent byte for byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(client, 0)) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: boot\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1."), f"no HTTP answer to {target[:80]!r}: {data[:200]!r}"
    return int(head.split()[1]), body


@dataclass(frozen=True)
class Nginx:
    port: int
    log: Path


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if os.geteuid() != 0:
        pytest.skip("needs root: FUSE mount with allow_other, nginx workers as nobody")
    if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
        pytest.skip("nginx missing (nginx-light)")
    work = tmp_path_factory.mktemp("http-escapes")
    source = work / "source"
    build_tree(source, work / "outside", secret_a=True)
    mount = world_traversable_mount("vfsroot-escapes-")
    log = work / "nginx.log"
    try:
        with VfsrootMount(source, mount, work / "vfsroot.log", extra=("--no-disks",)), \
                nginx_serving(mount, work / "nginx", log, "/whoami", A,
                              A.encode() + b"\n") as port:
            yield Nginx(port, log)
    finally:
        shutil.rmtree(mount.parent, ignore_errors=True)


def test_http_escape_corpus_is_refused_for_two_clients(nginx: Nginx) -> None:
    secret_list = secrets()
    bad: list[str] = []
    seen: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    sent = 0
    for client, other, secret in ((A, B, "secret-b"), (B, A, "secret-a")):
        own = client.encode() + b"\n"
        for target in INSIDE:
            status, body = get(nginx.port, target, client)
            sent += 1
            seen["inside"][status] += 1
            if (status, hashlib.sha256(body).digest()) != (200, hashlib.sha256(own).digest()):
                bad.append(f"{client} inside {target!r}: {status}, not its own whoami")
        for kind, name in attempts(other, secret):
            for form, target in spellings(name):
                status, body = get(nginx.port, target, client)
                sent += 1
                seen[kind][status] += 1
                leaked = leaks(body, secret_list)
                if status not in STATUSES[kind] or status != expected_status(target) \
                        or leaked:
                    bad.append(f"{client} {kind}/{form} {target[:60]!r}: {status} "
                               f"({len(body)} bytes{', A SECRET' if leaked else ''})")
    corpus = len(attempts())
    print(f"\nHTTP escape corpus: {corpus} attempts x 2 clients, {sent} requests "
          f"(raw / encoded / encoded-slash spellings, and {len(INSIDE)} inside ones); "
          f"refused or own file only: {sent - len(bad)}, wrong: {len(bad)}")
    for kind in ("inside", *CLASSES):
        print(f"  {kind}: " + ", ".join(f"{s} x{n}" for s, n in sorted(seen[kind].items())))
    assert not bad, "\n".join(bad) + "\n" + tail(nginx.log)
    assert set(seen) == {"inside", *CLASSES}
    assert sent > 2 * corpus * 2
