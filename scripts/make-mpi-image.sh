#!/bin/bash
# Build the MPI test image: a Debian bookworm rootfs with Open MPI, a compiler and
# mesobox's MPI test programs (tests/data/mpi/*.c) compiled inside it.
#
#   scripts/make-mpi-image.sh DIR     (as root: debootstrap and chroot need it)
#
# Writes DIR/rootfs (directory image) and DIR/mpi.sqfs (zstd squashfs of it), both
# world-readable so ordinary users' jobs can run them.  Cached: DIR/stamp holds a
# hash of this script and the C sources; a matching stamp means nothing to do, so
# the test fixture may call this once per CI run at no cost after the first.
# The image's /etc/mesobox-mpi-image marker lets tests prove a rank ran in the image.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: make-mpi-image.sh DIR}
mirror=${MESOBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
sources=("$here"/tests/data/mpi/*.c)
stamp=$(cat "$0" "${sources[@]}" | sha256sum | cut -c1-16)

if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/mpi.sqfs" ]; then
    echo "make-mpi-image: $out is up to date ($stamp)"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "make-mpi-image: must run as root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap mksquashfs; do
    command -v "$tool" >/dev/null || { echo "make-mpi-image: $tool missing: apt-get install -y ${tool/mksquashfs/squashfs-tools}" >&2; exit 1; }
done

mkdir -p "$out"
rm -rf "$out/rootfs.tmp" "$out/rootfs" "$out/mpi.sqfs" "$out/stamp"
rootfs="$out/rootfs.tmp"
start=$SECONDS
# minbase + what MPI programs need: Open MPI (runtime and headers) and gcc.  automake is
# listed because debootstrap does not resolve the virtual automake-1.16 that
# libltdl-dev (via libopenmpi-dev) depends on.
debootstrap --variant=minbase --include=openmpi-bin,libopenmpi-dev,gcc,libc6-dev,automake \
    bookworm "$rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
echo "make-mpi-image: debootstrap took $((SECONDS - start)) s"
step=$SECONDS

mkdir -p "$rootfs/opt/mpi"
cp "${sources[@]}" "$rootfs/opt/mpi/"
for src in "${sources[@]}"; do
    name=$(basename "$src" .c)
    chroot "$rootfs" mpicc -O2 -Wall -Werror -o "/opt/mpi/$name" "/opt/mpi/$name.c"
done
echo "mesobox-mpi-$stamp" >"$rootfs/etc/mesobox-mpi-image"
# Files a container needs that debootstrap leaves host-specific or absent.
printf '127.0.0.1 localhost\n' >"$rootfs/etc/hosts"
: >"$rootfs/etc/resolv.conf"
# Documentation and apt caches are dead weight in a squashfs shipped to every node.
rm -rf "$rootfs"/usr/share/{doc,man,info,locale} "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/*
chmod -R a+rX "$rootfs"

# zstd level 3: mksquashfs defaults to 15, which triples the build time for ~10 % size.
mksquashfs "$rootfs" "$out/mpi.sqfs.tmp" -comp zstd -Xcompression-level 3 -noappend -quiet -no-progress >/dev/null 2>&1 \
    || mksquashfs "$rootfs" "$out/mpi.sqfs.tmp" -noappend -quiet -no-progress >/dev/null
chmod 644 "$out/mpi.sqfs.tmp"
echo "make-mpi-image: compile + squashfs took $((SECONDS - step)) s"
mv "$rootfs" "$out/rootfs"
mv "$out/mpi.sqfs.tmp" "$out/mpi.sqfs"
echo "$stamp" >"$out/stamp"
chmod 755 "$out"
echo "make-mpi-image: $out/rootfs and $out/mpi.sqfs ready in $((SECONDS - start)) s" \
     "($(du -sm "$out/rootfs" | cut -f1) MB dir, $(du -m "$out/mpi.sqfs" | cut -f1) MB squashfs)"
