#!/usr/bin/env bash
# Builds the sandbox host image: a Debian 12 root file system made by debootstrap, imported with
# `docker import`, with systemd and python3 so that it boots like a server and Ansible can drive it.
# Nothing comes from an image registry. (docker 20.10 import accepts no STOPSIGNAL: the containers are
# started with --stop-signal SIGRTMIN+3 instead.) Skips the work when the image already exists.
#
#   sandbox/build-image.sh [IMAGE]      (default: cla2-sandbox:bookworm)
#   SANDBOX_MIRROR=http://deb.debian.org/debian  to take packages from another Debian mirror
set -euo pipefail

image=${1:-${SANDBOX_IMAGE:-cla2-sandbox:bookworm}}
mirror=${SANDBOX_MIRROR:-http://deb.debian.org/debian}
packages=systemd,systemd-sysv,dbus,python3,python3-apt,sudo,ca-certificates,iproute2,procps,kmod,curl,gnupg,xz-utils,rsync

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "sandbox image $image already present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

work=$(mktemp -d /var/tmp/cla2-sandbox.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
echo "debootstrap bookworm from $mirror into $root (a few minutes)"
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  echo "debootstrap failed: see the lines above" >&2
  exit 1
}

# A container has no consoles, no udev, no kernel to mount: mask what would only fail or wait.
for unit in getty.target systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service \
            sys-kernel-config.mount sys-kernel-debug.mount sys-fs-fuse-connections.mount \
            systemd-remount-fs.service console-getty.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
echo 'deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main' > "$root/etc/apt/sources.list"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
echo sandbox > "$root/etc/hostname"

tar -C "$root" -c . | docker import \
  --change 'ENV container=docker' \
  --change 'CMD ["/lib/systemd/systemd"]' \
  - "$image"
echo "built sandbox image $image"
