"""The appliance's `/init` without the storage scans vfsroot never uses.

Why: libguestfs' `/init` (a bash script in the appliance's root image) scans every drive for
MD arrays (twice), LVM (activating every volume group it finds) and Windows dynamic disks
before it starts guestfsd; under TCG that took ~4.6 s of every launch (docs/disks.md).  A
client's config can only name partitions, whole disks and LVM logical volumes
(`vfsroot/config.py`): MD and LDM devices are never mounted, and LVM is activated by the
worker itself, only when a config names a logical volume (`guestfs_worker`: `vg_activate_all`
before the LV is looked up).  Everything else in `/init` (udev, the LVM configuration guestfsd
runs with, the devices file switched off) stays.

How: `lean_init` edits the script's text, line by line, and refuses (None) unless every line
it removes is found exactly once: another libguestfs version's `/init` is left alone and the
appliance keeps its own.  `write_root` puts the edited script into a copy of the root image
(a sparse copy, ~0.7 GiB of data) with `debugfs -w`, which edits an ext2 image without
mounting it, and reads it back to check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile

log = logging.getLogger(__name__)

#: Lines of libguestfs' /init (1.48) left out, with why.
SKIPPED = {
    "mdadm -As --auto=yes --no-degraded": "MD arrays: a config cannot name one",
    "lvmetad": "gone from lvm2 2.03 (Debian 12): 'command not found'",
    "lvm pvscan --cache --activate ay": "LVM: activated by the worker when a config names an LV",
    "mdadm -As --auto=yes --run": "MD arrays: a config cannot name one",
    "ldmtool create all": "Windows dynamic disks: a config cannot name one",
}
#: Lines of libguestfs' /init replaced, with the replacement and why.
REPLACED = {
    # Coldplug of every device in /sys (hundreds of events: CPUs, memory blocks, ttys, PCI,
    # ACPI...) kept udevd busy for 3 s on a quiet host and over 10 s on a loaded one.  What
    # guestfsd and vfsroot need from udev is the symlinks of two subsystems: block (the
    # drives' /dev/disk/guestfs/<label>) and virtio-ports (guestfsd's channel).  Modules the
    # other devices would pull in (ATA, SMBus, input, sg...) are for hardware the appliance
    # does not use; later events (LVM's device-mapper volumes) are handled as always.
    "udevadm trigger": ("udevadm trigger --subsystem-match=block "
                        "--subsystem-match=virtio-ports",
                        "only the subsystems guestfsd uses"),
}
MARK = "# vfsroot: left out: "


def lean_init(script: str) -> str | None:
    """`script` without the `SKIPPED` lines (each replaced by a comment saying why) and with
    the `REPLACED` ones replaced, or None if one of them is not there exactly once."""
    lines = script.split("\n")
    edits = [(skip, f"{MARK}{skip} ({why})") for skip, why in SKIPPED.items()]
    edits += [(old, f"{new}  # vfsroot: was '{old}' ({why})")
              for old, (new, why) in REPLACED.items()]
    for old, new in edits:
        at = [i for i, line in enumerate(lines) if line.strip() == old]
        if len(at) != 1:
            log.info("appliance /init: %r found %d times, expected once; keeping /init",
                     old, len(at))
            return None
        lines[at[0]] = new
    return "\n".join(lines)


def _debugfs(image: str, commands: str, write: bool = False) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", prefix="vfsroot-debugfs-") as f:
        f.write(commands)
        f.flush()
        return subprocess.run(["debugfs", *(["-w"] if write else []), "-f", f.name, image],
                              capture_output=True, timeout=120, check=False)


def _complaints(done: subprocess.CompletedProcess) -> str:
    """What debugfs said went wrong.  It exits 0 whatever happens with `-f` (a bad image, a
    missing file): its only sign is a message on stderr besides its version banner."""
    lines = done.stderr.decode(errors="replace").splitlines()
    return "; ".join(line for line in lines if not line.startswith("debugfs 1."))


def read_init(image: str) -> bytes | None:
    """The root image's /init, or None if debugfs cannot read it."""
    try:
        out = _debugfs(image, "cat /init\n")
    except (OSError, subprocess.SubprocessError) as e:
        log.info("appliance /init: debugfs failed: %s", e)
        return None
    # debugfs echoes the command on stdout before the data: "debugfs: cat /init\n".
    head = b"debugfs: cat /init\n"
    if out.returncode != 0 or _complaints(out) or not out.stdout.startswith(head):
        return None
    return out.stdout[len(head):]


def write_root(source: str, target: str, script: bytes) -> bool:
    """Make `target` a copy of the root image `source` whose /init is `script` (mode 0755,
    owner root).  True if done and read back identical; on False `target` is removed."""
    try:
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", source, target],
                       check=True, capture_output=True, timeout=600)
        with tempfile.NamedTemporaryFile(prefix="vfsroot-init-") as f:
            f.write(script)
            f.flush()
            os.fchmod(f.fileno(), 0o755)
            done = _debugfs(target, f"rm /init\nwrite {f.name} /init\n"
                            "sif /init mode 0100755\nsif /init uid 0\nsif /init gid 0\n",
                            write=True)
        if done.returncode == 0 and not _complaints(done) and read_init(target) == script:
            return True
        log.info("appliance /init: rewriting it failed: %s", _complaints(done)[-300:])
    except (OSError, subprocess.SubprocessError) as e:
        log.info("appliance /init: copying the root image failed: %s", e)
    with contextlib.suppress(OSError):
        os.unlink(target)
    return False
