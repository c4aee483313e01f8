"""The real KVM probe on this machine: bounded, decided once, nothing left running."""

from __future__ import annotations

import os
import pathlib
import time

import pytest

from vfsroot import accel
from vfsroot.guest_process import _descendants

from .conftest import needs_guestfs

pytestmark = [pytest.mark.disk, needs_guestfs,
              pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                 reason="no usable /dev/kvm: the daemon would not probe")]


def _qemus() -> list[int]:
    out = []
    for pid in _descendants(os.getpid()):
        try:
            if b"qemu" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


async def test_kvm_probe_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where nested KVM hangs (this project's machines) the probe is killed at its bound and
    the answer is TCG; where KVM works the answer is KVM, within the bound either way."""
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "")
    t0 = time.monotonic()
    acc = await accel.choose(False, 20.0, 512)
    took = time.monotonic() - t0
    assert took < 20.0 + 15, took  # the bound, plus killing the worker and its qemu
    assert acc.name in ("kvm", "tcg")
    if acc.name == "tcg":
        assert acc.force_tcg and "KVM probe failed" in acc.reason, acc.reason
    else:
        assert "KVM probe launched" in acc.reason
    assert not _qemus()
