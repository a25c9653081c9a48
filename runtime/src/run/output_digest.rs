//! The digests of a run's output: [`DigestSink`] passes the workload's stdout
//! and stderr on as they arrive and keeps the sha256 and size of each
//! ([`OutputDigests`]), which the run's `exec_exited` record and its receipt
//! state.

use mvm_loader::measure::Sha256Digest;
use sha2::{Digest, Sha256};

use crate::backend::OutputSink;

/// Passes output on and keeps its sha256 and size.
pub struct DigestSink<'a> {
    inner: &'a mut dyn OutputSink,
    stdout: (Sha256, u64),
    stderr: (Sha256, u64),
}

impl<'a> DigestSink<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a mut dyn OutputSink) -> Self {
        Self {
            inner,
            stdout: (Sha256::new(), 0),
            stderr: (Sha256::new(), 0),
        }
    }

    /// `(stdout, stderr)` digests and sizes so far.
    pub fn digests(&self) -> OutputDigests {
        let done = |(h, n): &(Sha256, u64)| {
            let bytes: [u8; 32] = h.clone().finalize().into();
            (Sha256Digest(bytes), *n)
        };
        OutputDigests {
            stdout: done(&self.stdout),
            stderr: done(&self.stderr),
        }
    }
}

fn count(state: &mut (Sha256, u64), data: &[u8]) {
    state.0.update(data);
    state.1 = state
        .1
        .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
}

impl OutputSink for DigestSink<'_> {
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()> {
        count(&mut self.stdout, data);
        self.inner.stdout(data)
    }

    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()> {
        count(&mut self.stderr, data);
        self.inner.stderr(data)
    }
}

/// Digests and sizes of what the workload wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputDigests {
    /// stdout.
    pub stdout: (Sha256Digest, u64),
    /// stderr.
    pub stderr: (Sha256Digest, u64),
}

impl OutputDigests {
    /// No output at all (a session's: its commands' output is recorded per command).
    pub fn empty() -> Self {
        let none = (Sha256Digest::of(b""), 0);
        Self {
            stdout: none,
            stderr: none,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_sink_passes_output_on_and_hashes_it() {
        #[derive(Default)]
        struct Keep(Vec<u8>, Vec<u8>);
        impl OutputSink for Keep {
            fn stdout(&mut self, d: &[u8]) -> std::io::Result<()> {
                self.0.extend_from_slice(d);
                Ok(())
            }
            fn stderr(&mut self, d: &[u8]) -> std::io::Result<()> {
                self.1.extend_from_slice(d);
                Ok(())
            }
        }
        let mut keep = Keep::default();
        let mut sink = DigestSink::new(&mut keep);
        sink.stdout(b"hel").unwrap();
        sink.stdout(b"lo").unwrap();
        sink.stderr(b"e").unwrap();
        let d = sink.digests();
        assert_eq!(d.stdout, (Sha256Digest::of(b"hello"), 5));
        assert_eq!(d.stderr, (Sha256Digest::of(b"e"), 1));
        assert_eq!(keep.0, b"hello");
    }
}
