#!/bin/bash
# The VM lab's second kernel: a Debian trixie chroot with the newest trixie-backports kernel (image, modules,
# headers) and the compiler and dkms that build modules for it.  The lab boots that kernel and builds the bdr
# module inside the chroot (see tests/vm/lab.py).
#
#   tests/vm/mkchroot.sh [DIR]      DIR defaults to tests/vm/.lab/trixie
#
# Idempotent: an existing DIR is complete (it is built as DIR.tmp and renamed last) and left alone; remove it to
# make it again with the then newest kernel.  This script mounts nothing in the chroot (debootstrap unmounts what
# it mounts itself), and the lab runs commands in it with a /proc of their own in private namespaces.
set -euo pipefail

MIRROR=http://deb.debian.org/debian
SUITE=trixie
PACKAGES=(build-essential kmod dkms)
BACKPORTS_PACKAGES=(linux-image-amd64 linux-headers-amd64)

dir=${1:-$(dirname "$(readlink -f "$0")")/.lab/$SUITE}
dir=$(readlink -m "$dir")
[[ -d $dir ]] && exit 0

mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
[[ -d $dir ]] && exit 0

tmp=$dir.tmp
# What an interrupted earlier run may have left mounted (debootstrap mounts proc and sys while it runs).
umount_below() {
    local m
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$1/" 'index($2 "/", d) == 1 { print $2 }' /proc/self/mounts | sort -r)
}
umount_below "$tmp"
rm -rf --one-file-system "$tmp"
trap 'umount_below "$tmp"' EXIT

echo "mkchroot: debootstrap $SUITE into $tmp (a few minutes)"
t0=$SECONDS
debootstrap --variant=minbase "$SUITE" "$tmp" "$MIRROR" >"$tmp.log" 2>&1 || {
    tail -n 30 "$tmp.log" >&2
    echo "mkchroot: debootstrap failed (full log: $tmp.log)" >&2
    exit 1
}
cat >"$tmp/etc/apt/sources.list.d/backports.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
in_chroot() {
    chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"
}
apt_install() {
    in_chroot apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold "$@"
}
install_packages() {
    in_chroot apt-get update -q &&
        apt_install "${PACKAGES[@]}" &&
        apt_install -t "$SUITE-backports" "${BACKPORTS_PACKAGES[@]}" &&
        in_chroot apt-get clean &&
        rm -f "$tmp"/boot/initrd.img-* # the lab boots the kernel with an initramfs of its own
}
install_packages >>"$tmp.log" 2>&1 || {
    tail -n 30 "$tmp.log" >&2
    echo "mkchroot: installing packages in the chroot failed (full log: $tmp.log)" >&2
    exit 1
}
kernels=$(cd "$tmp/boot" && ls vmlinuz-* 2>/dev/null | sed 's/^vmlinuz-//' | tr '\n' ' ')
[[ -n $kernels ]] || {
    echo "mkchroot: no kernel image in $tmp/boot" >&2
    exit 1
}
trap - EXIT
umount_below "$tmp"
mv "$tmp" "$dir"
rm -f "$tmp.log"
echo "mkchroot: $dir ready in $((SECONDS - t0)) s, kernels: $kernels"
