//! A flake's `flake.lock` read for its locked inputs, and the Nix builder's report
//! (the `mvm-result` lines of its stdout) checked.

use base64::Engine as _;
use serde::Deserialize;

use crate::image::manifest::FlakeInput;

/// The most store paths a closure may have.
const MAX_CLOSURE: usize = 100_000;

/// Why a lock or a report is refused.
#[derive(Debug, thiserror::Error)]
pub enum LockfileError {
    /// Not a flake lock.
    #[error("flake.lock: {0}")]
    Lock(String),
    /// The builder's report.
    #[error("the Nix builder's report: {0}")]
    Report(String),
}

#[derive(Deserialize)]
struct LockFile {
    nodes: std::collections::BTreeMap<String, Node>,
    root: String,
    version: u32,
}

#[derive(Deserialize)]
struct Node {
    #[serde(default)]
    locked: Option<Locked>,
}

#[derive(Deserialize)]
struct Locked {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    rev: Option<String>,
    #[serde(rename = "narHash", default)]
    nar_hash: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

/// The locked inputs of `flake.lock` (every node but the root), in name order. A
/// node without `narHash` is refused (it is not locked), but for a path input
/// relative to the flake (`./x`, no `..`): that is part of the flake's own source.
pub fn inputs(bytes: &[u8]) -> Result<Vec<FlakeInput>, LockfileError> {
    let lock: LockFile =
        serde_json::from_slice(bytes).map_err(|e| LockfileError::Lock(e.to_string()))?;
    if !(5..=7).contains(&lock.version) {
        return Err(LockfileError::Lock(format!(
            "version {} (5 to 7 are read)",
            lock.version
        )));
    }
    let mut out = Vec::new();
    for (name, node) in &lock.nodes {
        if *name == lock.root {
            continue;
        }
        let Some(locked) = &node.locked else {
            return Err(LockfileError::Lock(format!("input {name:?} is not locked")));
        };
        let inside = locked.kind == "path"
            && locked
                .path
                .as_deref()
                .is_some_and(|p| p.starts_with("./") && !p.split('/').any(|c| c == ".."));
        match &locked.nar_hash {
            None if !inside => {
                return Err(LockfileError::Lock(format!(
                    "input {name:?} has no narHash"
                )))
            }
            Some(h) if nar_hash_digest(h).is_none() => {
                return Err(LockfileError::Lock(format!(
                    "input {name:?}: narHash {h:?} is not sha256-<base64>"
                )))
            }
            _ => {}
        }
        out.push(FlakeInput {
            name: name.clone(),
            kind: locked.kind.clone(),
            rev: locked.rev.clone(),
            nar_hash: locked.nar_hash.clone(),
            path: locked.path.clone(),
        });
    }
    Ok(out)
}

/// `sha256:<hex>` of an SRI `sha256-<base64>` hash.
#[must_use]
pub fn nar_hash_digest(sri: &str) -> Option<String> {
    let b64 = sri.strip_prefix("sha256-")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    (bytes.len() == 32).then(|| format!("sha256:{}", hex::encode(bytes)))
}

/// What the Nix builder reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The lock it made (the first one reported), when asked to lock.
    pub lock: Option<Vec<u8>>,
    /// The output's store path.
    pub out: String,
    /// The closure's store paths, sorted.
    pub closure: Vec<String>,
    /// The size of the kernel written to the output disk, for an output that is a
    /// kernel plus a root filesystem.
    pub kernel_bytes: Option<u64>,
}

/// Whether `path` is `/nix/store/<32 base32 chars>-<name>`.
fn is_store_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/nix/store/") else {
        return false;
    };
    let (hash, name) = rest.split_at(rest.len().min(32));
    hash.len() == 32
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_lowercase() && !b"eotu".contains(&b)))
        && name.strip_prefix('-').is_some_and(|n| {
            !n.is_empty()
                && n.len() <= 211
                && !n.starts_with('.')
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
        })
}

impl Report {
    /// Parses the result lines (`KEY VALUE`). The first `flake.lock` counts (it is
    /// printed before anything of the flake's is built); exactly one `out`; the
    /// closure must hold the output.
    pub fn parse(lines: &[String]) -> Result<Self, LockfileError> {
        let bad = |why: String| LockfileError::Report(why);
        let mut report = Self::default();
        let mut out = None;
        for line in lines {
            let (key, value) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match key {
                "flake.lock" => {
                    if report.lock.is_none() {
                        inputs(value.as_bytes())?;
                        // The line is the lock without its newlines: written back
                        // in Nix's layout (two-space indents, sorted keys).
                        let parsed: serde_json::Value = serde_json::from_str(value)
                            .map_err(|e| LockfileError::Lock(e.to_string()))?;
                        let mut bytes = serde_json::to_vec_pretty(&parsed)
                            .map_err(|e| LockfileError::Lock(e.to_string()))?;
                        bytes.push(b'\n');
                        report.lock = Some(bytes);
                    }
                }
                "out" => {
                    if out.is_some() {
                        return Err(bad("two outputs".into()));
                    }
                    if !is_store_path(value) {
                        return Err(bad(format!("output {value:?} is not a store path")));
                    }
                    out = Some(value.to_owned());
                }
                "closure" => {
                    if !is_store_path(value) {
                        return Err(bad(format!("closure path {value:?} is not a store path")));
                    }
                    if report.closure.len() >= MAX_CLOSURE {
                        return Err(bad(format!("more than {MAX_CLOSURE} store paths")));
                    }
                    report.closure.push(value.to_owned());
                }
                "kernel" => {
                    let size = value
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad(format!("kernel size {value:?}")))?;
                    if report.kernel_bytes.replace(size).is_some() {
                        return Err(bad("two kernels".into()));
                    }
                }
                other => return Err(bad(format!("unknown result {other:?}"))),
            }
        }
        report.out = out.ok_or_else(|| bad("no output".into()))?;
        report.closure.sort();
        report.closure.dedup();
        if report.closure.binary_search(&report.out).is_err() {
            return Err(bad("the closure does not hold the output".into()));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"{"nodes":{"busybox":{"flake":false,"locked":{"lastModified":1,"narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","path":"./busybox","type":"path"},"original":{"path":"./busybox","type":"path"}},"root":{"inputs":{"busybox":"busybox"}}},"root":"root","version":7}"#;
    const OUT: &str = "/nix/store/0c6fyr3kk9r1hv3yqgkp4m1xfs6mijhv-mvm-test-rootfs";

    #[test]
    fn a_lock_gives_its_inputs() {
        let inputs = inputs(LOCK.as_bytes()).unwrap();
        assert_eq!(inputs.len(), 1);
        let i = inputs.first().unwrap();
        assert_eq!((i.name.as_str(), i.kind.as_str()), ("busybox", "path"));
        assert_eq!(
            nar_hash_digest(i.nar_hash.as_deref().unwrap()).unwrap(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // A relative path input needs no narHash (it is the flake's own source)...
        let relative = LOCK.replace(
            r#""narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","#,
            "",
        );
        let got = super::inputs(relative.as_bytes()).unwrap();
        assert_eq!(got.first().unwrap().path.as_deref(), Some("./busybox"));
        // ...any other does.
        for other in [r#""path":"../busybox""#, r#""path":"/etc""#] {
            let unlocked = relative.replace(r#""path":"./busybox""#, other);
            let err = super::inputs(unlocked.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("no narHash"), "{err}");
        }
        assert!(super::inputs(b"{}").is_err());
    }

    #[test]
    fn reports_are_checked() {
        let lines = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let ok = Report::parse(&lines(&[
            &format!("flake.lock {LOCK}"),
            &format!("out {OUT}"),
            &format!("closure {OUT}"),
            // A later lock line (from the flake's own build) does not count.
            "flake.lock {}",
        ]))
        .unwrap();
        assert_eq!(ok.out, OUT);
        assert_eq!(ok.kernel_bytes, None);
        let with_kernel = Report::parse(&lines(&[
            &format!("out {OUT}"),
            &format!("closure {OUT}"),
            "kernel 1234",
        ]))
        .unwrap();
        assert_eq!(with_kernel.kernel_bytes, Some(1234));
        let written = String::from_utf8(ok.lock.unwrap()).unwrap();
        assert!(written.starts_with("{\n  \"nodes\": {\n"), "{written}");
        assert_eq!(
            inputs(written.as_bytes()).unwrap(),
            inputs(LOCK.as_bytes()).unwrap()
        );
        for bad in [
            vec![format!("out {OUT}")],
            vec![format!("out /etc/passwd"), format!("closure /etc/passwd")],
            vec![format!("out {OUT}/../x"), format!("closure {OUT}")],
            vec![
                format!("out {OUT}"),
                format!("out {OUT}"),
                format!("closure {OUT}"),
            ],
            vec![
                format!("flake.lock nonsense"),
                format!("out {OUT}"),
                format!("closure {OUT}"),
            ],
            vec![format!("rm -rf /")],
            vec![
                format!("out {OUT}"),
                format!("closure {OUT}"),
                "kernel -1".into(),
            ],
            vec![
                format!("out {OUT}"),
                format!("closure {OUT}"),
                "kernel 0".into(),
            ],
            vec![
                format!("out {OUT}"),
                format!("closure {OUT}"),
                "kernel 1".into(),
                "kernel 2".into(),
            ],
        ] {
            assert!(Report::parse(&bad).is_err(), "{bad:?}");
        }
    }
}
