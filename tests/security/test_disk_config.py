"""Disk configs (`SRC/<ip>.nbd`): whole-name matching and no option injection into qemu or
libguestfs.  No appliance is launched: everything here is decided before one would be."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from vfsroot.config import ConfigError, load_config, parse_config, parse_url
from vfsroot.disks import DiskManager, DiskOptions
from vfsroot.names import client_of_config, is_client_name
from vfsroot.sources import SourceRoot

MOUNTS = [{"partition": 1, "mountpoint": "/"}]


def config_text(url: str, **extra: object) -> str:
    return json.dumps({"url": url, "mounts": MOUNTS, **extra})


def test_a_client_never_gets_a_longer_names_disk(tmp_path: Path) -> None:
    """rtftp's fault (docs/clients.md, "rtftp"): 10.0.0.1 matched 10.0.0.10.nbd by prefix."""
    for name in ("10.0.0.10", "10.0.0.100", "10.0.0.1x", "10.0.0.1.bak", "010.0.0.1"):
        (tmp_path / f"{name}.nbd").write_text(config_text("nbd://127.0.0.1:1/x"))
    (tmp_path / "10.0.0.1.nbd.nbd").write_text(config_text("nbd://127.0.0.1:1/x"))
    m = DiskManager(tmp_path, DiskOptions())
    for client in ("10.0.0.1", "10.0.0.1.nbd", "10.0.0.01", "../10.0.0.10", "10.0.0.1 "):
        assert m.layer_for(client) is None, client
    assert m.layer_for("10.0.0.10") is not None
    assert SourceRoot(tmp_path).clients() == ["10.0.0.10", "10.0.0.100"]


@pytest.mark.parametrize("filename, client", [
    ("10.0.0.1.nbd", "10.0.0.1"),
    ("fe80::1.nbd", "fe80::1"),
    ("10.0.0.1.NBD", None),
    ("10.0.0.1.nbd ", None),
    (" 10.0.0.1.nbd", None),
    ("010.0.0.1.nbd", None),
    ("10.0.0.01.nbd", None),
    ("FE80::1.nbd", None),
    ("fe80:0::1.nbd", None),
    ("fe80::1%eth0.nbd", None),
    ("::ffff:10.0.0.1.nbd", None),  # not canonical: Python prints ::ffff:a00:1
    (".nbd", None),
    ("10.0.0.1.nbd.nbd", None),
    ("../10.0.0.1.nbd", None),
    ("10.0.0.1/.nbd", None),
    ("default.nbd", None),
])
def test_config_names_are_whole_canonical_addresses(filename: str, client: str | None) -> None:
    assert client_of_config(filename) == client


@pytest.mark.parametrize("name", [
    "10.0.0.1 ", " 10.0.0.1", "010.0.0.1", "10.0.0.01", "10.0.0.1.", "10.0.0.1\0",
    "::ffff:10.0.0.1", "FE80::1", "fe80::0001", "fe80::1%eth0", "0x0a.0.0.1", "167772161",
    "10.1", "10.0.0.1/32", "..", ".", "", "default", "10.0.0.1/../10.0.0.2",
])
def test_only_canonical_client_names(name: str) -> None:
    assert not is_client_name(name)


@pytest.mark.parametrize("url", [
    "nbd://h:1/x,file=/etc/passwd",
    "nbd://h:1/x%2Cfile%3D%2Fetc%2Fpasswd",
    "nbd://h:1/x:file=/etc/passwd",
    "nbd://h:1/x?file=/etc/passwd",
    "nbd://h:1/x#/etc/passwd",
    "nbd://h,file=/etc/passwd:1/x",
    "nbd://h:1,file=x/x",
    "nbd://-oProxyCommand=x:1/x",
    "nbd://h:1/x y",
    "nbd://h:1/x\nfile=/etc/passwd",
    "nbd://h:1/x%0Afile",
    "nbd://h:1/x%00",
    "nbd://user:pw@h:1/x",
    "nbd://h:0/x",
    "nbd://h:99999/x",
    "nbd:///x",
    "nbd+unix:///x?socket=/etc/passwd,foo",
    "nbd+unix:///x?socket=/tmp/s&socket=/tmp/t",
    "nbd+unix:///x?socket=/tmp/s&file=/etc/passwd",
    "nbd+unix:///x?socket=relative/s",
    "nbd+unix:///x?socket=/tmp/s:x",
    "nbd+unix://h/x?socket=/tmp/s",
    "nbd+unix:///x",
    "nbds://h:1/x",
    "file:///etc/passwd",
    "json:{\"file.filename\":\"/etc/passwd\"}",
    "/etc/passwd",
    "",
])
def test_url_injection_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_url(url, "SRC/10.0.0.1.nbd")
    text = str(info.value)
    assert "10.0.0.1.nbd" in text and "url" in text and "\n" not in text


@pytest.mark.parametrize("url, server, export", [
    ("nbd://10.0.0.5:10809/root", "tcp:10.0.0.5:10809", "root"),
    ("nbd://[::1]:10809/root", "tcp:[::1]:10809", "root"),
    ("nbd://nbd-host/a/b", "tcp:nbd-host:10809", "a/b"),
    ("nbd+unix:///x?socket=/run/../etc/passwd", "unix:/etc/passwd", "x"),  # operator's path
])
def test_accepted_urls_render_to_one_server_and_export(url: str, server: str,
                                                       export: str) -> None:
    u = parse_url(url)
    assert (u.server, u.export) == (server, export)
    assert "," not in u.server and "," not in u.export


@pytest.mark.parametrize("tftp_root", ["/boot/../etc", "boot", "/boot\n", "/" + "a" * 1025])
def test_tftp_root_cannot_be_steered(tftp_root: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(config_text("nbd://h/x", tftp_root=tftp_root))


def test_random_configs_only_ever_raise_config_error(tmp_path: Path) -> None:
    """Garbage in a config is a ConfigError naming the file, never a crash of the daemon."""
    rng = random.Random(4242)
    pieces = ['{', '}', '[', ']', '"url"', '"mounts"', '"tftp_root"', ':', ',', '"nbd://h/x"',
              '1', '-1', '1e999', 'null', 'true', '"\\u0000"', '"\\ud800"', '{"partition":1,'
              '"mountpoint":"/"}', '"lv"', '"vg/lv"', '"device"', '"/dev/sda1"', '"/"']
    path = tmp_path / "10.0.0.1.nbd"
    for i in range(3000):
        if i % 3 == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        else:
            data = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 14))).encode()
        path.write_bytes(data)
        try:
            load_config(path)
        except ConfigError as e:
            assert "10.0.0.1.nbd" in str(e)
    path.write_bytes(b"{" * 100_000)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)
    # deeply nested JSON: see test_config_crash.py (xfail, a real crash)
