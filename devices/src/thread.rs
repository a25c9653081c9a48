//! How the VMM starts its threads (vCPUs, device workers, the signal and console
//! threads): named, and with a stack that can never be a transparent huge page.
//!
//! Rust gives a spawned thread a 2 MiB stack. On a host whose transparent huge pages
//! are `always` (Debian's kernels, and the QEMU-TCG test host), such a stack that starts
//! on a 2 MiB boundary becomes one huge page at its first touch: 2 MiB zeroed and
//! resident for a thread that uses a few pages of it. Seen in the test host: an
//! `mvm-vmm --dev` with three threads held one such page, 29.2 MiB resident against
//! 27.1 MiB with these stacks (`docs/boot-time.md`, "Thread stacks"); each device worker
//! of a full VM could add another. A mapping smaller than 2 MiB holds no aligned 2 MiB
//! range, so the kernel backs it with small pages, and only the pages used.

/// The stack of every VMM thread. Half of Rust's default: the threads run flat loops
/// (no recursion), and the seccomp `SIGSYS` handler has its own alternate stack.
pub const STACK_BYTES: usize = 1 << 20;

/// A thread builder named `name`, with a [`STACK_BYTES`] stack.
pub fn builder(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(STACK_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `/proc/self/maps` mapping holding `addr`: its start and end.
    fn mapping_of(addr: usize) -> (usize, usize) {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter_map(|line| {
                let range = line.split_whitespace().next()?;
                let (start, end) = range.split_once('-')?;
                let start = usize::from_str_radix(start, 16).ok()?;
                let end = usize::from_str_radix(end, 16).ok()?;
                (start..end).contains(&addr).then_some((start, end))
            })
            .next()
            .unwrap()
    }

    #[test]
    fn a_thread_stack_holds_no_aligned_huge_page() {
        const HUGE: usize = 2 << 20;
        let handle = builder("stack-probe")
            .spawn(|| {
                let local = 0u8;
                let name = std::thread::current().name().map(str::to_owned);
                (mapping_of(std::ptr::addr_of!(local) as usize), name)
            })
            .unwrap();
        let ((start, end), name) = handle.join().unwrap();
        assert_eq!(name.as_deref(), Some("stack-probe"));
        // Smaller than a huge page, so no aligned 2 MiB range fits in it, wherever it is.
        assert!(
            end - start < HUGE,
            "the stack mapping {start:#x}-{end:#x} is {} KiB: a 2 MiB huge page can back it",
            (end - start) >> 10
        );
    }
}
