//! What the C allocator must not do once filters are on.
//!
//! glibc's malloc gives threads their own arenas; the first time a thread arena's heap
//! shrinks, it reads `/proc/sys/vm/overcommit_memory` (an `openat` no role allows, and no
//! file the jail shows) to pick how to shrink. A device thread that moves a lot of data (the
//! vsock thread under 64 MiB of workload output) gets there long after its filter is on,
//! and dies of SIGSYS. With a single arena, only the main heap exists: it grows and shrinks
//! with `brk`, large blocks are anonymous private `mmap`s, and no file is ever read.

/// Limits glibc's malloc to one arena. Call first thing in `main`, before any thread
/// exists. Returns whether the setting took (always true off glibc, where it does not
/// apply).
pub fn single_arena() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes a malloc tunable; called before any other thread
        // exists, so no allocation races with it.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_takes() {
        assert!(single_arena());
    }
}
