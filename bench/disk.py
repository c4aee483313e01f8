"""Client-disk benchmark: what the disk layer costs on top of bare libguestfs.

Not a test: prints a table and writes bench/results/disk.json.  Run as root:

    .venv/bin/python bench/disk.py [--rounds 3] [--force-tcg]

Measures, against one real image (tests/disk/images.py) served by nbdkit on 127.0.0.1:

* bare launch: `guestfish --ro -a nbd://...` `run` (libguestfs alone), and its `download` of
  /boot/big.bin (16 MiB) to /dev/null, cold and warm;
* cold attach to first byte: `vfsroot serve` started with the config in place, until the
  first byte of /boot/vmlinuz is read through the mount; ratio to the bare launch;
* warm lookup latency: `stat` of a disk file through the mount (cached node, and a name that
  does not exist, which costs one guest round trip per lookup);
* sequential read through the mount (cold and warm guest cache; the kernel page cache is
  dropped for the file between rounds with posix_fadvise), MB/s, vs guestfish download.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.disk.images import NbdServer, build_image  # noqa: E402

CLIENT = "127.0.0.77"


def guestfish(url: str, script: str) -> tuple[float, str]:
    t0 = time.monotonic()
    out = subprocess.run(["guestfish", "--ro", "--format=raw", "-a", url], input=script,
                         capture_output=True, text=True, check=True)
    return time.monotonic() - t0, out.stdout + out.stderr


def elapsed(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"elapsed time: ([0-9.]+) seconds", text)]


def read_through(path: pathlib.Path, chunk: int = 1 << 20) -> tuple[float, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.monotonic()
        n = 0
        while data := os.read(fd, chunk):
            n += len(data)
        return time.monotonic() - t0, n
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--force-tcg", action="store_true",
                    help="set LIBGUESTFS_BACKEND_SETTINGS=force_tcg for every launch")
    args = ap.parse_args()
    os.environ["LIBGUESTFS_BACKEND"] = "direct"
    if args.force_tcg:
        os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    results: dict[str, object] = {"rounds": args.rounds,
                                  "backend_settings": os.environ.get(
                                      "LIBGUESTFS_BACKEND_SETTINGS", "")}
    with tempfile.TemporaryDirectory(prefix="vfsroot-bench-") as tmp_s:
        tmp = pathlib.Path(tmp_s)
        image = build_image(tmp / "disk.img")
        big = image.files["/boot/big.bin"]
        server = NbdServer(image.path).start()
        try:
            # --- bare libguestfs ------------------------------------------------------
            script = ("time run\nmount-ro /dev/sda2 /\n"
                      + "time download /boot/big.bin /dev/null\n" * args.rounds)
            total, out = guestfish(server.url, script)
            times = elapsed(out)
            bare_launch, downloads = times[0], times[1:]
            results["bare_launch_s"] = bare_launch
            results["guestfish_total_s"] = total
            results["guestfish_download_cold_MBps"] = len(big) / downloads[0] / 1e6
            results["guestfish_download_warm_MBps"] = len(big) / statistics.median(
                downloads[1:] or downloads) / 1e6

            # --- vfsroot: cold attach to first byte through the mount -----------------
            src, mnt = tmp / "src", tmp / "mnt"
            (src / "default").mkdir(parents=True)
            mnt.mkdir()
            (src / f"{CLIENT}.nbd").write_text(json.dumps({
                "url": server.url,
                "mounts": [{"partition": 2, "mountpoint": "/"},
                           {"partition": 1, "mountpoint": "/boot/efi"}],
                "tftp_root": "/boot"}))
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "vfsroot.cli", "--log-level", "WARNING", "serve",
                 "--source", str(src), "--mount", str(mnt), "--attach-wait", "2",
                 "--refresh-quiet", "3600", "--max-staleness", "3600",
                 "--attach-timeout", "300"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                first = None
                while time.monotonic() - t0 < 400:
                    try:
                        with open(mnt / CLIENT / "vmlinuz", "rb") as f:
                            if f.read(1):
                                first = time.monotonic() - t0
                                break
                    except OSError:
                        time.sleep(0.2)
                if first is None:
                    raise SystemExit("the disk never attached")
                results["cold_attach_first_byte_s"] = first
                results["cold_vs_bare_launch_ratio"] = first / bare_launch

                # --- warm lookups -------------------------------------------------------
                f_path = mnt / CLIENT / "vmlinuz-6.1"
                os.stat(f_path)
                lat = []
                for _ in range(200):
                    t = time.perf_counter()
                    os.stat(f_path)
                    lat.append(time.perf_counter() - t)
                results["warm_stat_median_ms"] = statistics.median(lat) * 1e3
                miss = []
                for i in range(100):
                    t = time.perf_counter()
                    with contextlib.suppress(FileNotFoundError):
                        os.stat(mnt / CLIENT / f"missing-{i}")
                    miss.append(time.perf_counter() - t)
                results["miss_lookup_median_ms"] = statistics.median(miss) * 1e3

                # --- sequential reads ------------------------------------------------------
                reads = []
                for _ in range(args.rounds):
                    secs, n = read_through(mnt / CLIENT / "big.bin")
                    assert n == len(big)
                    reads.append(secs)
                results["mount_read_cold_MBps"] = len(big) / reads[0] / 1e6
                results["mount_read_warm_MBps"] = len(big) / statistics.median(
                    reads[1:] or reads) / 1e6
                results["mount_vs_guestfish_warm_ratio"] = (
                    results["mount_read_warm_MBps"] / results["guestfish_download_warm_MBps"])
                st = json.loads(os.getxattr(mnt, "user.vfsroot.status"))[CLIENT]
                results["appliance_rss_mb"] = st.get("appliance_rss_mb")
                results["attach_seconds"] = st.get("attach_seconds")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        finally:
            server.stop()
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "disk.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
