"""The `vfsroot` command: serve, explain, status, check."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from .defaults import DEFAULT_MOUNT, FUSE_TASKS
from .errors import QuietError
from .exporter import parse_metrics_address
from .names import DEFAULT, is_client_name

log = logging.getLogger("vfsroot")


def _disk_support() -> tuple[object, object] | None:
    """(DiskOptions, DiskManager) when the disk layer is available."""
    try:
        from .disks import DiskManager, DiskOptions
    except ImportError:
        return None
    return DiskOptions, DiskManager


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfsroot",
        description="Per-client read-only boot trees for network-booted machines.",
    )
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="mount the client views (foreground)")
    serve.add_argument("--source", required=True, type=Path,
                       help="source root: default/, <ip>/, <ip>.nbd")
    serve.add_argument("--mount", default=DEFAULT_MOUNT, type=Path,
                       help=f"where to mount the views (default {DEFAULT_MOUNT})")
    serve.add_argument("--no-disks", action="store_true",
                       help="ignore <ip>.nbd configs (serve local layers only)")
    serve.add_argument("--metrics", type=parse_metrics_address, metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics "
                            "(default: off)")
    serve.add_argument("--fuse-tasks", type=_positive_int, default=FUSE_TASKS, metavar="N",
                       help="FUSE requests served at once; lookups held for an attaching "
                            "disk count against it (default %(default)s)")
    disks = _disk_support()
    if disks is not None:
        disks[0].add_arguments(serve)  # type: ignore[attr-defined]

    explain = sub.add_parser("explain", help="which layer serves a client's file, and what it "
                             "shadows")
    explain.add_argument("client", help="client IP (or 'default')")
    explain.add_argument("path", help="path inside the client's view, e.g. pxelinux.cfg/default")
    explain.add_argument("--mount", default=DEFAULT_MOUNT, type=Path)

    status = sub.add_parser("status", help="state of every client disk")
    status.add_argument("--mount", default=DEFAULT_MOUNT, type=Path)
    status.add_argument("--json", action="store_true", help="print raw JSON")

    check = sub.add_parser("check", help="can this machine run vfsroot and its disks?")
    try:
        from . import check as check_module

        check_module.add_arguments(check)
    except (ImportError, AttributeError):
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "status":
            return _status(args)
        if args.command == "check":
            return _check(args)
    except QuietError as e:
        print(f"vfsroot: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    return 2


def _serve(args: argparse.Namespace) -> int:
    import trio

    from .daemon import ServeOptions, serve

    source = args.source.absolute()
    disk_manager = None
    support = _disk_support()
    if support is not None and not args.no_disks:
        disk_options_cls, disk_manager_cls = support
        disk_manager = disk_manager_cls(source, disk_options_cls.from_args(args))  # type: ignore[operator,attr-defined]
    trio.run(serve, ServeOptions(source=source, mount=args.mount.absolute(), disks=disk_manager,
                                 metrics=args.metrics, fuse_tasks=args.fuse_tasks))
    return 0


def _xattr(path: Path, name: str) -> bytes:
    try:
        return os.getxattr(path, name)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            raise QuietError(f"{path} is not served by a running vfsroot "
                             "(no vfsroot attributes there)", 1) from None
        raise QuietError(f"{path}: {e.strerror}", 1) from None


def _client_path(client: str, path: str) -> tuple[str, ...]:
    if client != DEFAULT and not is_client_name(client):
        raise QuietError(f"'{client}' is not a client name (an IP in canonical form or "
                         "'default')", 2)
    parts = tuple(p for p in path.replace("\\", "/").split("/") if p and p != ".")
    if ".." in parts:
        raise QuietError(f"path '{path}' contains '..': paths are inside the client's view", 2)
    return parts


def _explain(args: argparse.Namespace) -> int:
    parts = _client_path(args.client, args.path)
    target = Path(args.mount, args.client, *parts)
    if not Path(args.mount, DEFAULT).is_dir():
        raise QuietError(f"no vfsroot mounted at {args.mount} (start: vfsroot serve)", 1)
    shown = "/" + "/".join(parts)
    try:
        copies = json.loads(_xattr(target, "user.vfsroot.explain"))
    except FileNotFoundError:
        print(f"{args.client}:{shown}: not in this client's view (no layer has it)")
        return 1
    print(f"{args.client}:{shown}")
    if not copies:
        print("  (a directory made by vfsroot itself: the client's root)")
    for i, copy in enumerate(copies):
        role = "served by" if i == 0 else "shadows  "
        size = f"{copy['size']} bytes" if copy["kind"] == "file" else "directory"
        print(f"  {role} {copy['layer']:<8} {copy['source']}  ({size})")
    return 0


def _read_status(mount: Path) -> tuple[dict | None, dict[str, dict]]:
    """(summary, {client: status}).  The paged xattrs first: the whole status of a big fleet
    exceeds the kernel's 64 KiB xattr limit ("Argument list too long")."""
    try:
        summary = json.loads(_xattr(mount, "user.vfsroot.status.summary"))
    except QuietError:
        return None, json.loads(_xattr(mount, "user.vfsroot.status"))  # an older daemon
    disks: dict[str, dict] = {}
    for page in range(int(summary.get("pages", 1))):
        disks.update(json.loads(_xattr(mount, f"user.vfsroot.status.page.{page}")))
    return summary, disks


def _status(args: argparse.Namespace) -> int:
    if not Path(args.mount, DEFAULT).is_dir():
        raise QuietError(f"no vfsroot mounted at {args.mount} (start: vfsroot serve)", 1)
    summary, status = _read_status(Path(args.mount))
    if args.json:
        print(json.dumps(status if summary is None else {"summary": summary, "disks": status},
                         indent=2, sort_keys=True))
        return 0
    now = time.time()
    print(f"mount {args.mount}: {len(status)} disk(s)")
    if summary is not None:
        acc = summary.get("accelerator") or "undecided"
        print(f"appliances run on {acc}: {summary.get('accelerator_reason', '')}")
        apps = summary.get("appliances", [])
        print(f"{len(apps)} appliance(s), memory {summary.get('memory_mb', 0):.0f} of "
              f"{summary.get('max_memory_mb', 0)} MiB, {summary.get('queued', 0)} disk(s) queued")
        for a in apps:
            rss = f"{a['rss_mb']:.0f} MiB" if a.get("rss_mb") else "launching"
            print(f"  appliance {a['id']}: {rss}, {len(a['disks'])} of {a['drives']} disk(s): "
                  f"{' '.join(a['disks'])}")
    for client, disk in sorted(status.items()):
        state = disk.get("state", "?")
        message = disk.get("message") or ""
        since = disk.get("since")
        age = f" for {now - since:.0f}s" if isinstance(since, (int, float)) else ""
        where = f" [{disk['appliance']}]" if disk.get("appliance") else ""
        print(f"  {client:<16} {state}{age}{where}{(': ' + message) if message else ''}")
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        from . import check as check_module
    except ImportError:
        raise QuietError("this build has no disk support to check", 1) from None
    return int(check_module.run(args))


if __name__ == "__main__":
    sys.exit(main())
