"""Peer TFTP servers for bench/tftp.py: fetched with ``apt-get download`` and unpacked with
``dpkg -x`` into a private cache (tftpd-hpa and atftpd conflict as installed packages, and the
benchmark must not change the machine), then started in the foreground on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = {"tftpd-hpa": "in.tftpd", "atftpd": "atftpd", "dnsmasq-base": "dnsmasq"}


def in_private_netns(script: str, argv: list[str] | None, cache: Path) -> int | None:
    """Run the benchmark ``script`` in a private network namespace (``unshare --net``).

    Outside it: fetch the peers (that needs the network), re-execute ``script`` with
    ``argv`` inside a new namespace and return its exit status (2 if not root).  Inside it
    (the re-executed run): bring loopback up with a second address (tftpd-hpa exits with 66
    when 127.0.0.1 is the only one, docs/clients.md) and return None: go on."""
    if os.environ.get("VFSROOT_BENCH_NETNS") != "1":
        if os.geteuid() != 0:
            print(f"{Path(script).name}: run as root (network namespace)", file=sys.stderr)
            return 2
        fetch_peers(cache)
        env = {**os.environ, "VFSROOT_BENCH_NETNS": "1"}
        return subprocess.call(["unshare", "--net", "--", sys.executable, script,
                                *(argv if argv is not None else sys.argv[1:])], env=env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], check=False,
                   stderr=subprocess.DEVNULL)
    return None


def fetch_peers(cache: Path) -> dict[str, Path]:
    """Binary path per package, downloading and unpacking what the cache lacks."""
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o755)  # apt's _apt user must be able to write the download
    found: dict[str, Path] = {}
    for pkg, binary in PACKAGES.items():
        root = cache / pkg
        path = root / "usr" / "sbin" / binary
        if not path.exists():
            debs = cache / "debs"
            debs.mkdir(exist_ok=True)
            os.chmod(debs, 0o777)
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=debs, check=True,
                           stdout=subprocess.DEVNULL)
            deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        found[pkg] = path
    return found


#: cgroup v1 CPU accounting: every process a server forks (tftpd-hpa: one per transfer, gone
#: before anyone could read its /proc entry; vfsroot: its workers) is counted in its group.
CPUACCT = Path("/sys/fs/cgroup/cpuacct")


@dataclass
class Running:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    cgroup: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.cgroup is not None:
            for _ in range(50):  # children leave the group as they exit
                try:
                    self.cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def _cgroup(name: str) -> Path | None:
    """A fresh cpuacct group for one server, or None where cgroup v1 cpuacct is missing."""
    if not (CPUACCT / "cpuacct.usage").exists():
        return None
    path = CPUACCT / f"vfsroot-bench-{name}-{os.getpid()}"
    try:
        path.mkdir()
    except OSError:
        return None
    return path


def start_servers(bins: dict[str, Path], root: Path, logdir: Path,
                  max_clients: int, workers: int | None = None,
                  cpu: str | None = None, python_lane: bool = False,
                  second_vfsroot: str | None = None, unbatched: bool = False,
                  only: set[str] | None = None) -> list[Running]:
    """vfsroot-tftpd, tftpd-hpa, atftpd, dnsmasq serving ``root`` on 127.0.0.1.

    All get the same limits where they have them: block sizes up to 65464, at least
    ``max_clients`` concurrent transfers, no per-transfer logging beyond their default.
    ``root`` holds the files; vfsroot serves ``root/127.0.0.1`` through its per-client mode (its
    normal path), so the peers are pointed at that same directory.  ``python_lane``: also
    ``vfsroot-py``, vfsroot-tftpd answering lock-step ACKs in Python (``--python-lane``), to
    see what the compiled lane is worth in the same run.  ``second_vfsroot``: the name of
    one more vfsroot-tftpd with the default flags (bench/storm_split.py changes it after the
    start, e.g. pins its workers).  ``unbatched``: also ``vfsroot-send``, vfsroot-tftpd whose
    compiled lane sends one send() per ACK (``--no-batch-sends``), to see what io_uring is
    worth in the same run.  ``only``: start just these names.
    """
    served = root / "127.0.0.1"

    def vfsroot(port: int, *extra: str) -> tuple[int, list[str]]:
        return port, [sys.executable, "-m", "tftpd.cli", "--root", str(root),
                      "--listen", f"127.0.0.1:{port}", "--blksize-max", "65464",
                      "--max-sessions", str(4 * max_clients),
                      "--max-sessions-per-ip", str(2 * max_clients),
                      *(["--workers", str(workers)] if workers else []),
                      "--log-level", "WARNING", *extra]

    specs = {
        "vfsroot": vfsroot(6901),
        "tftpd-hpa": (6902, [str(bins["tftpd-hpa"]), "-L", "-a", "127.0.0.1:6902", "-s",
                             "-u", "root", "-B", "65464", str(served)]),
        "atftpd": (6903, [str(bins["atftpd"]), "--daemon", "--no-fork", "--port", "6903",
                          "--bind-address", "127.0.0.1", "--user", "root.root", "--logfile",
                          str(logdir / "atftpd.log"), "--maxthread", str(2 * max_clients),
                          str(served)]),
        # dnsmasq's TFTP port is fixed at 69: fine inside the benchmark's network namespace.
        "dnsmasq": (69, [str(bins["dnsmasq-base"]), "-k", "--conf-file=/dev/null", "--port=0",
                         "--enable-tftp", f"--tftp-root={served}", "--listen-address=127.0.0.1",
                         "--bind-interfaces", f"--tftp-max={2 * max_clients}", "--user=root",
                         "--quiet-tftp", f"--pid-file={logdir / 'dnsmasq.pid'}"]),
    }
    if python_lane:
        specs["vfsroot-py"] = vfsroot(6904, "--python-lane")
    if second_vfsroot is not None:
        specs[second_vfsroot] = vfsroot(6905)
    if unbatched:
        specs["vfsroot-send"] = vfsroot(6906, "--no-batch-sends")
    if only is not None:
        specs = {name: spec for name, spec in specs.items() if name in only}
    running = []
    for name, (port, cmd) in specs.items():
        log = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 (lives as long as the server)
        if cpu is not None:
            cmd = ["taskset", "-c", cpu, *cmd]
        group = _cgroup(name)
        if group is not None:  # join the group, then become the server (same pid)
            cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
        running.append(Running(name, port, proc, group))
    time.sleep(1.0)
    for r in running:
        if r.proc.poll() is not None:
            for other in running:
                other.stop()
            raise SystemExit(f"{r.name} exited with {r.proc.returncode}: see {logdir}/{r.name}.log")
    return running


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def server_cpu_seconds(server: Running) -> float:
    """CPU seconds used so far by the server and everything it forked: from its cpuacct
    group when there is one, else from /proc (misses children nobody waited for)."""
    if server.cgroup is not None:
        try:
            return int((server.cgroup / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            pass
    return cpu_seconds(server.pid)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, its reaped children (tftpd-hpa forks per transfer) and
    its live children (vfsroot --workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):  # a child that exited meanwhile
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(c) for c in _children(pid))


def peak_rss_mib(pid: int) -> float:
    """Peak RSS of the process plus that of its live children (worker processes).  A child
    that exits while it is read (tftpd-hpa's process per transfer) counts 0: it is not a
    live child any more."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    peak = 0.0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return peak + sum(peak_rss_mib(c) for c in _children(pid))
