"""A lean mini initrd for the appliance: only the kernel modules that find and mount its root.

Why: supermin's mini initrd inserts every module it was told the appliance might need (~50:
nvdimm, ATA, virtio net/crypto/balloon/input/mem, fuse, virtiofs...), one by one, before it
even looks for the root disk; under TCG that took ~4 s of every launch (docs/disks.md).  The
appliance's root holds all of the kernel's modules and runs udev, which loads what the
present devices need, and `modprobe` (mount, LVM) loads the rest on demand; so the initrd
only has to reach the root: the virtio PCI transport, virtio-scsi and the SCSI disk driver
(libguestfs' drives, the appliance's own root among them; virtio-blk too, its fallback), ext4
(which mounts the ext2 root), and the virtio console (guestfsd's channel to the library).

Dependencies are read from each module's own `.modinfo` (`depends=`), so the kept set is
closed; the crypto and CRC helpers are kept too (tiny, and some are soft dependencies
`depends=` does not name).  If a wanted module or a dependency is missing, or the archive
is not what we expect, `lean_initrd` returns None and the caller keeps supermin's initrd.
"""

from __future__ import annotations

import logging
import re

from vfsroot import newc

log = logging.getLogger(__name__)

#: What the initrd needs to reach the root and guestfsd to reach the library.  libguestfs
#: puts its drives on virtio-scsi; virtio_blk is what it falls back to on a qemu without
#: virtio-scsi (without it there the root would never appear: supermin waits ~10 min).
WANTED = ("virtio_pci", "virtio_scsi", "sd_mod", "virtio_blk", "ext4", "virtio_console")
#: Names (prefixes) of crypto/CRC helper modules kept as they are (soft dependencies).
HELPERS = re.compile(r"^(crc|crct10dif|libcrc32c)")
_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def _modname(file_name: str) -> str:
    """`crc-t10dif.ko` -> `crc_t10dif`: the kernel treats `-` and `_` alike in names."""
    return file_name.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_")


def depends(module: bytes) -> list[str] | None:
    """The `depends=` list of a module's `.modinfo`, or None if it has none (not a plain
    .ko: a compressed module, say)."""
    m = _DEPENDS.search(module)
    if m is None:
        return None
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


def keep_set(modules: dict[str, bytes]) -> set[str] | None:
    """Names (`_modname`) of the modules to keep, dependencies included; None if a wanted
    module or a dependency is not in `modules` (name -> .ko bytes)."""
    keep: set[str] = set()
    todo = [*WANTED, *(n for n in modules if HELPERS.match(n))]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        if name not in modules:
            log.info("lean initrd: module %s missing from supermin's initrd", name)
            return None
        deps = depends(modules[name])
        if deps is None:
            log.info("lean initrd: %s has no depends= (not a plain .ko)", name)
            return None
        keep.add(name)
        todo += deps
    return keep


def lean_initrd(archive: bytes) -> bytes | None:
    """supermin's initrd with only the modules that reach the root; None to keep it as is."""
    try:
        entries = newc.read(archive)
    except newc.NewcError as e:
        log.info("lean initrd: %s", e)
        return None
    by_name = {e.name: e for e in entries}
    listing = by_name.get("modules")
    if listing is None or "init" not in by_name:
        return None
    order = listing.data.decode().split()
    modules = {_modname(f): by_name[f].data for f in order if f in by_name}
    keep = keep_set(modules)
    if keep is None:
        return None
    kept_files = [f for f in order if _modname(f) in keep]
    out = [e for e in entries
           if not (e.name.endswith(".ko") and _modname(e.name) not in keep)
           and e.name != "modules"]
    out.append(newc.Entry("modules", listing.mode,
                          "".join(f + "\n" for f in kept_files).encode(),
                          listing.uid, listing.gid, listing.mtime))
    return newc.write(out)
