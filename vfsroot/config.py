"""Parse and strictly validate a client's disk config, `SRC/<ip>.nbd`.

The format is rtftp's, so existing fleets keep their files::

    {"url": "nbd://10.10.10.10:25000/server_root",
     "mounts": [{"partition": 2, "mountpoint": "/"}, {"partition": 1, "mountpoint": "/boot"}],
     "tftp_root": "/boot"}

plus extensions rtftp lacks: a mount may name a whole disk without a partition table
(`"partition": 0`, or `"device": "/dev/sda"`) or an LVM logical volume (`"lv": "vg/root"`),
and the URL may be an iSCSI LUN, `iscsi://host[:port]/<target-iqn>/<lun>` (open-iscsi root
filesystems of PXE-booted clients live on those), read through libguestfs' iscsi protocol.

Why strict: the file is written by people, and a typo must never turn into "the client quietly
boots the default kernel".  Every error names the file and the field (`ConfigError`), the
daemon shows it in the log and in `vfsroot status`, and the client keeps being served from its
other layers.  The URL is parsed into parts (`NbdUrl`) that are handed to libguestfs as
separate values; nothing from the file is ever pasted into a command line, and the parts are
restricted to characters that mean nothing to qemu's option syntax (no `,`, `:` in names).
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import posixpath
import re
import stat
import urllib.parse
from dataclasses import dataclass
from typing import Any

#: NBD's IANA port, used when the URL has none (as qemu and nbd-client do).
DEFAULT_NBD_PORT = 10809
#: iSCSI's IANA port (RFC 7143), used when an iscsi:// URL has none.
DEFAULT_ISCSI_PORT = 3260
#: An iSCSI target name: iqn./eui./naa. forms of RFC 3720 section 3.2.6.3 (lower case,
#: no "/" and nothing qemu's option syntax would read as a separator).
_IQN = re.compile(r"^(iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9][a-z0-9.-]*(:[a-z0-9._:-]+)?"
                  r"|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16}([0-9a-f]{16})?)\Z")
#: A config larger than this is certainly not a disk config (and is not read whole).
MAX_CONFIG_BYTES = 64 * 1024

_HOSTNAME = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")
#: Export names and socket paths: what real deployments use, and nothing qemu's option parser
#: or libguestfs' server syntax could read as a separator.  (All of these end in \Z: `$` would
#: also match before a trailing newline, and let "export\n" through.)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._~/+@=-]*\Z")
_VG_LV = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}\Z")
_DEVICE = re.compile(r"^/dev/sda([1-9][0-9]{0,2})?\Z")
_TOP_FIELDS = {"url", "mounts", "tftp_root"}
_MOUNT_SOURCES = ("partition", "device", "lv")
#: An IPv6 zone (``fe80::1%eth0``): an interface name, nothing that could end the host.
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class ConfigError(ValueError):
    """A disk config is unusable; `str()` is one line naming the file and the field."""

    def __init__(self, path: pathlib.Path | str, field: str, message: str) -> None:
        self.path = str(path)
        self.field = field
        self.message = message
        super().__init__(f"{self.path}: {field}: {message}" if field else f"{self.path}: {message}")


@dataclass(frozen=True, slots=True)
class NbdUrl:
    """A parsed NBD URL (`nbd://host[:port][/export]` or `nbd+unix:///export?socket=/path`)."""

    transport: str  # "tcp" or "unix"
    export: str
    host: str = ""
    port: int = DEFAULT_NBD_PORT
    socket: str = ""

    #: libguestfs' `add_drive_opts(protocol=...)`.
    protocol = "nbd"

    @property
    def server(self) -> str:
        """The server in libguestfs' `add_drive_opts(server=[...])` syntax."""
        if self.transport == "unix":
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def __str__(self) -> str:
        """The canonical URL, for logs, status and `Node.source`."""
        export = urllib.parse.quote(self.export, safe="/~@=+")
        if self.transport == "unix":
            return f"nbd+unix:///{export}?socket={self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"


@dataclass(frozen=True, slots=True)
class IscsiUrl:
    """A parsed `iscsi://host[:port]/<target-iqn>/<lun>` (no CHAP: the URL has no secret)."""

    host: str
    target: str
    lun: int
    port: int = DEFAULT_ISCSI_PORT

    protocol = "iscsi"
    transport = "tcp"

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def export(self) -> str:
        """libguestfs' iscsi "filename": `<target-iqn>/<lun>`."""
        return f"{self.target}/{self.lun}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"iscsi://{host}:{self.port}/{self.target}/{self.lun}"


@dataclass(frozen=True, slots=True)
class MountSpec:
    """One filesystem to mount: which block device of the guest, and where."""

    #: Partition number on the disk, 0 for the whole disk; None when `lv` is used.
    partition: int | None
    #: LVM logical volume as "vg/lv"; None for a partition.
    lv: str | None
    mountpoint: str

    @property
    def label(self) -> str:
        if self.lv is not None:
            return f"lv {self.lv}"
        return "whole disk" if self.partition == 0 else f"partition {self.partition}"


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """A validated `<ip>.nbd`.  Two configs compare equal iff they describe the same view."""

    url: NbdUrl | IscsiUrl
    mounts: tuple[MountSpec, ...]
    tftp_root: str = "/"


def parse_url(text: object, path: pathlib.Path | str = "<config>", field: str = "url"
              ) -> NbdUrl | IscsiUrl:
    """Parse an NBD or iSCSI URL; errors are `ConfigError`s naming `field`."""

    def fail(message: str) -> ConfigError:
        return ConfigError(path, field, message)

    if not isinstance(text, str):
        raise fail(f"must be a string, not {_type_name(text)}")
    if not text or len(text) > 4096 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise fail("must be a non-empty URL without spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise fail(f"not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if parts.fragment:
        raise fail("a fragment (#...) is not allowed")
    if parts.username is not None or parts.password is not None:
        raise fail("user names and passwords are not supported")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if scheme == "iscsi":
        return _parse_iscsi(parts, port, export, fail)
    if not _SAFE_NAME.match(export) or len(export) > 4096:
        raise fail(f"export name {export!r} may only contain letters, digits and ._~/+@=-")
    if scheme == "nbd":
        if parts.query:
            raise fail("nbd:// URLs take no query parameters")
        host = parts.hostname or ""
        if not host:
            raise fail("nbd:// needs a host, e.g. nbd://10.0.0.5:10809/export")
        if "%" in host and not _SCOPE.fullmatch(host.partition("%")[2]):
            raise fail(f"host {host!r}: an IPv6 zone may only contain letters, digits and ._-")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if not _HOSTNAME.match(host):
                raise fail(f"host {host!r} is not an IP address or host name") from None
        if port == 0:
            raise fail("port must be 1-65535")
        return NbdUrl("tcp", export, host=host, port=port or DEFAULT_NBD_PORT)
    if scheme == "nbd+unix":
        if parts.netloc:
            raise fail("nbd+unix:// takes no host: nbd+unix:///export?socket=/path")
        try:
            query = urllib.parse.parse_qs(parts.query, keep_blank_values=True,
                                          strict_parsing=bool(parts.query))
        except ValueError as e:
            raise fail(f"bad query ({e})") from None
        unknown = sorted(set(query) - {"socket"})
        if unknown:
            raise fail(f"unknown query parameter(s): {', '.join(unknown)}")
        sockets = query.get("socket", [])
        if len(sockets) != 1:
            raise fail("nbd+unix:// needs exactly one ?socket=/absolute/path")
        sock = sockets[0]
        if not sock.startswith("/") or not _SAFE_NAME.match(sock) or len(sock) > 107:
            raise fail(f"socket {sock!r} must be an absolute path of letters, digits and "
                       "._~/+@=- (at most 107 bytes)")
        return NbdUrl("unix", export, socket=posixpath.normpath(sock))
    if scheme in ("nbds", "nbds+unix", "nbd+vsock", "nbds+vsock"):
        raise fail(f"{scheme}:// is not supported (use nbd:// or nbd+unix://)")
    raise fail(f"scheme must be nbd://, nbd+unix:// or iscsi://, not "
               f"{parts.scheme or 'missing'}")


def _host(parts: urllib.parse.SplitResult, example: str, fail: Any) -> str:
    host = parts.hostname or ""
    if not host:
        raise fail(f"needs a host, e.g. {example}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOSTNAME.match(host):
            raise fail(f"host {host!r} is not an IP address or host name") from None
    return host


def _parse_iscsi(parts: urllib.parse.SplitResult, port: int | None, path: str,
                 fail: Any) -> IscsiUrl:
    example = "iscsi://10.0.0.5:3260/iqn.2024-01.org.example:client5/1"
    if parts.query:
        raise fail("iscsi:// URLs take no query parameters")
    host = _host(parts, example, fail)
    if port == 0:
        raise fail("port must be 1-65535")
    target, _, lun = path.rpartition("/")
    if not target or not _IQN.match(target):
        raise fail(f"target {target!r} is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id],"
                   f" lower case), e.g. {example}")
    if not lun.isdigit() or not lun.isascii() or int(lun) > 16383:
        raise fail(f"LUN {lun!r} must be a number 0-16383, e.g. {example}")
    return IscsiUrl(host=host, target=target, lun=int(lun), port=port or DEFAULT_ISCSI_PORT)


def parse_config(data: bytes | str, path: pathlib.Path | str = "<config>") -> DiskConfig:
    """Validate the text of a config file; raises `ConfigError`."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(path, "", "not UTF-8 text") from None
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ConfigError(path, str(e), "given more than once") from None
    except json.JSONDecodeError as e:
        raise ConfigError(path, "", f"not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:
        # Integers beyond Python's digit limit (ValueError) and nesting deeper than the
        # recursion limit (RecursionError) are not JSONDecodeErrors, but they are still
        # just a bad file: they must not escape and stop the daemon.
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ConfigError(path, "", f"not usable JSON: {reason}") from None
    if not isinstance(doc, dict):
        raise ConfigError(path, "", f"must be a JSON object, not {_type_name(doc)}")
    unknown = sorted(set(doc) - _TOP_FIELDS)
    if unknown:
        known = ", ".join(sorted(_TOP_FIELDS))
        raise ConfigError(path, unknown[0], f"unknown field (known: {known})")
    if "url" not in doc:
        raise ConfigError(path, "url", "missing")
    url = parse_url(doc["url"], path)
    if "mounts" not in doc:
        raise ConfigError(path, "mounts", "missing")
    mounts = _parse_mounts(doc["mounts"], path)
    tftp_root = "/"
    if "tftp_root" in doc:
        tftp_root = _guest_path(doc["tftp_root"], path, "tftp_root")
    return DiskConfig(url=url, mounts=mounts, tftp_root=tftp_root)


def load_config(path: pathlib.Path) -> DiskConfig:
    """Read and validate `path`; raises `ConfigError` (also for I/O problems) or
    FileNotFoundError when the file is gone (which is not a config error: no disk)."""
    try:
        # O_NONBLOCK and a regular file only: this runs on the daemon's event loop, and a
        # FIFO (or a link to one) named <ip>.nbd would otherwise wait for a writer forever,
        # with every client's lookups behind it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(path, "", "not a regular file")
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, "", f"larger than {MAX_CONFIG_BYTES} bytes")
    return parse_config(data, path)


def _parse_mounts(value: Any, path: pathlib.Path | str) -> tuple[MountSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, "mounts", f"must be a list, not {_type_name(value)}")
    if not value:
        raise ConfigError(path, "mounts", "must list at least one filesystem")
    if len(value) > 16:
        raise ConfigError(path, "mounts", "at most 16 filesystems")
    out: list[MountSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        field = f"mounts[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(path, field, f"must be an object, not {_type_name(entry)}")
        unknown = sorted(set(entry) - {"mountpoint", *_MOUNT_SOURCES})
        if unknown:
            raise ConfigError(path, f"{field}.{unknown[0]}",
                              "unknown field (known: partition, device, lv, mountpoint)")
        sources = [k for k in _MOUNT_SOURCES if k in entry]
        if len(sources) != 1:
            raise ConfigError(path, field, "needs exactly one of partition, device, lv")
        partition: int | None = None
        lv: str | None = None
        src = sources[0]
        raw = entry[src]
        if src == "partition":
            if not isinstance(raw, int) or isinstance(raw, bool):
                raise ConfigError(path, f"{field}.partition",
                                  f"must be an integer, not {_type_name(raw)}")
            if not 0 <= raw <= 128:
                raise ConfigError(path, f"{field}.partition",
                                  f"must be 0 (whole disk) to 128, not {raw}")
            partition = raw
        elif src == "device":
            if not isinstance(raw, str) or not _DEVICE.match(raw):
                raise ConfigError(path, f"{field}.device",
                                  f"must be /dev/sda (whole disk) or /dev/sdaN, not {raw!r}")
            partition = int(raw[len("/dev/sda"):] or 0)
        else:
            if not isinstance(raw, str) or raw.count("/") != 1 or not all(
                _VG_LV.match(p) for p in raw.split("/")
            ):
                raise ConfigError(path, f"{field}.lv",
                                  f"must be \"volumegroup/logicalvolume\", not {raw!r}")
            lv = raw
        if "mountpoint" not in entry:
            raise ConfigError(path, f"{field}.mountpoint", "missing")
        mountpoint = _guest_path(entry["mountpoint"], path, f"{field}.mountpoint")
        if i == 0 and mountpoint != "/":
            raise ConfigError(path, f"{field}.mountpoint",
                              f"the first filesystem must be mounted at /, not {mountpoint}")
        if i > 0 and mountpoint == "/":
            raise ConfigError(path, f"{field}.mountpoint", "only the first filesystem may be /")
        if mountpoint in seen:
            raise ConfigError(path, f"{field}.mountpoint", f"{mountpoint} is mounted twice")
        hidden = sorted(m for m in seen if m != "/" and m.startswith(mountpoint + "/"))
        if hidden:
            raise ConfigError(path, f"{field}.mountpoint",
                              f"{mountpoint} would hide {', '.join(hidden)}, mounted before it "
                              "(filesystems are mounted in the order listed: list it first)")
        seen.add(mountpoint)
        out.append(MountSpec(partition=partition, lv=lv, mountpoint=mountpoint))
    return tuple(out)


def _guest_path(value: Any, path: pathlib.Path | str, field: str) -> str:
    """An absolute path inside the guest, normalised, with no `..` and nothing odd in it."""
    if not isinstance(value, str):
        raise ConfigError(path, field, f"must be a string, not {_type_name(value)}")
    if not value.startswith("/"):
        raise ConfigError(path, field, f"must be an absolute path inside the disk, not {value!r}")
    if len(value) > 1024 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ConfigError(path, field, "must be at most 1024 characters, no control characters")
    if ".." in value.split("/"):
        raise ConfigError(path, field, f"must not contain '..': {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(path, field, f"is not valid Unicode text: {value!r}") from None
    return posixpath.normpath("/" + value.lstrip("/"))


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _type_name(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                           type(value).__name__)
