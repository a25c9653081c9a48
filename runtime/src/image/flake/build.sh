#!/bin/sh
# Builds a Nix flake's root filesystem inside mvm's Nix builder VM (docs/images.md,
# "Nix flakes"). Runs as root in the guest, with no network: the flake's inputs must
# be in the flake's own directory (path inputs) or already in its lock and the
# store. /inputs is the read-only inputs disk: flake/ (the flake's directory, as
# the host copied it) and build.env (FLAKE_ATTR, LOCK, FS_UUID, TARGET_MIB). $1 is
# the output disk: the filesystem image is written there, and (for an output that
# is a kernel plus a root filesystem: `vmlinux` and `rootfs/`) the kernel at
# KERNEL_OFFSET_MIB, and nowhere else.
#
# Reports to the host on stdout, one `mvm-result KEY VALUE` line each: the lock it
# made (when asked to lock: printed before anything of the flake's is built, and
# with evaluation's own messages held back until after it), the output path, every
# store path of its closure, and the kernel's size when there is one.
set -eu
out=$1
. /inputs/build.env
say() { echo "mvm-build: $*"; }
export HOME=/root TZ=UTC LC_ALL=C
export NIX_CONFIG="experimental-features = nix-command flakes
build-users-group =
substituters =
sandbox = false
max-jobs = 2
accept-flake-config = false
warn-dirty = false"
mkdir -p /root /nix
work=/tmp/mvm-flake
rm -rf "$work"
cp -a /inputs/flake "$work"
chmod -R u+w "$work"

if [ ! -e "$work/flake.lock" ]; then
  if [ "$LOCK" != 1 ]; then
    say "the flake has no flake.lock (pass --lock to make one)"
    exit 3
  fi
  say "locking the flake"
  # No import-from-derivation while locking: evaluation runs nothing of the flake's.
  if ! nix flake lock --option allow-import-from-derivation false "path:$work" > /tmp/lock.log 2>&1; then
    cat /tmp/lock.log >&2
    exit 4
  fi
  echo "mvm-result flake.lock $(tr -d '\n' < "$work/flake.lock")"
  cat /tmp/lock.log >&2
fi

say "building $FLAKE_ATTR"
result=$(nix build --no-link --print-out-paths --no-update-lock-file "path:$work#$FLAKE_ATTR")
case $result in
  /nix/store/*) ;;
  *) say "nix build gave no single store path: $result"; exit 5 ;;
esac
if [ ! -d "$result" ]; then
  say "$FLAKE_ATTR is not a directory (a root filesystem tree): $result"
  exit 6
fi
root=$result
kernel=
if [ -f "$result/vmlinux" ] && [ -d "$result/rootfs" ]; then
  root=$result/rootfs
  kernel=$result/vmlinux
fi
echo "mvm-result out $result"
closure=$(nix-store --query --requisites "$result")
for p in $closure; do echo "mvm-result closure $p"; done

say "assembling the root filesystem"
t=/mnt/target
mkdir -p "$t"
mount -t tmpfs -o "mode=0755,size=${TARGET_MIB}m" tmpfs "$t"
cp -a "$root/." "$t/"
# The closure's other store paths (what the tree's files refer to), and the output
# itself when it refers to its own path.
for p in $closure; do
  if [ "$p" != "$result" ] || nix-store --query --references "$result" | grep -qx "$result"; then
    mkdir -p "$t/nix/store"
    cp -a "$p" "$t/nix/store/"
  fi
done
say "writing the filesystem image"
mkfs.erofs -T 0 --all-time -U "$FS_UUID" "$out" "$t"
if [ -n "$kernel" ]; then
  size=$(stat -L -c %s "$kernel")
  if [ "$size" -gt $((KERNEL_MAX_MIB * 1048576)) ]; then
    say "vmlinux is $size bytes, more than $KERNEL_MAX_MIB MiB"
    exit 7
  fi
  say "writing the kernel"
  dd if="$kernel" of="$out" bs=1M seek="$KERNEL_OFFSET_MIB" conv=notrunc status=none
  echo "mvm-result kernel $size"
fi
sync
say "done"
