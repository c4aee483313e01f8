"""What every long-form reliability bench (bench/soak.py, bench/storm.py, bench/many.py) does
before its run: refuse to start unless root, raise the descriptor limit, make its work dir.

Root, because the benches mount FUSE with allow_other and bind clients to 127.x addresses.
The descriptor limit (soak and storm), because a storm holds a socket per client and per
transfer, and the daemons the bench starts inherit the limit: the soft limit goes up towards
the hard one (at most 65536).  The work dir is a fresh one under /var/tmp, where the trees of a
storm (hundreds of MiB) and the daemons' logs go.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

#: The descriptor limit a bench asks for (bounded by the hard limit).
NOFILE = 65536


def bench_work_dir(script: str, why_root: str, name: str,
                   raise_nofile: bool = True) -> Path | None:
    """The bench's fresh work dir ``/var/tmp/vfsroot-<name>-*`` (the caller removes it), or
    None after one line on stderr when not run as root (the caller exits 2).

    `script` names the bench in that line, `why_root` says what needs root.
    """
    if os.geteuid() != 0:
        print(f"{script}: run as root ({why_root})", file=sys.stderr)
        return None
    if raise_nofile:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, NOFILE)), hard))
    return Path(tempfile.mkdtemp(prefix=f"vfsroot-{name}-", dir="/var/tmp"))
