//! Fuzzing harnesses for every parser a guest or a plan author controls.
//!
//! Each module is one target: a `run(&[u8])` that drives the real parser (and, where the
//! parser feeds a state machine, the machine) with hostile bytes and asserts invariants
//! that must hold for any input, not only "no panic". `fuzz_targets/*.rs` wrap these for
//! libFuzzer; `src/bin/gen_corpus.rs` writes the seed corpus with the builders here.

pub mod agent_frame;
pub mod egress_head;
pub mod input;
pub mod mmio_transport;
pub mod net_frame;
pub mod plan_envelope;
pub mod verity_tree;
pub mod virtio_queue_blk;
pub mod vsock_connection;
pub mod vsock_packet;

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

/// An anonymous in-memory file holding `contents` (a disk image or a tree file that
/// never touches the real file system, so runs stay fast and leave nothing behind).
///
/// # Panics
/// If the kernel refuses memfd_create or the write: the harness cannot run at all then.
#[must_use]
pub fn memfd(contents: &[u8]) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the name is a static
    // C string literal and the returned fd (checked below) is owned by nobody else.
    let fd = unsafe { libc::memfd_create(c"mvm-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh, valid descriptor that this File becomes the only owner of.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(contents).expect("write memfd");
    file
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    type Harness = fn(&[u8]);

    const TARGETS: [(&str, Harness); 9] = [
        ("virtio_queue_blk", crate::virtio_queue_blk::run),
        ("vsock_packet", crate::vsock_packet::run),
        ("vsock_connection", crate::vsock_connection::run),
        ("agent_frame", crate::agent_frame::run),
        ("plan_envelope", crate::plan_envelope::run),
        ("verity_tree", crate::verity_tree::run),
        ("net_frame", crate::net_frame::run),
        ("mmio_transport", crate::mmio_transport::run),
        ("egress_head", crate::egress_head::run),
    ];

    /// Runs every file under `dir/<target>/` through its harness; returns how many ran.
    fn replay(dir: &str) -> usize {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut ran = 0;
        for (target, run) in TARGETS {
            let Ok(entries) = std::fs::read_dir(root.join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                eprintln!("{}", path.display());
                run(&bytes);
                ran += 1;
            }
        }
        ran
    }

    #[test]
    fn every_seed_passes_its_harness() {
        assert!(replay("corpus") >= TARGETS.len(), "a target has no seeds");
    }

    /// Every crash input ever found. Fails until the bug behind each one is fixed.
    #[test]
    fn every_regression_passes_its_harness() {
        replay("regressions");
    }
}
