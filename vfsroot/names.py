"""Which names in the source root and at the mount root are clients.

A client is named by its IP address in canonical form: an IPv4 dotted quad without leading
zeros, or an IPv6 address compressed and lower-case (what Python's `ipaddress` prints).  Only
the canonical spelling counts, so that one machine never has two names (and two trees), and
names are compared whole, never by prefix: client 10.0.0.1 is never 10.0.0.10.
"""

from __future__ import annotations

import ipaddress

#: The pseudo-client whose view is only the shared default layer.
DEFAULT = "default"
#: Suffix of a client's disk config in the source root.
DISK_CONFIG_SUFFIX = ".nbd"


def is_client_name(name: str) -> bool:
    """True if `name` is an IP address in its one canonical spelling."""
    if not name or len(name) > 45 or "%" in name:
        return False
    try:
        return str(ipaddress.ip_address(name)) == name
    except ValueError:
        return False


def client_of_config(filename: str) -> str | None:
    """The client a `<ip>.nbd` file belongs to, or None if the name is not exactly that."""
    if not filename.endswith(DISK_CONFIG_SUFFIX):
        return None
    stem = filename[: -len(DISK_CONFIG_SUFFIX)]
    return stem if is_client_name(stem) else None


def is_safe_component(name: str) -> bool:
    """A single path component the FUSE layer may pass to a layer.

    The kernel already hands us single components, but layers must never see "", ".", "..",
    a slash or a NUL however a lookup was made.
    """
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name
