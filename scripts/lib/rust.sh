# The RUSTFLAGS of the static binaries that go into an image or the test host
# (mvm-agent as the guest's /init; mvm, mvm-vmm and the e2e binaries). One
# definition, used by scripts/build-image and scripts/e2e: both compile into the
# same target directory with the same profile, and different flags would make
# each of them rebuild the other's work.
#
#   RUSTFLAGS=$(static_rustflags "$root") cargo build --target ... --profile static
#
# What the flags do (docs/reproducible.md):
#   -C target-feature=+crt-static   a static (static-pie) binary on the gnu target.
#   --remap-path-prefix FROM=TO     rustc writes source paths into the binary
#       (panic locations: file!() of every crate, and the debug info until
#       strip removes it). Each directory that differs from machine to machine
#       is renamed to a fixed one, so two checkouts, two users or two
#       CARGO_HOMEs give the same bytes:
#         the checkout         -> /mvm
#         $CARGO_HOME          -> /cargo     (registry and git dependencies)
#         $RUSTUP_HOME         -> /rustup
#         the target directory -> /mvm/target (OUT_DIR of build scripts; it
#                                 may live outside the checkout)
#         the rust-src copy of std in the sysroot -> /rustc/<commit>: the
#                                 path std already carries when rust-src is
#                                 not installed, so having it or not makes
#                                 no difference
#       Each also under its physical path when a symlink makes that differ
#       (rustc's working directory, written into the debug info, is physical).
#       When several prefixes match, rustc applies the last one given: the
#       more specific mappings come last.
# Cargo leaves --remap-path-prefix out of -C metadata (cargo#6966, #7417),
# so symbol names do not depend on where the checkout lies.
#
# With --target, RUSTFLAGS applies to the target binaries only, not to build
# scripts or proc-macros: static binaries, dynamic build tools.

# rustflags_remap FROM TO: adds the mapping for FROM as given and, when a symlink makes
# it differ, for its physical path too (a working directory is always the
# physical path). rustflags_remap_physical adds only the latter.
rustflags_remap() {
  flags+=" --remap-path-prefix=$1=$2"
  rustflags_remap_physical "$1" "$2"
}
rustflags_remap_physical() {
  local real
  real=$(realpath -m -- "$1" 2>/dev/null) || return 0
  [ "$real" = "$1" ] || flags+=" --remap-path-prefix=$real=$2"
}

# static_rustflags ROOT: prints the flags for the checkout at ROOT. Honours
# CARGO_HOME, RUSTUP_HOME and CARGO_TARGET_DIR (or a target-dir in cargo's
# config) as cargo does.
static_rustflags() {
  local root=$1 cargo_home rustup_home target_dir sysroot commit flags
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
  target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps --offline 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  [ -n "$target_dir" ] || target_dir=${CARGO_TARGET_DIR:-$root/target}
  sysroot=$(cd "$root" && rustc --print sysroot)
  commit=$(cd "$root" && rustc -vV | sed -n 's/^commit-hash: //p')
  flags="-C target-feature=+crt-static"
  rustflags_remap "$root" /mvm
  rustflags_remap "$cargo_home" /cargo
  # Registry and git sources, where cargo runs rustc: its working directory
  # (the debug info's comp_dir, hashed into the build id before strip) is
  # the physical path, through any symlink under CARGO_HOME.
  rustflags_remap_physical "$cargo_home/registry" /cargo/registry
  rustflags_remap_physical "$cargo_home/git" /cargo/git
  rustflags_remap "$rustup_home" /rustup
  rustflags_remap "$target_dir" /mvm/target
  [ -n "$commit" ] && rustflags_remap "$sysroot/lib/rustlib/src/rust" "/rustc/$commit"
  # RUSTFLAGS is split on spaces: a path with a space cannot be remapped.
  case "$root$cargo_home$rustup_home$target_dir$sysroot" in
    *' '*) echo "mvm: error: a build path holds a space; RUSTFLAGS cannot carry it: $root $cargo_home $target_dir" >&2; return 1 ;;
  esac
  printf '%s\n' "$flags"
}
