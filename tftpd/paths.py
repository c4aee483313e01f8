"""Turn the file name a boot client asked for into a safe relative path, or refuse it.

Boot clients spell the same file many ways: iPXE sends a leading ``/``, Windows PXE sends
``\\Boot\\BCD``, some firmware doubles slashes.  All of them mean "relative to my root", so the
name is normalised to a plain relative POSIX path.  Anything that could leave the client's
directory is refused here, before the filesystem sees it: the kernel resolves ``..`` above
``/run/vfsroot/<ip>/`` on its own, so a ``..`` that reached ``open()`` would read *another
client's* tree (the tftpd-hpa map-file hole, docs/clients.md).  Refusal is by construction: no
path with a ``..`` segment, a control character or an over-long component is ever joined to a root.
"""

from __future__ import annotations

#: Longest accepted path after normalisation, in bytes of its UTF-8 form.  Boot file names are
#: short; PATH_MAX-sized names only appear in attacks.
MAX_PATH_BYTES = 1024

#: Longest accepted path component (NAME_MAX on Linux filesystems).
MAX_COMPONENT_BYTES = 255


class PathRefused(ValueError):
    """The requested name cannot be served; ``str(exc)`` is safe to send to the client."""


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def normalise(name: str) -> str:
    """Return ``name`` as a relative POSIX path inside the client's root, or raise PathRefused.

    Rules, in order: NUL and other control characters are refused (they never name a boot file
    and confuse logs); ``\\`` becomes ``/`` (Windows PXE); leading slashes are dropped (iPXE,
    absolute paths are relative to the client root as in every TFTP server's secure mode);
    empty and ``.`` segments collapse; a ``..`` segment anywhere is refused outright rather than
    resolved, because resolving it lexically would still let ``a/../../x`` probe the layout.
    """
    if not name:
        raise PathRefused("empty file name")
    if _has_control(name):
        raise PathRefused("control character in file name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise PathRefused(f"file name longer than {MAX_PATH_BYTES} bytes")
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise PathRefused("'..' is not allowed in file names")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise PathRefused(f"path component longer than {MAX_COMPONENT_BYTES} bytes")
        parts.append(part)
    if not parts:
        raise PathRefused("file name names no file")
    return "/".join(parts)
