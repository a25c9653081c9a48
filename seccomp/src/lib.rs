//! One seccomp filter per `mvm-vmm` thread role, written as typed data.
