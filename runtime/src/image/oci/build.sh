#!/bin/sh
# Writes an imported OCI image's root filesystem inside mvm's builder VM
# (docs/images.md). Runs as root in the guest, with no network. /inputs is the
# read-only inputs disk: rootfs.tar (the image's layers, checked and merged by the
# host into one tar) and build.env. $1 is the output disk: the filesystem image is
# written there and nowhere else; the host reads it back, checks it and computes its
# dm-verity tree. Nothing from the image executes here.
set -eu
out=$1
. /inputs/build.env
echo "mvm-build: writing the filesystem image from the merged layers"
mkfs.erofs --tar=f -T 0 -U "$FS_UUID" "$out" /inputs/rootfs.tar
sync
echo "mvm-build: done"
