"""Pure unit tests of `.nbd` parsing: strict, errors that name the file and the field."""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import posixpath
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfsroot.config import (
    DEFAULT_NBD_PORT,
    ConfigError,
    MountSpec,
    NbdUrl,
    load_config,
    parse_config,
    parse_url,
)

GOOD = {
    "url": "nbd://10.10.10.10:25000/server_root",
    "mounts": [{"partition": 2, "mountpoint": "/"}, {"partition": 1, "mountpoint": "/boot"}],
    "tftp_root": "/boot",
}


def cfg(**changes: object) -> str:
    doc = dict(GOOD)
    for k, v in changes.items():
        if v is ...:
            doc.pop(k, None)
        else:
            doc[k] = v
    return json.dumps(doc)


def test_rtftp_example() -> None:
    c = parse_config(json.dumps(GOOD), "SRC/10.0.0.5.nbd")
    assert c.url == NbdUrl("tcp", "server_root", host="10.10.10.10", port=25000)
    assert c.url.server == "tcp:10.10.10.10:25000"
    assert str(c.url) == "nbd://10.10.10.10:25000/server_root"
    assert c.mounts == (MountSpec(2, None, "/"), MountSpec(1, None, "/boot"))
    assert c.tftp_root == "/boot"


@pytest.mark.parametrize(("url", "expected"), [
    ("nbd://host.example", NbdUrl("tcp", "", host="host.example", port=DEFAULT_NBD_PORT)),
    ("nbd://127.0.0.1:1234", NbdUrl("tcp", "", host="127.0.0.1", port=1234)),
    ("nbd://127.0.0.1:1234/", NbdUrl("tcp", "", host="127.0.0.1", port=1234)),
    ("nbd://[::1]:99/a/b", NbdUrl("tcp", "a/b", host="::1", port=99)),
    ("nbd+unix:///exp?socket=/run/nbd.sock", NbdUrl("unix", "exp", socket="/run/nbd.sock")),
    ("nbd+unix:///?socket=/tmp/s", NbdUrl("unix", "", socket="/tmp/s")),
])
def test_urls(url: str, expected: NbdUrl) -> None:
    assert parse_url(url) == expected
    assert parse_url(str(expected)) == expected  # canonical form round-trips


def test_ipv6_server_syntax() -> None:
    assert parse_url("nbd://[::1]:99/x").server == "tcp:[::1]:99"
    assert parse_url("nbd+unix:///x?socket=/s").server == "unix:/s"


@pytest.mark.parametrize("url", [
    "", "http://h/x", "nbds://h/x", "nbd://", "nbd:///x", "nbd://h:0/x", "nbd://h:70000/x",
    "nbd://user:pw@h/x", "nbd://h/x?socket=/s", "nbd://h/x#frag", "nbd://h/a,b",
    "nbd://h/a:b", "nbd://h/a b", "nbd://h/a%00b", "nbd://bad_host!/x", "nbd+unix:///x",
    "nbd+unix://host/x?socket=/s", "nbd+unix:///x?socket=rel", "nbd+unix:///x?socket=/a,b",
    "nbd+unix:///x?socket=/a&socket=/b", "nbd+unix:///x?socket=/s&tls=on", "-o evil",
    "nbd://h/x\n", 12, None, ["nbd://h"],
])
def test_bad_urls(url: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_url(url, "SRC/1.2.3.4.nbd")
    assert str(e.value).startswith("SRC/1.2.3.4.nbd: url: ")


@pytest.mark.parametrize(("text", "field"), [
    (cfg(url=...), "url"),
    (cfg(mounts=...), "mounts"),
    (cfg(mounts=[]), "mounts"),
    (cfg(mounts={"partition": 1}), "mounts"),
    (cfg(mounts=["/dev/sda1"]), "mounts[0]"),
    (cfg(mounts=[{"partition": "2", "mountpoint": "/"}]), "mounts[0].partition"),
    (cfg(mounts=[{"partition": True, "mountpoint": "/"}]), "mounts[0].partition"),
    (cfg(mounts=[{"partition": -1, "mountpoint": "/"}]), "mounts[0].partition"),
    (cfg(mounts=[{"partition": 2.0, "mountpoint": "/"}]), "mounts[0].partition"),
    (cfg(mounts=[{"mountpoint": "/"}]), "mounts[0]"),
    (cfg(mounts=[{"partition": 1, "lv": "vg/lv", "mountpoint": "/"}]), "mounts[0]"),
    (cfg(mounts=[{"partition": 1}]), "mounts[0].mountpoint"),
    (cfg(mounts=[{"partition": 1, "mountpoint": "boot"}]), "mounts[0].mountpoint"),
    (cfg(mounts=[{"partition": 1, "mountpoint": "/boot"}]), "mounts[0].mountpoint"),
    (cfg(mounts=[{"partition": 1, "mountpoint": "/"}, {"partition": 2, "mountpoint": "/"}]),
     "mounts[1].mountpoint"),
    (cfg(mounts=[{"partition": 1, "mountpoint": "/"}, {"partition": 2, "mountpoint": "/a"},
                 {"partition": 3, "mountpoint": "/a/"}]), "mounts[2].mountpoint"),
    (cfg(mounts=[{"partition": 1, "mountpoint": "/", "fstype": "ext4"}]), "mounts[0].fstype"),
    (cfg(mounts=[{"device": "/dev/vda1", "mountpoint": "/"}]), "mounts[0].device"),
    (cfg(mounts=[{"lv": "justlv", "mountpoint": "/"}]), "mounts[0].lv"),
    (cfg(mounts=[{"lv": "vg/l v", "mountpoint": "/"}]), "mounts[0].lv"),
    (cfg(tftp_root="boot"), "tftp_root"),
    (cfg(tftp_root="/boot/../etc"), "tftp_root"),
    (cfg(tftp_root=7), "tftp_root"),
    (cfg(extra=1), "extra"),
    ('{"url": "nbd://h/x", "url": "nbd://h/y", "mounts": []}', "url"),
])
def test_bad_configs_name_file_and_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "SRC/10.0.0.5.nbd")
    assert e.value.field == field
    assert str(e.value).startswith(f"SRC/10.0.0.5.nbd: {field}: ")


@pytest.mark.parametrize("text", ["", "[]", "null", "{", "\xff", b"\xff\xfe"])
def test_not_a_json_object(text: str | bytes) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "f.nbd")
    assert str(e.value).startswith("f.nbd: ")


def test_whole_disk_device_and_lv() -> None:
    c = parse_config(cfg(mounts=[{"partition": 0, "mountpoint": "/"},
                                 {"device": "/dev/sda3", "mountpoint": "/boot"},
                                 {"device": "/dev/sda", "mountpoint": "/boot/x"},
                                 {"lv": "vg0/root-lv", "mountpoint": "/srv"}]))
    assert [m.label for m in c.mounts] == ["whole disk", "partition 3", "whole disk",
                                           "lv vg0/root-lv"]
    assert c.mounts[3] == MountSpec(None, "vg0/root-lv", "/srv")


def test_defaults_and_normalisation() -> None:
    c = parse_config(cfg(tftp_root=...))
    assert c.tftp_root == "/"
    c = parse_config(cfg(tftp_root="//boot//efi/"))
    assert c.tftp_root == "/boot/efi"
    assert parse_config(cfg()) == parse_config(cfg())  # equality drives "config changed"
    assert parse_config(cfg()) != parse_config(cfg(tftp_root="/"))


def test_load_config(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "10.0.0.5.nbd"
    with pytest.raises(FileNotFoundError):
        load_config(p)
    p.write_text(cfg())
    assert load_config(p).tftp_root == "/boot"
    p.write_bytes(b" " * 70000)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(p)


_export = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789._~/+@=-", max_size=40)


@given(host=st.ip_addresses(v=4), port=st.integers(1, 65535), export=_export)
def test_tcp_url_round_trip(host: object, port: int, export: str) -> None:
    url = parse_url(f"nbd://{host}:{port}/{export}")
    assert (url.host, url.port, url.export) == (str(host), port, export)
    assert parse_url(str(url)) == url
    assert url.server == f"tcp:{host}:{port}"


#: What qemu's option parser or libguestfs' server syntax could read as a separator.
_SEPARATORS = ", \n\t\0"
_CLEAN = "abcdefghijklmnopqrstuvwxyzABC0123456789._~/+@=-"


@st.composite
def _name_from_parts(draw: st.DrawFn, max_size: int) -> tuple[str, str, bool]:
    """(text for the URL, the name it decodes to, whether a separator is in it): pieces of
    clean characters, some %-encoded, and sometimes a separator raw or %-encoded."""
    pieces = draw(st.lists(st.tuples(st.sampled_from(_CLEAN + _SEPARATORS), st.booleans()),
                           max_size=max_size))
    url, decoded = "", ""
    for char, encode in pieces:
        # the socket goes in a query, where a raw "+" would decode to a space: encode those
        url += f"%{ord(char):02X}" if encode or char == "+" else char
        decoded += char
    return url, decoded, any(c in _SEPARATORS for c in decoded)


_hostnames = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9]{1,6}){0,2}\Z")


@given(data=st.data(), transport=st.sampled_from(["tcp", "unix"]))
def test_urls_built_from_parts_are_accepted_exactly_when_clean(data: st.DataObject,
                                                               transport: str) -> None:
    """Every example is a URL built from parts, so both halves assert on every run: a URL
    whose parts are clean parses back to exactly those parts, and one with a separator
    anywhere (raw or %-encoded) is refused naming the field."""
    export_url, export, dirty = data.draw(_name_from_parts(30), label="export")
    if transport == "tcp":
        host, host_ok = data.draw(st.one_of(
            st.tuples(st.ip_addresses().map(str) | _hostnames, st.just(True)),
            st.tuples(st.builds(lambda h, sep: h + sep, _hostnames,
                                st.sampled_from([",", "%2C", "%20", "%0A", "%09", "%00", "\t"])),
                      st.just(False))), label="host")
        port = data.draw(st.none() | st.integers(1, 65535), label="port")
        netloc = (f"[{host}]" if ":" in host else host) + ("" if port is None else f":{port}")
        text = f"nbd://{netloc}/{export_url}"
        clean = not dirty and host_ok
    else:
        sock_url, sock, sock_dirty = data.draw(_name_from_parts(20), label="socket")
        text = f"nbd+unix:///{export_url}?socket=/{sock_url}"
        clean = not dirty and not sock_dirty
    try:
        url = parse_url(text)
    except ConfigError as e:
        assert e.field == "url"
        assert not clean, f"a clean URL was refused: {text!r}: {e}"
        return
    assert clean, f"a URL with a separator was accepted: {text!r} -> {url!r}"
    # whatever is accepted carries nothing qemu or libguestfs could read as a separator
    for part in (url.host, url.export, url.socket):
        assert not set(part) & set(_SEPARATORS)
    assert url.export == export
    if transport == "tcp":
        assert url.host == (_ipish(host) or host)
        assert url.port == (port or DEFAULT_NBD_PORT)
    else:
        assert url.socket == posixpath.normpath("/" + sock)
    if "+" not in url.socket:
        # (NbdUrl.__str__ writes the socket unquoted, and a query's "+" reads back as a
        # space: a known gap of the canonical form, reported, not papered over here)
        assert parse_url(str(url)) == url


@pytest.mark.parametrize(("field", "changes"), [
    ("url", {"url": "nbd://10.0.0.1/export%0A"}),
    ("url", {"url": "nbd+unix:///export?socket=/run/nbd.sock%0A"}),
    ("url", {"url": "nbd://host.example%0A/export"}),
    ("mounts[0].lv", {"mounts": [{"lv": "vg/lv\n", "mountpoint": "/"}]}),
    ("mounts[0].device", {"mounts": [{"device": "/dev/sda2\n", "mountpoint": "/"}]}),
])
def test_a_trailing_newline_is_refused_in_every_name(field: str, changes: dict) -> None:
    """Regular expressions anchored with `$` accept "name\\n"; every name must be whole."""
    with pytest.raises(ConfigError) as e:
        parse_config(cfg(**changes, tftp_root="/"), "x.nbd")
    assert e.value.field == field, e.value


def _ipish(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                        max_size=3),
                    max_leaves=10))
def test_arbitrary_json_never_crashes(doc: object) -> None:
    try:
        parse_config(json.dumps(doc), "x.nbd")
    except ConfigError as e:
        assert str(e).startswith("x.nbd: ")


def test_deeply_nested_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config(b"[" * 3000, "x.nbd")


def test_a_fifo_named_ip_nbd_is_an_error_not_a_stall(tmp_path: pathlib.Path) -> None:
    """The daemon reads configs on its event loop (watcher, poll, every lookup): a FIFO there
    would block every client's view until something wrote to it."""
    path = tmp_path / "10.0.0.1.nbd"
    os.mkfifo(path)
    result: list[object] = []

    def run() -> None:
        try:
            result.append(load_config(path))
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(2.0)
    stalled = t.is_alive()
    if stalled:  # release the blocked open() so the thread ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5.0)
    assert not stalled, "load_config blocked on a FIFO (the event loop would stall)"
    assert isinstance(result[0], ConfigError)
    assert "10.0.0.1.nbd" in str(result[0]) and "not a regular file" in str(result[0])


def test_an_ipv6_zone_cannot_carry_separators_into_the_server_string() -> None:
    with pytest.raises(ConfigError, match="zone"):
        parse_url("nbd://[fe80::1%eth0,file=x]:10809/root", "10.0.0.1.nbd")
    assert parse_url("nbd://[fe80::1%eth0]:10809/root", "10.0.0.1.nbd").port == 10809


@pytest.mark.parametrize("field, value", [
    ("tftp_root", "/boot\ud800"),
    ("mounts", [{"partition": 1, "mountpoint": "/"}, {"partition": 2, "mountpoint": "/\udc80"}]),
])
def test_a_path_that_is_not_unicode_text_is_a_config_error(field: str, value: object) -> None:
    """A lone surrogate would fail only at attach, as EIO retried with backoff."""
    with pytest.raises(ConfigError, match=field):
        parse_config(cfg(**{field: value}), "10.0.0.1.nbd")


def test_a_mount_that_would_hide_an_earlier_one_is_refused() -> None:
    """Mounted in the order listed, /boot over /boot/efi would hide the EFI filesystem."""
    mounts = [{"partition": 1, "mountpoint": "/"}, {"partition": 2, "mountpoint": "/boot/efi"},
              {"partition": 3, "mountpoint": "/boot"}]
    with pytest.raises(ConfigError, match=r"mounts\[2\].*would hide /boot/efi"):
        parse_config(cfg(mounts=mounts), "10.0.0.1.nbd")
    ordered = [mounts[0], mounts[2], mounts[1]]
    assert len(parse_config(cfg(mounts=ordered), "10.0.0.1.nbd").mounts) == 3
