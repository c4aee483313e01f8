"""Client names: canonical IPv4/IPv6 only, matched whole; safe path components."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfsroot.names import client_of_config, is_client_name, is_safe_component
from vfsroot.sources import SourceRoot


@pytest.mark.parametrize(
    "name",
    ["10.0.0.1", "10.0.0.10", "0.0.0.0", "255.255.255.255", "fe80::1", "2001:db8::5", "::1",
     "::", "2001:db8:0:1:1:1:1:1"],
)
def test_canonical_names_are_clients(name: str) -> None:
    assert is_client_name(name) is True


@pytest.mark.parametrize(
    "name",
    [
        "", "default", "010.0.0.1", "10.0.0.01", "10.0.0", "10.0.0.1.", "10.0.0.1 ", " 10.0.0.1",
        "10.0.0.256", "10.0.0.1/32", "10.0.0.1.nbd", "FE80::1", "Fe80::1", "fe80:0:0:0:0:0:0:1",
        "fe80::0001", "2001:0db8::5", "2001:db8:0:0:0:0:0:5", "fe80::1%eth0", "fe80::1%1",
        "[fe80::1]", "0x0a.0.0.1", "167772161", "10.0.0.1\n", "10.0.0.1\0",
    ],
)
def test_non_canonical_names_are_not_clients(name: str) -> None:
    assert is_client_name(name) is False


@pytest.mark.parametrize(
    ("filename", "client"),
    [
        ("10.0.0.1.nbd", "10.0.0.1"),
        ("10.0.0.10.nbd", "10.0.0.10"),
        ("fe80::1.nbd", "fe80::1"),
        ("2001:db8::5.nbd", "2001:db8::5"),
        ("10.0.0.1.nbd.bak", None),
        ("10.0.0.1.nbd~", None),
        ("10.0.0.1nbd", None),
        ("10.0.0.1.NBD", None),
        (".nbd", None),
        ("nbd", None),
        ("010.0.0.1.nbd", None),
        ("FE80::1.nbd", None),
        ("default.nbd", None),
        ("10.0.0.1", None),
    ],
)
def test_client_of_config_is_exact(filename: str, client: str | None) -> None:
    assert client_of_config(filename) == client


@given(st.ip_addresses())
def test_every_address_has_exactly_one_client_name(addr: ipaddress._BaseAddress) -> None:
    name = str(addr)
    assert is_client_name(name)
    assert client_of_config(name + ".nbd") == name
    # the long and upper-case spellings name the same machine, so they must not count
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.exploded != name:
            assert not is_client_name(addr.exploded)
        if name.upper() != name:
            assert not is_client_name(name.upper())
    else:
        first, rest = name.split(".", 1)
        assert not is_client_name(f"0{first}.{rest}")


@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=9))
def test_no_prefix_match_between_ipv4_clients(addr: ipaddress.IPv4Address, digit: int) -> None:
    name = str(addr)
    longer = name + str(digit)
    assert client_of_config(longer + ".nbd") != name
    if is_client_name(longer):
        assert client_of_config(longer + ".nbd") == longer


def _canonical(text: str) -> bool:
    """The oracle: `ipaddress` parses it, prints it back unchanged, and it has no zone."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    return str(addr) == text and getattr(addr, "scope_id", None) is None


def _spellings(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> dict[str, str]:
    """Other spellings of the same machine (or of nothing): never a client name."""
    name = str(addr)
    out = {"upper": name.upper(), "space": f" {name}", "trailing-space": f"{name} ",
           "newline": f"{name}\n", "nul": f"{name}\0", "prefix-len": f"{name}/32",
           "dot": f"{name}.", "nbd": f"{name}.nbd", "zone": f"{name}%eth0",
           "brackets": f"[{name}]", "digit": f"{name}0" if ":" not in name else f"{name}:0"}
    if isinstance(addr, ipaddress.IPv6Address):
        out["exploded"] = addr.exploded
        out["zero-group"] = name.replace("::", ":0:", 1) if "::" in name else "0" + name
    else:
        first, rest = name.split(".", 1)
        out["leading-zero"] = f"0{first}.{rest}"
        out["hex"] = f"{int(first):#x}.{rest}"
        out["integer"] = str(int(addr))
        out["three-parts"] = name.rsplit(".", 1)[0]
    return {k: v for k, v in out.items() if v != name}


@given(st.ip_addresses(), st.data())
def test_is_client_name_accepts_only_what_ipaddress_prints(
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address, data: st.DataObject) -> None:
    """Every example is an IP or a near-IP, so both halves assert on every run: the one
    canonical spelling is a client, every other spelling of it is not, and a random
    one-character edit is a client exactly when `ipaddress` prints it back unchanged."""
    name = str(addr)
    assert is_client_name(name) is True
    kind, other = data.draw(st.sampled_from(sorted(_spellings(addr).items())), label="spelling")
    if kind in ("upper", "digit", "zero-group"):
        # these may still be some canonical address (an all-digit IPv4 has no upper case,
        # "1.2.3.4" + "0" can be "1.2.3.40"): the oracle decides
        assert is_client_name(other) is _canonical(other), (kind, other)
    else:
        assert is_client_name(other) is False, (kind, other)
    pos = data.draw(st.integers(0, len(name)), label="position")
    char = data.draw(st.sampled_from("0123456789abcdefABCDEF.:%/ g\0x"), label="char")
    for edited in (name[:pos] + char + name[pos:], name[:pos] + char + name[pos + 1:]):
        assert is_client_name(edited) is _canonical(edited), edited


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "a\0b", "../etc", "x/"])
def test_unsafe_components(name: str) -> None:
    assert is_safe_component(name) is False


@pytest.mark.parametrize("name", ["a", "...", ".hidden", "pxelinux.cfg", "fe80::1", "a b", "é"])
def test_safe_components(name: str) -> None:
    assert is_safe_component(name) is True


@given(st.text(max_size=20))
def test_safe_components_stay_one_level_below_their_parent(name: str) -> None:
    if is_safe_component(name):
        joined = os.path.normpath(os.path.join("/base/dir", name))
        assert os.path.dirname(joined) == "/base/dir"
        assert os.path.basename(joined) == name
    else:
        assert name in ("", ".", "..") or "/" in name or "\0" in name


def test_clients_of_a_source_root(tmp_path: Path) -> None:
    for d in ["default", "10.0.0.1", "fe80::1", "2001:db8::5", "010.0.0.2", "FE80::2", "junk"]:
        (tmp_path / d).mkdir()
    (tmp_path / "10.0.0.10.nbd").write_text("x")
    (tmp_path / "10.0.0.100").write_text("a file, not a client dir")
    (tmp_path / "10.0.0.3.nbd.bak").write_text("x")
    source = SourceRoot(tmp_path)
    assert source.clients() == ["10.0.0.1", "10.0.0.10", "2001:db8::5", "fe80::1"]
    assert [layer.name for layer in source.layers("10.0.0.1")] == ["client", "default"]
    # 10.0.0.10 has only a config: its view never borrows 10.0.0.1's directory
    assert [layer.name for layer in source.layers("10.0.0.10")] == ["default"]
    assert [layer.name for layer in source.layers("default")] == ["default"]
