"""Appliance launch benchmark: what each launch setting costs under TCG, measured in turns.

Not a test: prints one line per launch and a table of medians.  Run as root, on a quiet
machine (`flock -x /tmp/vfsroot-heavy.lock`):

    LIBGUESTFS_BACKEND_SETTINGS=force_tcg /usr/bin/python3 bench/launch.py --rounds 3

Each round launches one appliance per variant, in turn (so load drifts hit all variants
alike), each in a fresh process with one empty 16 MiB drive, and times `g.launch()`:

* `bzimage`: libguestfs' own appliance, as a plain launch does it;
* `pvh`: the same appliance booted from its kernel decompressed once on the host
  (`vfsroot.guest_kernel`, what the daemon does);
* `pvh+smp2`: the same with two vCPUs (multi-threaded TCG);
* `pvh+mem256`: the same with 256 MiB of guest memory instead of 512.

With `--timeline` every launch runs verbose and prints when the guest kernel started and when
/init began, counted from qemu's start.
"""

from __future__ import annotations

import argparse
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
from vfsroot.guest_kernel import fast_appliance
variant, timeline = sys.argv[2], sys.argv[3] == "1"
f = tempfile.NamedTemporaryFile(); f.truncate(16 << 20); f.flush()
g = guestfs.GuestFS(python_return_dict=True)
g.set_memsize(256 if "mem256" in variant else 512)
g.set_smp(2 if "smp2" in variant else 1)
g.set_append("norandmaps")
if variant.startswith("pvh"):
    path = fast_appliance(g.get_cachedir(), g.get_path())
    assert path, "no fast appliance here"
    g.set_path(path)
marks = {}
if timeline:
    g.set_verbose(True)
    t00 = time.monotonic()
    def cb(ev, eh, buf, arr):
        text = buf if isinstance(buf, str) else buf.decode(errors="replace")
        for key, needle in (("qemu", "SeaBIOS"), ("qemu", "Booting from ROM"),
                            ("kernel", "Linux version"), ("init", "Starting /init")):
            if needle in text and key not in marks:
                marks[key] = time.monotonic() - t00
    g.set_event_callback(cb, guestfs.EVENT_APPLIANCE)
g.add_drive_opts(f.name, format="raw", readonly=True)
t0 = time.monotonic(); g.launch(); launch = time.monotonic() - t0
g.shutdown(); g.close()
print(json.dumps({"launch": launch, **{k: v for k, v in marks.items()}}))
"""

VARIANTS = ["bzimage", "pvh", "pvh+smp2", "pvh+mem256"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeline", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "LIBGUESTFS_BACKEND": "direct"}
    variants = args.variants.split(",")
    times: dict[str, list[float]] = {v: [] for v in variants}
    import json  # noqa: PLC0415
    for r in range(args.rounds):
        for v in variants:
            out = subprocess.run(["/usr/bin/python3", "-c", ONE, ROOT, v,
                                  "1" if args.timeline else "0"],
                                 capture_output=True, text=True, env=env, timeout=300)
            if out.returncode != 0:
                print(f"round {r + 1} {v}: failed: {out.stderr.strip()[-300:]}")
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[v].append(res["launch"])
            load = os.getloadavg()[0]
            extra = " ".join(f"{k}={res[k]:.2f}" for k in ("kernel", "init") if k in res)
            print(f"round {r + 1} {v:12s} launch {res['launch']:6.2f} s  {extra}  "
                  f"load {load:.1f}", flush=True)
        time.sleep(1)
    print("\nvariant       median   runs")
    for v in variants:
        if times[v]:
            print(f"{v:12s} {statistics.median(times[v]):6.2f} s  "
                  + " ".join(f"{t:.1f}" for t in times[v]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
