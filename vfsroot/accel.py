"""KVM or TCG for the daemon's appliances, decided once at start by a bounded probe launch.

With working KVM an appliance launches in ~2 s; under TCG in 25-45 s.  But nested KVM hangs
forever on some hosts, and on others qemu aborts at once: so the daemon launches one empty
appliance with KVM allowed, bounded by `--kvm-timeout`, and if that does not finish it uses TCG
for the rest of its life, says so once in the log, and shows it in `vfsroot status`.  An
operator's choice is never second-guessed: `--force-tcg` or `force_tcg` in
`LIBGUESTFS_BACKEND_SETTINGS` skip the probe.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .guest_process import AttachOptions, GuestProcess

log = logging.getLogger(__name__)

#: The probe's scratch disk (bytes): empty, so no NBD server is involved.
SCRATCH = 16 * 1024 * 1024


@dataclass(frozen=True)
class Accelerator:
    """What the daemon's appliances run on, and why (shown in `vfsroot status`)."""

    name: str  # "kvm" or "tcg"
    reason: str

    @property
    def force_tcg(self) -> bool:
        return self.name == "tcg"


def forced_tcg(force_tcg: bool, environ: dict[str, str] | None = None) -> str | None:
    """Why TCG is forced without a probe, or None."""
    env = os.environ if environ is None else environ
    if force_tcg:
        return "forced by --force-tcg"
    if "force_tcg" in env.get("LIBGUESTFS_BACKEND_SETTINGS", "").split(":"):
        return "forced by LIBGUESTFS_BACKEND_SETTINGS"
    if not (os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        return "no usable /dev/kvm"
    return None


async def probe_launch(timeout: float, memsize_mb: int) -> None:
    """Launch and close an empty appliance with KVM allowed; raises OSError when it fails or
    does not finish within `timeout` (then the worker and its qemu are killed)."""
    proc = GuestProcess("kvm-probe", AttachOptions(attach_timeout=timeout,
                                                   memsize_mb=memsize_mb, force_tcg=False))
    try:
        await proc.start([], scratch=SCRATCH)
    finally:
        with trio.CancelScope(shield=True):
            await proc.close()


async def choose(force_tcg: bool, timeout: float, memsize_mb: int,
                 probe: Callable[[float, int], Awaitable[None]] = probe_launch) -> Accelerator:
    """Decide once; logs the decision (a fallback to TCG at WARNING)."""
    why = forced_tcg(force_tcg)
    if why is not None:
        acc = Accelerator("tcg", why)
        log.info("appliances accelerator=tcg reason=%r", why)
        return acc
    t0 = time.monotonic()
    try:
        await probe(timeout, memsize_mb)
    except OSError as e:
        reason = (f"KVM probe failed after {time.monotonic() - t0:.1f} s "
                  f"({getattr(e, 'strerror', None) or e}): using TCG until restart")
        log.warning("appliances accelerator=tcg reason=%r", reason)
        return Accelerator("tcg", reason)
    acc = Accelerator("kvm", f"KVM probe launched in {time.monotonic() - t0:.1f} s")
    log.info("appliances accelerator=kvm reason=%r", acc.reason)
    return acc
