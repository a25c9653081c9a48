# Shared helpers for the build scripts: the content-addressed cache outside the repo.
# MVM_CACHE overrides the location (default: $XDG_CACHE_HOME/mvm or ~/.cache/mvm).
# Also brings in static_rustflags (scripts/lib/rust.sh), so every script that
# sources this file builds static binaries with the same flags.

log() { echo "mvm: $*" >&2; }
die() { echo "mvm: error: $*" >&2; exit 1; }

cache_root() { echo "${MVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mvm}"; }
cache_dir() { local d; d="$(cache_root)/$1"; mkdir -p "$d"; echo "$d"; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# The cache key of a build: the sha256 of its input digests, in order.
inputs_key() { printf '%s\n' "$@" | sha256sum | cut -c1-32; }

# with_lock NAME CMD...: runs CMD holding $(cache_root)/NAME.lock, so two
# callers building the same cache entry at once take turns instead of
# deleting each other's work directory.
with_lock() { local l; l="$(cache_root)/$1.lock"; shift; mkdir -p "$(cache_root)"; flock "$l" "$@"; }

# The venv of the MCP client the tests drive `mvm mcp` with: keyed by its pinned
# requirements and Debian's python3 (scripts/setup installs it; scripts/e2e uses it).
mcp_client_venv() {
  local repo; repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  echo "$(cache_root)/mcp-client/$(inputs_key "$(sha256_of "$repo/tests/mcp/requirements.txt")" \
    "$(/usr/bin/python3 --version 2>&1)")"
}

source "$(dirname "${BASH_SOURCE[0]}")/rust.sh"
