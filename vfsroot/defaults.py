"""Defaults both daemons share, written once.

`vfsroot serve` mounts the client views at `DEFAULT_MOUNT`, and `vfsroot-tftpd` serves from
the same place by default, so the two meet without configuration.
"""

from __future__ import annotations

from pathlib import Path

#: Where `vfsroot serve` mounts the client views and where `vfsroot-tftpd` looks for them.
DEFAULT_MOUNT = Path("/run/vfsroot")
