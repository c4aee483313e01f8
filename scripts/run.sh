#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine (as root):
#   scripts/run.sh demo   install what is missing, then run the demo (vfsroot + TFTP)
#   scripts/run.sh test   install what is missing, then run the whole test suite
# Both are idempotent: a second run installs nothing and starts at once.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)

die() { echo "run.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (FUSE mounts with allow_other, port 69, apt-get)"
[ $# -ge 1 ] || die "usage: scripts/run.sh demo|test [pytest arguments]"
what=$1; shift

install_debian_packages() {
    local wanted missing=()
    wanted=$(grep -hv '^\s*#' scripts/debian-packages.txt | awk 'NF {print $1}')
    for p in $wanted; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "run.sh: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q -o DPkg::Lock::Timeout=600 "${missing[@]}"
}

make_venv() {
    # libguestfs's Python binding exists only for Debian's own interpreter, so the venv is
    # made from /usr/bin/python3 (not whatever python3 is first on PATH) and sees its packages.
    local stamp=.venv/.installed
    local want
    # The C lock-step lane (tftpd/_lane.c) is compiled by this install: a change to it or to
    # its build must reinstall, like a change of dependencies.
    want=$(cat pyproject.toml setup.py tftpd/_lane.c | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
    [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
}

install_debian_packages
make_venv
modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || die "/dev/fuse is missing: this machine cannot mount FUSE filesystems"

# Nested KVM hangs on many hosts (this project's CI included): unless the operator chose,
# libguestfs runs its appliance under TCG, which is slower to launch but always works.
export LIBGUESTFS_BACKEND=${LIBGUESTFS_BACKEND:-direct}
export LIBGUESTFS_BACKEND_SETTINGS=${LIBGUESTFS_BACKEND_SETTINGS-force_tcg}

case "$what" in
    demo) exec .venv/bin/python -m vfsroot.demo "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
    *) die "unknown command '$what' (want demo or test)" ;;
esac
