#!/bin/sh
# Set up this machine for kdump-harness, idempotently: the Debian packages the
# harness and its guests need, and a virtualenv (.venv) with the package
# installed (which compiles the C checker). Safe to run again; fast when done.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="qemu-system-x86 qemu-utils busybox-static kexec-tools makedumpfile cpio kmod xz-utils zstd ethtool
 gcc libc6-dev pkg-config libkdumpfile-dev python3 python3-venv python3-dev clang libclang-rt-14-dev
 chromium fonts-dejavu-core debootstrap e2fsprogs
 qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# Arm64 guests (--arch aarch64) take busybox, kexec-tools and makedumpfile from
# Debian's arm64 packages: apt must know the architecture.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "setup: adding the arm64 architecture to apt" >&2
    $SUDO dpkg --add-architecture arm64
    $SUDO apt-get update -q
fi

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing" >&2
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi
# The kernels under test come from Debian's archive: apt needs its package lists.
if ! apt-cache show --no-all-versions linux-image-amd64 linux-image-arm64:arm64 >/dev/null 2>&1; then
    $SUDO apt-get update -q
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
# Reinstall only when the packaging or the C sources changed.
stamp=$(cat pyproject.toml setup.py csrc/checker/*.c csrc/checker/*.h csrc/checker/*.py 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat .venv/.kdump-harness-installed 2>/dev/null)" != "$stamp" ]; then
    echo "setup: installing kdump-harness into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$stamp" > .venv/.kdump-harness-installed
fi
