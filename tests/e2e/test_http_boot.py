"""HTTP boot through a stock web server: nginx serving the vfsroot mount per client address.

`/run/vfsroot/<ip>/` is already each client's own tree, so nginx with
``root /run/vfsroot/$remote_addr;`` serves every client its own files; we write no HTTP server.

- Without firmware: one mount, nginx on 127.0.0.1, clients `curl --interface 127.0.0.1x`: the
  same URL gives each client its own bytes (sha256), an unknown client `default/`'s, and `..`
  in every spelling (plain, percent-encoded, encoded slash) never reaches another client's tree.
- With firmware: iPXE (qemu, TCG) gets an `http://` boot file from DHCP, fetches its script,
  kernel and initrd from nginx in the test's namespace, and nginx reads them through vfsroot
  from the client's NBD disk.  No TFTP server runs at all.

The nginx server block is `NGINX_SERVER` (tests/e2e/harness.py, with `nginx_serving`, which
starts nginx over a mount), and docs/recipes.md shows it verbatim
(`test_nginx_recipe_is_the_tested_one`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..scrape import scrape
from .harness import (
    CLIENT_IP,
    NGINX_SERVER,
    SERVER_IP,
    NbdServer,
    Netns,
    VfsrootMount,
    boot_ipxe,
    build_disk,
    build_initrd,
    curl,
    dnsmasq_argv,
    host_kernel,
    ipxe_script,
    nbd_config,
    nginx_serving,
    stop_process,
    tail,
    wait_file,
    world_traversable_mount,
)

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
RECIPES = (HERE.parents[1] / "docs" / "recipes.md").read_text()

TEN, ELEVEN, STRANGER = "127.0.0.10", "127.0.0.11", "127.0.0.12"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- nginx over the mount, no firmware ----------------------------------------------------------

@dataclass(frozen=True)
class Served:
    base: str
    files: dict[str, dict[str, bytes]]
    log: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if os.geteuid() != 0:
        pytest.skip("needs root: FUSE mount with allow_other, nginx workers as nobody")
    work = tmp_path_factory.mktemp("http")
    source = work / "source"
    files = {
        "default": {"boot.ipxe": b"#!ipxe\necho default\n", "shared.txt": b"for everybody\n"},
        TEN: {"boot.ipxe": b"#!ipxe\necho ten\n" + os.urandom(3000)},
        ELEVEN: {"boot.ipxe": b"#!ipxe\necho eleven\n" + os.urandom(3000),
                 "secret-11.txt": b"only for eleven " + os.urandom(16)},
    }
    for client, tree in files.items():
        for rel, data in tree.items():
            (source / client / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / client / rel).write_bytes(data)
    (source / TEN / "sub").mkdir()
    mount = world_traversable_mount("vfsroot-http-")
    prefix = work / "nginx"
    try:
        with VfsrootMount(source, mount, work / "vfsroot.log"), \
                nginx_serving(mount, prefix, work / "nginx.log", "/shared.txt", TEN,
                              files["default"]["shared.txt"]) as port:
            yield Served(f"http://127.0.0.1:{port}", files, prefix / "access.log")
    finally:
        shutil.rmtree(mount.parent, ignore_errors=True)


def test_nginx_serves_each_client_its_own_tree(served: Served) -> None:
    """The same URL, three client addresses, three different answers (by sha256)."""
    want = {TEN: served.files[TEN]["boot.ipxe"], ELEVEN: served.files[ELEVEN]["boot.ipxe"],
            STRANGER: served.files["default"]["boot.ipxe"]}
    assert len({sha256(v) for v in want.values()}) == 3
    for client, data in want.items():
        status, body = curl(f"{served.base}/boot.ipxe", client)
        assert (status, sha256(body)) == (200, sha256(data)), client
    for client in (TEN, ELEVEN, STRANGER):  # default/ shows through every view
        assert curl(f"{served.base}/shared.txt", client) == (
            200, served.files["default"]["shared.txt"])
    secret = served.files[ELEVEN]["secret-11.txt"]
    assert curl(f"{served.base}/secret-11.txt", ELEVEN) == (200, secret)
    assert curl(f"{served.base}/secret-11.txt", TEN)[0] == 404
    # the access log names the client address nginx mapped the root with
    log = served.log.read_text()
    assert re.search(rf"^{re.escape(TEN)} .*\"GET /boot.ipxe HTTP/1.1\" 200 ", log, re.M), log


@pytest.mark.parametrize(("path", "status"), [
    ("/../127.0.0.11/secret-11.txt", 400),
    ("/sub/../../127.0.0.11/secret-11.txt", 400),
    ("/./../127.0.0.11/secret-11.txt", 400),
    ("/%2e%2e/127.0.0.11/secret-11.txt", 400),
    ("/%2E%2E%2F127.0.0.11%2Fsecret-11.txt", 400),
    ("/..%2f127.0.0.11/secret-11.txt", 400),
    ("/sub/%2e%2e/%2e%2e/127.0.0.11/secret-11.txt", 400),
    # a backslash is a plain character to nginx: a name no view has
    ("/..%5c127.0.0.11%5csecret-11.txt", 404),
])
def test_nginx_refuses_dot_dot_in_every_spelling(served: Served, path: str,
                                                 status: int) -> None:
    """`..` above the client's root would be resolved by the kernel into another client's
    tree (docs/clients.md, "tftpd-hpa"): nginx refuses it (400), however it is encoded."""
    got, body = curl(served.base + path, TEN)
    assert got == status, (path, got, body[:200])
    assert served.files[ELEVEN]["secret-11.txt"] not in body


def test_nginx_recipe_is_the_tested_one() -> None:
    code = "\n".join(line[4:] for line in RECIPES.splitlines() if line.startswith("    "))
    assert NGINX_SERVER.strip() in code, "docs/recipes.md does not show NGINX_SERVER verbatim"


# --- iPXE boots over HTTP from the client's disk ------------------------------------------------

MAC_HTTP = "52:54:00:e2:e0:08"


@pytest.fixture(scope="module")
def http_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("e2e boots need root and /dev/net/tun")
    work = tmp_path_factory.mktemp("http-boot")
    token, decoy = secrets.token_hex(8), secrets.token_hex(8)
    kernel = work / "vmlinuz"
    shutil.copy2(host_kernel(), kernel)
    initrd = build_initrd(work / "initrd.img", 1_000_000)
    base = f"http://{SERVER_IP}"
    script = ipxe_script(f"{base}/vmlinuz", f"{base}/initrd.img", token).encode()
    source = work / "source"
    # default/ has a decoy script and no kernel: only the client's disk can make the boot pass
    (source / "default").mkdir(parents=True)
    (source / "default" / "boot.ipxe").write_bytes(
        ipxe_script(f"{base}/vmlinuz", f"{base}/initrd.img", "decoy-" + decoy).encode())
    disk = work / "client.img"
    build_disk(disk, {"/boot/boot.ipxe": script, "/boot/vmlinuz": kernel,
                      "/boot/initrd.img": initrd.path})
    mount = world_traversable_mount("vfsroot-http-boot-")
    nbd = NbdServer(disk, work / "nbdkit.log").start()
    try:
        (source / f"{CLIENT_IP}.nbd").write_text(nbd_config(nbd.url))
        daemon_log = work / "vfsroot.log"
        with VfsrootMount(source, mount, daemon_log, ["--metrics", "127.0.0.1:0"]), \
                Netns(work) as ns:
            # attach the disk (an appliance launch, 25-45 s under TCG) before the firmware asks
            wait_file(mount / CLIENT_IP / "boot.ipxe", script, daemon_log, timeout=240)
            prefix = work / "nginx"
            nginx_log = work / "nginx.log"
            with nginx_serving(mount, prefix, nginx_log, "/boot.ipxe", SERVER_IP,
                               (source / "default" / "boot.ipxe").read_bytes(), ns=ns):
                yield {"ns": ns, "work": work, "token": token, "initrd": initrd,
                       "kernel": kernel, "script": script, "mount": mount,
                       "access": prefix / "access.log", "metrics": metrics_url(daemon_log),
                       "logs": (daemon_log, nginx_log, prefix / "error.log")}
    finally:
        nbd.stop()
        shutil.rmtree(mount.parent, ignore_errors=True)


def metrics_url(log: Path) -> str:
    m = re.search(r"metrics endpoint daemon=vfsroot url=(\S+)", log.read_text(errors="replace"))
    assert m, tail(log)
    return m.group(1)


def test_ipxe_http_boot_through_nginx(http_rig: dict) -> None:
    """iPXE ROM → DHCP boot file http://10.77.0.1/boot.ipxe → kernel and initrd over HTTP, all
    three read by nginx from /run/vfsroot/10.77.0.100/, i.e. from the client's NBD disk."""
    ns: Netns = http_rig["ns"]
    work: Path = http_rig["work"]
    mount: Path = http_rig["mount"]
    # the kernel and initrd the client gets are the disk's (the default layer has none)
    for name in ("vmlinuz", "initrd.img", "boot.ipxe"):
        assert os.getxattr(mount / CLIENT_IP / name, "user.vfsroot.layer") == b"disk", name
    before = scrape(http_rig["metrics"])
    dnsmasq_log = work / "dnsmasq.log"
    dhcp = ns.popen(dnsmasq_argv(work, {MAC_HTTP: CLIENT_IP}, f"http://{SERVER_IP}/boot.ipxe"),
                    dnsmasq_log)
    try:
        result = boot_ipxe(ns, MAC_HTTP, work / "ipxe-http.console", timeout=240)
    finally:
        stop_process(dhcp, grace=5)
    logs = "\n".join(f"--- {p.name} ---\n{tail(p, 3000)}"
                     for p in (*http_rig["logs"], http_rig["access"], dnsmasq_log))
    context = f"after {result.seconds:.0f} s; console ends:\n{result.console[-3000:]}\n{logs}"
    assert result.value("TOKEN") == http_rig["token"], f"the disk's boot.ipxe did not run {context}"
    assert result.value("SHA256") == http_rig["initrd"].payload_sha256, f"initrd wrong {context}"
    # nginx's own log: the client fetched all three, whole, over HTTP
    access = http_rig["access"].read_text()
    sizes = {"boot.ipxe": len(http_rig["script"]),
             "vmlinuz": http_rig["kernel"].stat().st_size,
             "initrd.img": http_rig["initrd"].path.stat().st_size}
    for name, size in sizes.items():
        pattern = rf"^{re.escape(CLIENT_IP)} .*\"GET /{re.escape(name)} HTTP/1\.[01]\" 200 {size} "
        assert re.search(pattern, access, re.M), f"no whole GET of {name}:\n{access}"
    # and vfsroot's metrics saw it: one attached disk, its appliance, the bytes it served
    after = scrape(http_rig["metrics"])
    assert after["vfsroot_disks{state=ready}"] == 1
    assert after["vfsroot_disk_attach_seconds_count"] == 1
    assert after["vfsroot_disk_attach_failures_total"] == 0
    assert after["vfsroot_appliances"] == 1
    # appliances are labelled by their id (one may hold many disks): the client's, per status
    page = json.loads(os.getxattr(mount, "user.vfsroot.status.page.0"))
    appliance = page[CLIENT_IP]["appliance"]
    assert appliance, page[CLIENT_IP]
    assert after[f"vfsroot_appliance_rss_bytes{{appliance={appliance}}}"] > 50 * 1024 * 1024
    served = (after["vfsroot_fuse_read_bytes_total{layer=disk}"]
              - before["vfsroot_fuse_read_bytes_total{layer=disk}"])
    # at least once each (nginx reads through the page cache, which a re-read may hit)
    assert served >= sizes["vmlinuz"] + sizes["initrd.img"], (served, sizes)
    assert after["vfsroot_fuse_read_bytes_total{layer=default}"] == \
        before["vfsroot_fuse_read_bytes_total{layer=default}"], "the boot read default/ files"
