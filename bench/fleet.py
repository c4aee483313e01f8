"""Fleet benchmark: N clients, each with its own disk config, cold, read their kernel at once.

Not a test: prints a table and writes bench/results/fleet.json.  Run as root, on a quiet
machine (`flock -x /tmp/vfsroot-heavy.lock .venv/bin/python bench/fleet.py`):

    .venv/bin/python bench/fleet.py [--sizes 1,8,32,64] [--force-tcg]

For each N: one real image (tests/disk/images.py: FAT + ext4 + symlinks), N nbdkit servers on
127.0.0.1 (one per client, each its own `SRC/<ip>.nbd`, all serving copies-on-read of the same
file), `vfsroot serve` started cold, then N threads read `/run/.../<ip>/vmlinuz-6.1` through the
mount at once, retrying on EIO as a TFTP client would, and check its sha256.  Reported: when
the first and the last client got their kernel (seconds after the daemon started), and the
peak RSS of the daemon with all its workers and qemus (sampled every 0.25 s).  The acceptance
ratios compare N = 32 with N = 1 of the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.disk.images import NbdServer, build_image  # noqa: E402
from tests.serving import stop_serve  # noqa: E402
from vfsroot.guest_process import _descendants, rss_mb  # noqa: E402

KERNEL = "/boot/vmlinuz-6.1"


def tree_rss(pid: int) -> float:
    return sum(rss_mb(p) or 0.0 for p in [pid, *_descendants(pid)])


def run_fleet(n: int, image: pathlib.Path, want_sha: str, tmp: pathlib.Path,
              extra: list[str]) -> dict:
    servers = [NbdServer(image).start() for _ in range(n)]
    src, mnt = tmp / f"src{n}", tmp / f"mnt{n}"
    (src / "default").mkdir(parents=True)
    mnt.mkdir()
    clients = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]
    for c, s in zip(clients, servers, strict=True):
        (src / f"{c}.nbd").write_text(json.dumps({
            "url": s.url, "mounts": [{"partition": 2, "mountpoint": "/"},
                                     {"partition": 1, "mountpoint": "/boot/efi"}],
            "tftp_root": "/boot"}))
    log = (tmp / f"serve{n}.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfsroot.cli", "--log-level", "INFO", "serve", "--source",
         str(src), "--mount", str(mnt), "--attach-timeout", "600", "--refresh-quiet", "3600",
         "--max-staleness", "3600", "--max-memory", "16384", *extra],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    done: dict[str, float] = {}
    bad: dict[str, str] = {}
    peak = [0.0]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.25)

    def client(c: str) -> None:
        path = mnt / c / "vmlinuz-6.1"
        while time.monotonic() - t0 < 900 and not stop.is_set():
            try:
                data = path.read_bytes()
            except OSError:
                time.sleep(1)  # EIO while attaching: retry, as a boot client does
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest != want_sha:
                bad[c] = digest
            done[c] = time.monotonic() - t0
            return

    try:
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError("vfsroot did not mount")
            time.sleep(0.05)
        threading.Thread(target=sampler, daemon=True).start()
        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        status = json.loads(os.getxattr(mnt, "user.vfsroot.status.summary"))
    finally:
        stop.set()
        stop_serve(proc, mnt, timeout=120)
        log.close()
        for s in servers:
            s.stop()
    times = sorted(done.values())
    return {"n": n, "served": len(done), "sha256_mismatches": len(bad),
            "first_s": round(times[0], 1) if times else None,
            "last_s": round(times[-1], 1) if times else None,
            "peak_rss_mib": round(peak[0]), "appliances": len(status["appliances"]),
            "launch_s": [a["launch_s"] for a in status["appliances"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,8,32,64")
    ap.add_argument("--force-tcg", action="store_true")
    ap.add_argument("--disks-per-appliance", type=int, default=None)
    args = ap.parse_args()
    os.environ["LIBGUESTFS_BACKEND"] = "direct"
    extra = ["--force-tcg"] if args.force_tcg else []
    if args.disks_per_appliance:
        extra += ["--disks-per-appliance", str(args.disks_per_appliance)]
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vfsroot-fleet-") as tmp_s:
        tmp = pathlib.Path(tmp_s)
        image = build_image(tmp / "disk.img")
        want = hashlib.sha256(image.files[KERNEL]).hexdigest()
        print(f"{'N':>4} {'served':>7} {'first s':>8} {'last s':>7} {'peak RSS MiB':>13} "
              f"{'appliances':>10}  launch s", flush=True)
        for n in sizes:
            row = run_fleet(n, image.path, want, tmp, extra)
            rows.append(row)
            print(f"{row['n']:>4} {row['served']:>7} {row['first_s']:>8} {row['last_s']:>7} "
                  f"{row['peak_rss_mib']:>13} {row['appliances']:>10}  {row['launch_s']}"
                  + (f"  SHA256 MISMATCHES: {row['sha256_mismatches']}"
                     if row["sha256_mismatches"] else ""), flush=True)
    base = next((r for r in rows if r["n"] == 1), None)
    if base and base["last_s"]:
        for r in rows:
            if r["n"] > 1 and r["last_s"]:
                t = r["last_s"] / base["last_s"]
                m = r["peak_rss_mib"] / base["peak_rss_mib"]
                print(f"N={r['n']}: last served at {t:.2f}x the single client's time, "
                      f"peak RSS {m:.2f}x", flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["served"] == r["n"] and not r["sha256_mismatches"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
