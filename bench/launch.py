"""Appliance launch benchmark: what each launch setting costs under TCG, measured in turns.

Not a test: prints one line per launch and a table of medians.  Run as root, on a quiet
machine (`flock -x /tmp/vfsroot-heavy.lock`):

    LIBGUESTFS_BACKEND_SETTINGS=force_tcg /usr/bin/python3 bench/launch.py --rounds 3

Each round launches one appliance per variant, in turn (so load drifts hit all variants
alike), each in a fresh process with one empty 16 MiB drive, and times `g.launch()`:

* `bzimage`: libguestfs' own appliance, as a plain launch does it;
* `pvh`: the same appliance booted from its kernel decompressed once on the host
  (`vfsroot.guest_kernel`);
* `pvh+initrd`: `pvh` with the lean initrd (`vfsroot.guest_initrd`);
* `pvh+init`: `pvh` with the lean /init (`vfsroot.guest_init`);
* `lean`: all three: what the daemon launches;
* `pvh+smp2`, `pvh+mem256` (not run unless named): two vCPUs; 256 MiB instead of 512;
* `lean+pcinoacpi` (not run unless named): `lean` with `pci=noacpi` on the kernel command
  line (PCI interrupts routed without ACPI's AML).

With `--timeline` every launch runs verbose (libguestfs' `guestfs_boot_analysis=1` keeps its
/init from listing /dev and the like) and prints when each phase began, counted from the
`launch()` call by the host's clock as the console lines arrive; `--console DIR` also saves
every launch's console, each line with that time.  Verbose launches are slower than quiet
ones: compare phases between variants of the same run, launch totals without `--timeline`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE = r"""
import os, sys, tempfile, time, json
sys.path.insert(0, sys.argv[1])
import guestfs
from vfsroot.guest_kernel import fast_appliance, parts
variant, timeline = sys.argv[2], sys.argv[3] == "1"
f = tempfile.NamedTemporaryFile(); f.truncate(16 << 20); f.flush()
g = guestfs.GuestFS(python_return_dict=True)
g.set_memsize(256 if "mem256" in variant else 512)
g.set_smp(2 if "smp2" in variant else 1)
extra = {"pcinoacpi": " pci=noacpi"}
g.set_append("norandmaps" + "".join(v for k, v in extra.items() if k in variant)
             + (" guestfs_boot_analysis=1" if timeline else ""))
what = "supermin appliance"
if variant != "bzimage":
    lean = variant.startswith("lean")
    path = fast_appliance(g.get_cachedir(), g.get_path(),
                          lean_initrd=lean or "initrd" in variant,
                          lean_init=lean or "init" in variant.replace("initrd", ""))
    assert path, "no fast appliance here"
    g.set_path(path)
    what = parts(path)
lines = []
if timeline:
    g.set_verbose(True)
    pending = [""]
    def cb(ev, eh, buf, arr):
        now = time.monotonic()
        text = pending[0] + (buf if isinstance(buf, str) else buf.decode(errors="replace"))
        *done, pending[0] = text.split("\n")
        lines.extend((now, line.rstrip("\r")) for line in done)
    g.set_event_callback(cb, guestfs.EVENT_APPLIANCE | guestfs.EVENT_LIBRARY)
g.add_drive_opts(f.name, format="raw", readonly=True)
t0 = time.monotonic(); g.launch(); launch = time.monotonic() - t0
g.shutdown(); g.close()
print(json.dumps({"launch": launch, "what": what,
                  "lines": [(t - t0, line) for t, line in lines]}))
"""

VARIANTS = ["bzimage", "pvh", "pvh+initrd", "pvh+init", "lean"]

#: Console lines that start a phase (first line containing the text), in boot order.
MARKS = [
    ("kernel", "Linux version"),
    ("initrd", "supermin: ext2 mini initrd starting up"),
    ("root", "supermin: chroot"),
    ("init", "Starting /init script"),
    ("udevd", "+ udevadm trigger"),
    ("settle", "+ udevadm settle"),
    ("net", "+ ip addr add"),
    ("scans", "+ mdadm -As --auto=yes --no-degraded"),
    ("lvm", "+ lvm pvscan"),
    ("ldm", "+ ldmtool"),
    ("daemon", "+ guestfsd"),
]


def marks(lines: list[tuple[float, str]]) -> dict[str, float]:
    """When each phase of `MARKS` began (seconds after the launch call), as far as seen."""
    out: dict[str, float] = {}
    for key, needle in MARKS:
        for t, line in lines:
            if needle in line:
                out[key] = t
                break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--console", metavar="DIR", help="save each launch's console here")
    args = parser.parse_args()
    env = {**os.environ, "LIBGUESTFS_BACKEND": "direct"}
    variants = args.variants.split(",")
    timeline = args.timeline or bool(args.console)
    times: dict[str, list[float]] = {v: [] for v in variants}
    phases: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    if args.console:
        os.makedirs(args.console, exist_ok=True)
    for r in range(args.rounds):
        for v in variants:
            out = subprocess.run(["/usr/bin/python3", "-c", ONE, ROOT, v,
                                  "1" if timeline else "0"],
                                 capture_output=True, text=True, env=env, timeout=300)
            if out.returncode != 0:
                print(f"round {r + 1} {v}: failed: {out.stderr.strip()[-300:]}")
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[v].append(res["launch"])
            m = marks(res["lines"])
            phases[v].append(m)
            if args.console:
                with open(os.path.join(args.console, f"r{r + 1}-{v}.log"), "w") as f:
                    f.writelines(f"{t:7.3f} {line}\n" for t, line in res["lines"])
            load = os.getloadavg()[0]
            extra = " ".join(f"{k}={t:.2f}" for k, t in m.items())
            print(f"round {r + 1} {v:12s} launch {res['launch']:6.2f} s  {extra}  "
                  f"load {load:.1f}  [{res['what']}]", flush=True)
        time.sleep(1)
    print("\nvariant       median   runs")
    for v in variants:
        if times[v]:
            print(f"{v:12s} {statistics.median(times[v]):6.2f} s  "
                  + " ".join(f"{t:.1f}" for t in times[v]))
    if timeline:
        print("\nmedian phase starts (s after launch())")
        keys = [k for k, _ in MARKS]
        print(f"{'variant':12s} " + " ".join(f"{k:>7s}" for k in keys) + "    end")
        for v in variants:
            row = []
            for k in keys:
                seen = [p[k] for p in phases[v] if k in p]
                row.append(f"{statistics.median(seen):7.2f}" if seen else "      -")
            if times[v]:
                print(f"{v:12s} " + " ".join(row) + f" {statistics.median(times[v]):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
