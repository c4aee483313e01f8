"""LocalLayer: symlinks confined to the source root, exact-length reads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from vfsroot.layers.base import Kind
from vfsroot.layers.local import LocalLayer


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """tmp/src/{default,10.0.0.5}/... and tmp/outside/secret."""
    root = tmp_path / "src"
    (root / "default" / "boot").mkdir(parents=True)
    (root / "default" / "boot" / "vmlinuz").write_bytes(b"shared kernel")
    (root / "default" / "common").write_bytes(b"common")
    client = root / "10.0.0.5"
    client.mkdir()
    (client / "own").write_bytes(b"own file")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    return root


def client_layer(src: Path) -> LocalLayer:
    return LocalLayer("client", src / "10.0.0.5", src)


def link(src: Path, name: str, target: str) -> None:
    os.symlink(target, src / "10.0.0.5" / name)


async def test_plain_file_and_dir_nodes(src: Path) -> None:
    layer = LocalLayer("default", src / "default", src)
    node = await layer.lookup(("boot", "vmlinuz"))
    assert node is not None
    assert (node.kind, node.size, node.layer) == (Kind.FILE, 13, "default")
    assert node.source == str(src / "default" / "boot" / "vmlinuz")
    d = await layer.lookup(("boot",))
    assert d is not None and d.kind is Kind.DIR and d.size == 0
    assert await layer.lookup(("nothing",)) is None
    assert await layer.lookup(("common", "below-a-file")) is None
    assert sorted(await layer.listdir(())) == ["boot", "common"]


async def test_relative_symlink_inside_the_root_is_followed(src: Path) -> None:
    link(src, "common", "../default/common")
    node = await client_layer(src).lookup(("common",))
    assert node is not None and node.kind is Kind.FILE
    assert node.source == str(src / "default" / "common")
    reader = await client_layer(src).open(("common",))
    try:
        assert await reader.read(0, 100) == b"common"
    finally:
        await reader.close()


async def test_absolute_symlink_inside_the_root_is_followed(src: Path) -> None:
    link(src, "k", str(src / "default" / "boot" / "vmlinuz"))
    node = await client_layer(src).lookup(("k",))
    assert node is not None and node.size == 13


async def test_file_below_a_symlinked_directory_is_followed(src: Path) -> None:
    link(src, "boot", "../default/boot")
    layer = client_layer(src)
    d = await layer.lookup(("boot",))
    assert d is not None and d.kind is Kind.DIR
    node = await layer.lookup(("boot", "vmlinuz"))
    assert node is not None and node.source == str(src / "default" / "boot" / "vmlinuz")
    assert list(await layer.listdir(("boot",))) == ["vmlinuz"]


async def test_source_root_reached_through_a_symlink_still_confines(tmp_path: Path,
                                                                     src: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(src)
    link(src, "common", "../default/common")
    link(src, "out", "../../outside/secret")
    layer = LocalLayer("client", alias / "10.0.0.5", alias)
    assert await layer.lookup(("common",)) is not None
    assert await layer.lookup(("out",)) is None


@pytest.mark.parametrize(
    "target",
    ["/etc/passwd", "../../outside/secret", "../../outside", "/", "..//../outside/secret",
     "/etc"],
)
async def test_escaping_symlinks_are_absent(src: Path, target: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    link(src, "out", target)
    layer = client_layer(src)
    with caplog.at_level(logging.WARNING, logger="vfsroot.layers.local"):
        assert await layer.lookup(("out",)) is None
    assert "escapes the source root" in caplog.text
    assert "out" not in await layer.listdir(())
    assert await layer.lookup(("out", "passwd")) is None
    assert await layer.lookup(("out", "secret")) is None
    assert await layer.listdir(("out",)) == {}
    with pytest.raises(FileNotFoundError):
        await layer.open(("out",))


async def test_symlinked_parent_escaping_is_absent(src: Path) -> None:
    link(src, "etc", "/etc")
    assert await client_layer(src).lookup(("etc", "passwd")) is None
    assert await client_layer(src).lookup(("etc", "hostname")) is None


async def test_broken_symlink_is_absent(src: Path) -> None:
    link(src, "broken", "../default/nothing-here")
    layer = client_layer(src)
    assert await layer.lookup(("broken",)) is None
    assert sorted(await layer.listdir(())) == ["own"]


@pytest.mark.parametrize("pair", [("loop", "loop"), ("a", "b")])
async def test_symlink_loops_are_absent(src: Path, pair: tuple[str, str]) -> None:
    a, b = pair
    link(src, a, b)
    if a != b:
        link(src, b, a)
    layer = client_layer(src)
    assert await layer.lookup((a,)) is None
    assert await layer.lookup((b,)) is None
    assert await layer.lookup((a, "x")) is None
    assert sorted(await layer.listdir(())) == ["own"]


async def test_fifo_is_absent(src: Path) -> None:
    os.mkfifo(src / "10.0.0.5" / "fifo")
    assert await client_layer(src).lookup(("fifo",)) is None


async def test_reads_are_exact(src: Path) -> None:
    data = os.urandom(300_001)
    (src / "10.0.0.5" / "big").write_bytes(data)
    reader = await client_layer(src).open(("big",))
    try:
        assert reader.node.size == len(data)
        assert await reader.read(0, len(data)) == data
        assert await reader.read(100, 1000) == data[100:1100]
        assert await reader.read(len(data) - 10, 4096) == data[-10:]
        assert await reader.read(len(data), 4096) == b""
        assert await reader.read(len(data) + 5000, 10) == b""
    finally:
        await reader.close()


async def test_short_preads_are_retried_to_exact_length(src: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 100
    (src / "10.0.0.5" / "f").write_bytes(data)
    real_pread = os.pread
    calls = []

    def short_pread(fd: int, size: int, offset: int) -> bytes:
        calls.append(size)
        return real_pread(fd, min(size, 7), offset)

    reader = await client_layer(src).open(("f",))
    monkeypatch.setattr(os, "pread", short_pread)
    try:
        assert await reader.read(3, 1000) == data[3:1003]
        assert len(calls) > 100
        assert await reader.read(len(data) - 5, 1000) == data[-5:]
    finally:
        await reader.close()


async def test_open_file_keeps_its_content_when_replaced(src: Path) -> None:
    path = src / "10.0.0.5" / "own"
    reader = await client_layer(src).open(("own",))
    try:
        tmp = path.with_name("own.new")
        tmp.write_bytes(b"NEW CONTENT!")
        tmp.rename(path)
        assert await reader.read(0, 100) == b"own file"
    finally:
        await reader.close()


async def test_client_directory_symlinked_outside_is_empty(tmp_path: Path, src: Path) -> None:
    os.symlink(tmp_path / "outside", src / "10.0.0.9")
    layer = LocalLayer("client", src / "10.0.0.9", src)
    assert await layer.lookup(()) is None
    assert await layer.lookup(("secret",)) is None
    assert await layer.listdir(()) == {}
