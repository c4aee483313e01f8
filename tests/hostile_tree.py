"""Two clients' directories, with every kind of name that tries to leave one of them.

Shared by the path tests of the whole server (tests/security/test_tftp_paths.py) and of the
inline open (tests/tftpd/test_inline_open.py), so both hold the same tree to the same rules.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SECRET_B = b"B's secret: must never reach A\n"
DECOY = b"A's own directory named like B\n"


def make_hostile_tree(root: Path, outside: Path, a_ip: str, b_ip: str) -> None:
    """``root/<a_ip>`` and ``root/<b_ip>``, and a file ``outside`` the root.

    In A's directory: its own files, a sub-directory named like B (a decoy: A's own), and
    symlinks that stay inside (``link-ok``), lead to B's files (relative, absolute, through a
    directory), to the host (``passwd``, ``hostdir``, ``link-host``), up (``dir-up``), to
    themselves (``self-dir``, ``loop``), nowhere (``dangling``); a FIFO and a device node."""
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "host-secret").write_bytes(b"host file outside the tftp root\n")
    a, b = root / a_ip, root / b_ip
    for d, ip in ((a, a_ip), (b, b_ip)):
        (d / "sub").mkdir(parents=True)
        (d / "whoami").write_bytes(ip.encode() + b"\n")
        (d / "sub" / "inner").write_bytes(b"inner of " + ip.encode() + b"\n")
    (b / "secret-b").write_bytes(SECRET_B)
    (a / b_ip).mkdir()
    (a / b_ip / "secret-b").write_bytes(DECOY)
    (a / "link-ok").symlink_to("sub/inner")
    (a / "link-b").symlink_to(f"../{b_ip}/secret-b")
    (a / "link-abs-b").symlink_to(b / "secret-b")
    (a / "link-host").symlink_to(outside / "host-secret")
    (a / "passwd").symlink_to("/etc/passwd")
    (a / "hostdir").symlink_to("/etc")
    (a / "dir-b").symlink_to(f"../{b_ip}")
    (a / "dir-up").symlink_to("..")
    (a / "self-dir").symlink_to(".")
    (a / "loop").symlink_to("loop")
    (a / "dangling").symlink_to("nowhere")
    os.mkfifo(a / "fifo")
    os.mknod(a / "devzero", stat.S_IFCHR | 0o644, os.makedev(1, 5))
