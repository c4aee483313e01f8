"""The knobs of client disks and their command-line flags (argparse lives here, not in
`vfsroot.disks`).  Defaults and the measurements behind them are in docs/disks.md."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from .errors import QuietError
from .guest_process import AttachOptions


class DiskOptionsError(QuietError, ValueError):
    """A disk option out of range: one clear line and exit status 2 from `vfsroot serve`."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


@dataclass
class DiskOptions:
    """Knobs of the disk life cycle; defaults and their reasons are in docs/disks.md."""

    idle_timeout: float = 900.0
    attach_timeout: float = 180.0
    #: Long enough to cover a launch: a boot client whose request is held retransmits and
    #: gets its file once the disk is attached; one answered with EIO gives up.
    attach_wait: float = 60.0
    call_timeout: float = 60.0
    #: Hard cap on appliances; memory (`max_memory`) is what normally limits.
    max_appliances: int = 16
    max_launches: int = 1
    appliance_memory: int = 512
    force_tcg: bool = False
    refresh_quiet: float = 5.0
    max_staleness: float = 60.0
    retry_min: float = 10.0
    retry_max: float = 300.0
    #: Disks launched together in one appliance at most.
    disks_per_appliance: int = 32
    #: Attaches wanted within this many seconds of the first share one launch.
    batch_window: float = 2.0
    #: Memory all appliances may use together (measured RSS, or an estimate while launching).
    max_memory: int = 4096
    #: Bound of the KVM probe launch at start (nested KVM hangs forever on some hosts).
    kvm_timeout: float = 30.0
    config_poll: float = 5.0
    python: str = field(default="")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("client disks (SRC/<ip>.nbd, through libguestfs)")
        for name, metavar, text in _FLAGS:
            _add(g, name, metavar, text)
        g.add_argument("--force-tcg", action="store_true",
                       help="never try KVM (nested KVM hangs on some hosts; see vfsroot check)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DiskOptions:
        names = [f.name for f in fields(cls) if f.name not in ("config_poll", "python")]
        opts = cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.max_appliances < 1 or self.max_launches < 1:
            raise DiskOptionsError("--max-appliances and --max-launches must be at least 1")
        if not 1 <= self.disks_per_appliance <= 255:
            raise DiskOptionsError("--disks-per-appliance must be 1-255 (libguestfs' limit)")
        if self.appliance_memory < 256:
            raise DiskOptionsError("--appliance-memory must be at least 256 MiB")
        if self.max_memory < self.appliance_memory:
            raise DiskOptionsError("--max-memory must be at least --appliance-memory")
        if self.batch_window < 0:
            raise DiskOptionsError("--batch-window must not be negative")
        for name in ("idle_timeout", "attach_timeout", "call_timeout", "retry_min",
                     "kvm_timeout"):
            if getattr(self, name) <= 0:
                raise DiskOptionsError(f"--{name.replace('_', '-')} must be positive")

    def attach_options(self) -> AttachOptions:
        opts = AttachOptions(attach_timeout=self.attach_timeout, call_timeout=self.call_timeout,
                             memsize_mb=self.appliance_memory, force_tcg=self.force_tcg)
        if self.python:
            opts.python = self.python
        return opts


#: (field, metavar, help) of every valued flag, in `--help` order; the default and the type
#: come from `DiskOptions` itself, so a default is written once.
_FLAGS: list[tuple[str, str, str]] = [
    ("idle_timeout", "S", "detach a disk unused for this long (default %(default)s s)"),
    ("attach_timeout", "S", "kill an appliance launch that takes longer "
                            "(default %(default)s s; TCG launches take 15-45 s)"),
    ("attach_wait", "S", "how long a lookup waits for a disk that is attaching before it "
                         "fails with EIO (default %(default)s s)"),
    ("call_timeout", "S", "kill the appliance if one guest call takes longer "
                          "(default %(default)s s)"),
    ("disks_per_appliance", "N", "disks launched together in one appliance at most "
                                 "(default %(default)s)"),
    ("batch_window", "S", "attaches wanted within this long share one launch "
                          "(default %(default)s s)"),
    ("max_memory", "MiB", "memory of all appliances together; the least recently used "
                          "idle appliance is closed first (default %(default)s)"),
    ("max_appliances", "N", "appliances at most (default %(default)s)"),
    ("max_launches", "N", "appliance launches at once (default %(default)s)"),
    ("appliance_memory", "MiB", "guest memory of each appliance (default %(default)s)"),
    ("kvm_timeout", "S", "bound of the KVM probe launch at start; past it the daemon uses "
                         "TCG (default %(default)s s)"),
    ("refresh_quiet", "S", "remount before a lookup that follows this much silence on the "
                           "disk (default %(default)s s)"),
    ("max_staleness", "S", "never answer from a snapshot older than this while no transfer "
                           "is open (default %(default)s s)"),
    ("retry_min", "S", "first retry after a failed attach (doubles; default %(default)s s)"),
    ("retry_max", "S", "longest wait between retries (default %(default)s s)"),
]


def _add(group: argparse._ArgumentGroup, name: str, metavar: str, text: str) -> None:
    """`--name-with-dashes`, typed and defaulted like the `DiskOptions` field `name`."""
    default = getattr(DiskOptions(), name)
    group.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       metavar=metavar, help=text)
