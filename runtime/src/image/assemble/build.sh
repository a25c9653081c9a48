#!/bin/sh
# Assembles an image's root filesystem inside mvm's builder VM (docs/images.md).
#
# Runs as root in the guest, with no network. /inputs is the read-only inputs disk
# the host made: base.tar (the essential packages, checked and unpacked by the host),
# debs/ (every pinned .deb), essential.list and rest.list, files/ and files.list,
# steps.sh (the spec's build steps) and build.env. $1 is the output disk: the
# filesystem image is written there and nowhere else; the host reads it back,
# checks it and computes its dm-verity tree. Everything that executes code from
# the inputs (maintainer scripts, the build steps) runs here, chrooted into the
# tree being built.
set -eu
out=$1
say() { echo "mvm-build: $*"; }
. /inputs/build.env
export SOURCE_DATE_EPOCH PYTHONHASHSEED=0 LC_ALL=C TZ=UTC HOME=/root
export DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
t=/mnt/target
mkdir -p "$t"
mount -t tmpfs -o "mode=0755,size=${TARGET_MIB}m" tmpfs "$t"

say "unpacking $(wc -l < /inputs/essential.list) essential packages"
tar -x -f /inputs/base.tar -C "$t"
mkdir -p "$t/var/lib/dpkg/info" "$t/var/lib/dpkg/updates" "$t/proc" "$t/dev" "$t/tmp" "$t/.mvm-debs"
[ -e "$t/var/lib/dpkg/status" ] || : > "$t/var/lib/dpkg/status"
[ -e "$t/var/lib/dpkg/available" ] || : > "$t/var/lib/dpkg/available"
chmod 1777 "$t/tmp"
mount -t proc proc "$t/proc"
mount -o bind /dev "$t/dev"
mount -o bind /inputs/debs "$t/.mvm-debs"
# No service starts inside a build.
printf '#!/bin/sh\nexit 101\n' > "$t/usr/sbin/policy-rc.d"
chmod 0755 "$t/usr/sbin/policy-rc.d"

debs() { sed 's|^|/.mvm-debs/|' "$1"; }
# Absolute paths after chroot: busybox (the builder's first build) would otherwise
# run its own applet of the same name instead of the tree's program.
say "configuring the essential set"
# shellcheck disable=SC2046
chroot "$t" /usr/bin/dpkg --force-depends --force-unsafe-io --install $(debs /inputs/essential.list)
if [ -s /inputs/rest.list ]; then
  say "installing $(wc -l < /inputs/rest.list) more packages"
  # shellcheck disable=SC2046
  chroot "$t" /usr/bin/dpkg --force-depends --force-unsafe-io --unpack $(debs /inputs/rest.list)
  chroot "$t" /usr/bin/dpkg --force-depends --force-unsafe-io --configure --pending
fi
chroot "$t" /usr/bin/dpkg --audit

# The unprivileged user workloads run as (uid and gid 1000), home /work.
grep -q '^[^:]*:[^:]*:1000:' "$t/etc/group" || echo 'mvm:x:1000:' >> "$t/etc/group"
grep -q '^[^:]*:[^:]*:1000:' "$t/etc/passwd" ||
  echo 'mvm:x:1000:1000:mvm workload:/work:/bin/sh' >> "$t/etc/passwd"
mkdir -p "$t/work"
chown 1000:1000 "$t/work"

while read -r n mode dst; do
  mkdir -p "$t$(dirname "$dst")"
  cp "/inputs/files/$n" "$t$dst"
  chown 0:0 "$t$dst"
  chmod "$mode" "$t$dst"
done < /inputs/files.list

if [ -s /inputs/steps.sh ]; then
  say "running the build steps"
  cp /inputs/steps.sh "$t/.mvm-steps.sh"
  chroot "$t" /bin/sh -eu /.mvm-steps.sh
  rm -f "$t/.mvm-steps.sh"
fi

say "cleaning up"
rm -f "$t/usr/sbin/policy-rc.d"
umount "$t/.mvm-debs" "$t/dev" "$t/proc"
rmdir "$t/.mvm-debs"
# What would differ between two builds: logs, backups, caches with build times,
# machine ids.
find "$t/var/log" -type f -exec rm -f {} +
rm -f "$t"/var/cache/debconf/*-old "$t"/var/lib/dpkg/*-old "$t/var/cache/ldconfig/aux-cache" \
  "$t/etc/machine-id" "$t/var/lib/dbus/machine-id"
rm -rf "$t/tmp/"* "$t/var/tmp/"* "$t/root/.cache"

# mkfs.erofs: the builder's own, or (the builder's first build, on the bare
# initramfs) the one in the tree just built, through that tree's loader.
if command -v mkfs.erofs > /dev/null 2>&1; then
  set -- mkfs.erofs
else
  lib=$t/usr/lib/x86_64-linux-gnu
  set -- "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$t/usr/bin/mkfs.erofs"
fi
say "writing the filesystem image"
"$@" -T "$SOURCE_DATE_EPOCH" --all-time -U "$FS_UUID" "$out" "$t"
sync
say "done"
