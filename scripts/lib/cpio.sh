# newc cpio helpers for initramfs images, without root: the kernel unpacks
# concatenated archives in order, so device nodes that an unprivileged `cpio`
# cannot copy from disk are written here as a small archive of their own.

# One newc entry with no data: cpio_entry NAME MODE RDEVMAJOR RDEVMINOR INO
cpio_entry() {
  local name=$1 mode=$2 rmaj=$3 rmin=$4 ino=$5
  local namesize=$(( ${#name} + 1 ))
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
    "$ino" "$mode" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0
  printf '%s\0' "$name"
  # The 110-byte header plus the name is padded to a multiple of four.
  local pad=$(( (4 - (110 + namesize) % 4) % 4 ))
  head -c "$pad" /dev/zero
}

# An archive holding /dev and /dev/console (c 5 1): without the console node
# PID 1 starts with no stdin/stdout and its output is lost.
cpio_dev_console() {
  cpio_entry dev $(( 8#040755 )) 0 0 1000001
  cpio_entry dev/console $(( 8#020600 )) 5 1 1000002
  cpio_entry TRAILER!!! 0 0 0 0
}

# cpio_from_dir DIR OUT: a newc archive of DIR's contents (owned by root),
# followed by the /dev/console archive.
cpio_from_dir() {
  local dir=$1 out=$2
  (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$out"
  cpio_dev_console >> "$out"
}
