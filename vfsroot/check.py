"""`vfsroot check`: can this machine attach client disks, and how?

Answers the questions an operator has before trusting the disk layer, each as one line:
is the libguestfs binding importable by the interpreter the daemon will use; is there a
/dev/kvm; does an appliance launch with KVM finish (nested KVM hangs forever on some hosts:
we bound it and say "use --force-tcg"); does a TCG launch finish within --attach-timeout.
Launches use an empty scratch disk, so no NBD server is needed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import trio

from .guest_process import AttachOptions, GuestProcess, GuestProcessError, rss_mb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kvm-timeout", type=float, default=30.0, metavar="S",
                        help="a KVM launch slower than this counts as hung (default %(default)s)")
    parser.add_argument("--attach-timeout", type=float, default=180.0, metavar="S",
                        help="bound for the TCG launch (default %(default)s s)")
    parser.add_argument("--appliance-memory", type=int, default=512, metavar="MiB")
    parser.add_argument("--skip-kvm", action="store_true", help="do not try a KVM launch")
    parser.add_argument("--skip-launch", action="store_true",
                        help="only check the binding and /dev/kvm (instant)")


def _line(ok: bool | None, text: str) -> None:
    mark = {True: "ok  ", False: "FAIL", None: "note"}[ok]
    print(f"{mark} {text}", flush=True)


async def _launch(force_tcg: bool, timeout: float, memsize: int) -> tuple[bool, str]:
    opts = AttachOptions(attach_timeout=timeout, memsize_mb=memsize, force_tcg=force_tcg)
    proc = GuestProcess("check-" + ("tcg" if force_tcg else "kvm"), opts)
    t0 = time.monotonic()
    try:
        await proc.start([], scratch=16 * 1024 * 1024)
    except GuestProcessError as e:
        return False, f"{e.strerror}"
    except OSError as e:
        return False, f"launch failed: {e.strerror or e}"
    rss = rss_mb(proc.qemu_pid)
    await proc.close()
    took = time.monotonic() - t0
    return True, f"launched in {took:.1f} s" + (f", appliance RSS {rss:.0f} MiB" if rss else "")


def run(args: argparse.Namespace) -> int:
    """Print the findings; 0 if disks can be attached somehow, 1 otherwise."""
    os.environ["LIBGUESTFS_BACKEND"] = "direct"
    python = sys.executable
    probe = subprocess.run([python, "-c", "import guestfs"], capture_output=True, text=True)
    if probe.returncode != 0:
        _line(False, f"python3-guestfs is not importable by {python}: install python3-guestfs "
              "and make the venv from /usr/bin/python3 with --system-site-packages")
        return 1
    _line(True, f"python3-guestfs importable by {python}")
    kvm = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    _line(kvm or None, "/dev/kvm is usable" if kvm else "no usable /dev/kvm: launches use TCG "
          "(25-45 s each)")
    if os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "").find("force_tcg") >= 0:
        _line(None, "LIBGUESTFS_BACKEND_SETTINGS forces TCG for every launch")
    if args.skip_launch:
        return 0
    kvm_ok = False
    if kvm and not args.skip_kvm:
        ok, text = trio.run(_launch, False, args.kvm_timeout, args.appliance_memory)
        kvm_ok = ok
        if ok:
            _line(True, f"KVM: {text}")
        else:
            _line(False, f"KVM: {text} — KVM does not work here: run "
                  "`vfsroot serve --force-tcg` (or LIBGUESTFS_BACKEND_SETTINGS=force_tcg)")
    ok, text = trio.run(_launch, True, args.attach_timeout, args.appliance_memory)
    _line(ok, f"TCG: {text}" + ("" if ok else " — client disks cannot be attached"))
    if ok and not kvm_ok:
        _line(None, "serve with --force-tcg and an --attach-timeout well above the TCG time")
    return 0 if (ok or kvm_ok) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vfsroot check")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
