//! The workload's stdin, copied from the caller's reader on its own thread, so a run keeps
//! draining output while a large stdin goes in (a `cat` writes as much as it reads). Each
//! backend says only where a chunk goes: the agent's exec stream (KVM) or the test host's
//! framed stdin port (emulated).

use std::io::{ErrorKind, Read};

/// Reads `source` on a thread named `name`, up to `chunk` bytes at a time, and hands each
/// read to `sink`; the end (EOF, or a read error, which is logged) is handed over as an
/// empty slice, once. The thread stops when `sink` returns `false` or after the end. It is
/// not joined: if the run ends first it stays blocked in `read`, holding nothing that needs
/// cleaning up.
pub fn spawn(
    name: &str,
    mut source: Box<dyn Read + Send>,
    chunk: usize,
    mut sink: impl FnMut(&[u8]) -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut buf = vec![0u8; chunk];
            loop {
                let n = match source.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!("stdin: {e}");
                        0
                    }
                };
                let data = buf.get(..n).unwrap_or_default();
                if !sink(data) || data.is_empty() {
                    return;
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn every_chunk_then_one_empty_end() {
        let (tx, rx) = mpsc::channel();
        let data: Vec<u8> = (0..=255).cycle().take(10_000).collect();
        spawn(
            "t",
            Box::new(std::io::Cursor::new(data.clone())),
            4096,
            move |d| tx.send(d.to_vec()).is_ok(),
        )
        .unwrap();
        let chunks: Vec<Vec<u8>> = rx.iter().collect();
        assert_eq!(chunks.last().map(Vec::len), Some(0));
        assert!(chunks.iter().all(|c| c.len() <= 4096));
        assert_eq!(chunks.concat(), data);
    }

    #[test]
    fn a_sink_that_refuses_stops_the_copy() {
        let (tx, rx) = mpsc::channel();
        let data = vec![7u8; 10_000];
        spawn("t", Box::new(std::io::Cursor::new(data)), 1000, move |d| {
            let _ = tx.send(d.len());
            false
        })
        .unwrap();
        assert_eq!(rx.iter().collect::<Vec<_>>(), [1000]);
    }
}
