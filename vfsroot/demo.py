"""The README's demo: a bundled source root served through /run/vfsroot and TFTP.

    127.0.0.10   has its own directory (shadows default/hello.txt and pxelinux.cfg/default)
    127.0.0.11   has its own NBD disk (a real FAT partition served by nbdkit on 127.0.0.1)
    anyone else  sees default/

It runs the real programs, each as its own process (nbdkit, `vfsroot serve`,
`vfsroot-tftpd`), prints what to try, and stops them all cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .defaults import DEFAULT_MOUNT
from .mountinfo import mounted_fstype

log = logging.getLogger("vfsroot.demo")

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "demo"
DISK_CLIENT = "127.0.0.11"
DIR_CLIENT = "127.0.0.10"
READY_TIMEOUT = 30.0


class DemoError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_fat_image(files: Path, image: Path, size_mib: int = 64) -> None:
    """A real MBR disk image with one FAT32 partition holding `files`, built without root
    and without mounting anything (sfdisk, mkfs.fat --offset, mtools)."""
    with open(image, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    subprocess.run(["sfdisk", "--quiet", str(image)], input=b"label: dos\nstart=2048, type=c\n",
                   check=True, capture_output=True)
    sectors = size_mib * 2048 - 2048
    subprocess.run(["mkfs.fat", "-F", "32", "-n", "BOOT", "--offset", "2048", str(image),
                    str(sectors // 2)], check=True, capture_output=True)
    target = f"{image}@@{2048 * 512}"
    entries = sorted(p for p in files.rglob("*"))
    for path in entries:
        rel = path.relative_to(files).as_posix()
        if path.is_dir():
            subprocess.run(["mmd", "-i", target, f"::/{rel}"], check=True, capture_output=True)
        else:
            subprocess.run(["mcopy", "-i", target, str(path), f"::/{rel}"], check=True,
                           capture_output=True)


def wait_for(predicate: object, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with status {proc.returncode} (see its log above)")
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise DemoError(f"{what} was not ready within {READY_TIMEOUT:.0f}s")


def is_demo_mount(mountpoint: Path) -> bool:
    """The demo's own `vfsroot serve` is mounted there (checked before it started: nothing
    else was)."""
    return mounted_fstype(mountpoint) == "fuse.vfsroot"


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vfsroot-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--mount", type=Path, default=DEFAULT_MOUNT)
    parser.add_argument("--workdir", type=Path, default=Path("/var/lib/vfsroot-demo"))
    parser.add_argument("--tftp-listen", default="127.0.0.1:69",
                        help="where vfsroot-tftpd listens (default 127.0.0.1:69: the demo's "
                             "files are for this machine; [::]:69 serves the network)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="demo: %(message)s")
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        # A mount already there (by default /run/vfsroot: the systemd service's) is not the
        # demo's to take over, nor to unmount on the way out.
        found = mounted_fstype(args.mount)
        if found is not None:
            raise DemoError(f"{args.mount} is already mounted ({found}): stop what serves it "
                            "(systemctl stop vfsroot) or give the demo another --mount")
        return _run(args, procs)
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        for name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop, killing it", name)
                    proc.kill()
                    proc.wait()
        if any(name == "vfsroot" for name, _ in procs) and is_demo_mount(args.mount):
            subprocess.run(["fusermount3", "-u", "-z", str(args.mount)], check=False)
        log.info("stopped")


def _run(args: argparse.Namespace, procs: list[tuple[str, subprocess.Popen[bytes]]]) -> int:
    if not BUNDLE.is_dir():
        raise DemoError(f"the bundled demo tree {BUNDLE} is missing")
    bindir = Path(sys.executable).parent
    source = args.workdir / "source"
    if source.exists():
        shutil.rmtree(source)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(BUNDLE / "source", source)

    # Client 127.0.0.11's own disk: a real partitioned image served by nbdkit.
    image = args.workdir / f"{DISK_CLIENT}.img"
    log.info("building %s's disk image %s", DISK_CLIENT, image)
    build_fat_image(BUNDLE / "disk", image)
    port = free_port()
    nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--ipaddr", "127.0.0.1",
                               "--port", str(port), "file", f"file={image}"])
    procs.append(("nbdkit", nbdkit))
    wait_for(lambda: tcp_open(port), "nbdkit", nbdkit)
    config = {"url": f"nbd://127.0.0.1:{port}",
              "mounts": [{"partition": 1, "mountpoint": "/"}], "tftp_root": "/"}
    (source / f"{DISK_CLIENT}.nbd").write_text(json.dumps(config, indent=2) + "\n")

    vfsroot = subprocess.Popen([str(bindir / "vfsroot"), "serve", "--source", str(source),
                                "--mount", str(args.mount)])
    procs.append(("vfsroot", vfsroot))
    wait_for(lambda: is_demo_mount(args.mount), "vfsroot serve", vfsroot)

    tftpd = subprocess.Popen([str(bindir / "vfsroot-tftpd"), "--root", str(args.mount),
                              "--listen", args.tftp_listen])
    procs.append(("vfsroot-tftpd", tftpd))
    time.sleep(1.0)
    if tftpd.poll() is not None:
        raise DemoError(f"vfsroot-tftpd exited with status {tftpd.returncode}")

    m = args.mount
    print(f"""
vfsroot demo is running: source root {source}, mounted at {m}, TFTP on {args.tftp_listen}.
Client {DIR_CLIENT} has its own directory, {DISK_CLIENT} has its own NBD disk (nbdkit on
127.0.0.1:{port}; its first access attaches it through libguestfs, 25-45 s without KVM).

Try, in another terminal:
  ls {m}/                                   # default and the known clients
  cat {m}/{DIR_CLIENT}/hello.txt             # the client's own file
  cat {m}/127.0.0.99/hello.txt             # any other IP: the default view
  getfattr -d {m}/{DIR_CLIENT}/hello.txt     # which layer serves it, from where
  {bindir}/vfsroot explain {DIR_CLIENT} hello.txt
  ls {m}/{DISK_CLIENT}/                      # files from the client's own disk
  {bindir}/vfsroot status
  curl -s --interface {DIR_CLIENT} tftp://127.0.0.1/hello.txt
  curl -s --interface {DISK_CLIENT} tftp://127.0.0.1/pxelinux.cfg/default

Edit anything under {source}: the mount shows it within a second.
Ctrl-C stops the demo and unmounts.
""", flush=True)
    with _signals_as_keyboard_interrupt():
        try:
            while True:
                for name, proc in procs:
                    if proc.poll() is not None:
                        raise DemoError(f"{name} exited with status {proc.returncode}")
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\ndemo: stopping", flush=True)
    return 0


class _signals_as_keyboard_interrupt:
    """SIGTERM stops the demo like Ctrl-C does."""

    def __enter__(self) -> None:
        def handler(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        self._old = signal.signal(signal.SIGTERM, handler)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._old)


if __name__ == "__main__":
    sys.exit(main())
