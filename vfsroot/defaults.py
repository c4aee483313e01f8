"""Defaults both daemons share, written once (and `vfsroot serve` defaults its command line
shows without importing the daemon).

`vfsroot serve` mounts the client views at `DEFAULT_MOUNT`, and `vfsroot-tftpd` serves from
the same place by default, so the two meet without configuration.
"""

from __future__ import annotations

from pathlib import Path

#: Where `vfsroot serve` mounts the client views and where `vfsroot-tftpd` looks for them.
DEFAULT_MOUNT = Path("/run/vfsroot")

#: FUSE requests `vfsroot serve` serves at once (pyfuse3's own default is 99).  A lookup held for an
#: attaching disk keeps its task for up to `--attach-wait`; with 99, a fleet booting during
#: the start-up launches stalled every other request, default/ files of other clients
#: included.  A task costs a few KiB (its request buffer is allocated, not touched), so the
#: bound is generous: ~500 clients each with a request and a retransmission held.
FUSE_TASKS = 1024
