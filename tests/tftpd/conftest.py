"""Fixtures for the TFTP tests: a per-client tree and large files built once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_file

#: Client identities: each is a "different machine" on loopback.
CLIENT_A = "127.0.0.10"
CLIENT_B = "127.0.0.11"
LOCAL = "127.0.0.1"  # what tftp-hpa/atftp/busybox send from (they cannot choose an address)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """<root>/<ip>/ for three clients, each with its own files and a shared name."""
    root = tmp_path / "root"
    for ip in (CLIENT_A, CLIENT_B, LOCAL):
        d = root / ip
        (d / "pxelinux.cfg").mkdir(parents=True)
        (d / "whoami").write_text(ip + "\n")
        (d / "pxelinux.cfg" / "default").write_text(f"DEFAULT {ip}\n")
        (d / "subdir").mkdir()
        (d / "empty").write_bytes(b"")
        (d / "exact512").write_bytes(bytes(range(256)) * 2)
    make_file(root / CLIENT_A / "secret-a", 70_000, seed=10)
    make_file(root / CLIENT_B / "secret-b", 70_000, seed=11)
    for ip in (CLIENT_A, LOCAL):
        make_file(root / ip / "big.bin", 3_000_000, seed=1)
        make_file(root / ip / "1m.bin", 1 << 20, seed=2)
    return root


@pytest.fixture(scope="session")
def rollover_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 33 MiB file: more than 65535 blocks of 512 bytes, so block numbers wrap to 0."""
    root = tmp_path_factory.mktemp("rollover")
    digest = make_file(root / LOCAL / "33m.bin", 33 * 1024 * 1024 + 123, seed=33)
    return root, digest
