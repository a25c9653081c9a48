//! The control protocol between the host's `mvm` and the one inside the
//! test host: the JSON lines on `mvm.ctl`, the framed stdin on `mvm.in`,
//! and how an inner error keeps its kind across the port.

use std::io::{BufRead, Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::{ProcessEnd, RunError, RunOutcome, RunSpec};

/// The virtio-serial port names, as the test host sees them in
/// `/sys/class/virtio-ports/*/name`.
pub const PORT_CTL: &str = "mvm.ctl";
pub const PORT_IN: &str = "mvm.in";
pub const PORT_OUT: &str = "mvm.out";
pub const PORT_ERR: &str = "mvm.err";
/// The most of the VMM's events file the test host sends back (whole lines;
/// the rest is cut and says so in the log).
const MAX_VMM_EVENTS: usize = 512 << 10;
/// The longest control line either side accepts.
const MAX_CTL_LINE: u64 = 1 << 20;

/// The request the host sends on `mvm.ctl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRequest {
    /// What to run.
    pub spec: RunSpec,
    /// The signed plan and the key to check it with; `None` boots `--dev`.
    /// Admission and the keys stay on the outer host: only the envelope and
    /// the admission public key travel.
    #[serde(default)]
    pub plan: Option<PlanBundle>,
    /// Whether the host writes the run's records ahead: the inner side then
    /// sends `booted` and waits for `proceed` before the workload starts.
    #[serde(default)]
    pub journal: bool,
    /// A session instead of the spec's command: once the workload may start, the
    /// inner side relays `mvm.in` byte for byte to a fresh agent connection until
    /// the host sends `stop` (see `crate::backend::session`).
    #[serde(default)]
    pub session: bool,
    /// A warm start carried on the test host's `mvmwarm` disk (`super::warm`).
    #[serde(default)]
    pub warm: Option<WarmRequest>,
}

/// What the test host does with the warm snapshot disk its host attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum WarmRequest {
    /// The disk is blank and writable: boot, take the image's snapshot once the agent
    /// answers, and write it to the disk as a pack, unsealed.
    Take,
    /// The disk holds a pack: restore from it, under this seal (the host's, over the
    /// pack's manifest).
    Restore {
        /// The sealed manifest's DSSE envelope.
        seal: String,
        /// The host vouches that the disk is unchanged since it was kept: once unpacked,
        /// send `unpacked` and wait for `resealed`.
        #[serde(default)]
        vouched: bool,
    },
}

/// What became of the warm start the host asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmEnd {
    /// `take`: the snapshot is on the disk, for the host to seal and keep.
    Kept,
    /// `restore`: the VM was restored from it.
    Restored,
    /// `restore`: the pack or the VMM refused it (the run booted instead); the host
    /// drops it.
    Refused,
    /// Neither: the run was not eligible, or ended before the snapshot.
    Unused,
}

/// A line the host sends on `mvm.ctl` after the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum HostRecord {
    /// The host appended what `booted` reported (and each secret's release):
    /// put the secrets into the guest, then start the workload.
    Proceed {
        /// The secrets the host released for this measured boot (base64 on the
        /// wire; never printed).
        #[serde(with = "crate::secrets::wire", default)]
        secrets: Vec<crate::secrets::Secret>,
        /// Secret substitution: what the egress proxy beside the tap needs (values
        /// and the CA's key among it; never printed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        substitution: Option<Box<crate::egress_proxy::Handoff>>,
    },
    /// The session is over: stop relaying, power the VM off and report.
    Stop,
    /// The host's `mvm` got this signal (Ctrl-C, SIGTERM, SIGHUP).
    Signal {
        /// The signal number.
        signal: i32,
    },
    /// The answer to `unpacked`: the warm snapshot's seal again, naming the unpacked
    /// memory file as the one sealed (`None`: the host does not vouch for the disk; the
    /// VMM hashes the file).
    Resealed {
        /// The new seal's DSSE envelope.
        seal: Option<String>,
    },
}

/// A signed plan in transit to the test host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBundle {
    /// The DSSE envelope, as signed.
    pub envelope: String,
    /// The admission public key file's text.
    pub trust: String,
}

/// A boot the inner VMM refused, carried out by its parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRefusal {
    /// The VMM's reason name.
    pub reason: String,
    /// The VMM's exit status.
    pub status: i32,
    /// The VMM's message.
    pub detail: String,
}

/// Why the inner run failed, by kind, so the host maps it to the same exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestErrorKind {
    NoBackend,
    Image,
    Missing,
    VmmDied,
    BootRefused,
    AgentNotReady,
    Timeout,
    Interrupted,
    Agent,
    Io,
}

/// One line the test host sends on `mvm.ctl`.
// One report per run crosses the port: its size on the stack does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum GuestRecord {
    /// The inner `mvm` read the request (the test host is up).
    Started,
    /// The inner agent answered; the workload waits for the host's `proceed`.
    Booted {
        /// The inner VMM's events file so far (its `boot_verified`, or for a warm start
        /// its `snapshot_restored`).
        vmm_events: String,
        /// The VM was restored from a snapshot, not booted.
        #[serde(default)]
        restored: bool,
    },
    /// The egress proxy in the test host substituted or refused something (for the
    /// host's audit log; never a value).
    Observed(crate::egress_proxy::Observed),
    /// The warm snapshot the host vouched for is unpacked: its memory file is this one
    /// (the host answers `resealed`).
    Unpacked {
        /// The unpacked memory file, as this test host's kernel knows it.
        memory_file: mvm_loader::file_identity::FileIdentity,
    },
    /// The run ended; the counts say how much output the host should have.
    Report {
        outcome: Option<RunOutcome>,
        error: Option<(GuestErrorKind, String)>,
        stdout_bytes: u64,
        stderr_bytes: u64,
        /// The refusal, when the error kind is `boot_refused`.
        #[serde(default)]
        refusal: Option<GuestRefusal>,
        /// The inner VMM's events file (JSON lines), for the outer audit log.
        #[serde(default)]
        vmm_events: String,
        /// How the inner VMM process ended, when it died early.
        #[serde(default)]
        vm_exit: Option<ProcessEnd>,
        /// What became of the warm start asked for, if one was.
        #[serde(default)]
        warm: Option<WarmEnd>,
    },
}

pub(super) fn error_kind(e: &RunError) -> GuestErrorKind {
    match e {
        RunError::NoBackend(_) => GuestErrorKind::NoBackend,
        // Checked on the outer host before the test host starts.
        RunError::Resources(_) => GuestErrorKind::Missing,
        // Admission happens on the outer host; the test host never denies.
        RunError::Denied(_) => GuestErrorKind::Missing,
        RunError::Image(_) => GuestErrorKind::Image,
        RunError::Missing(_) => GuestErrorKind::Missing,
        RunError::VmmDied { .. } => GuestErrorKind::VmmDied,
        RunError::BootRefused { .. } => GuestErrorKind::BootRefused,
        RunError::AgentNotReady { .. } => GuestErrorKind::AgentNotReady,
        RunError::Timeout(_) => GuestErrorKind::Timeout,
        RunError::Interrupted => GuestErrorKind::Interrupted,
        RunError::Agent(_) => GuestErrorKind::Agent,
        RunError::Io { .. } => GuestErrorKind::Io,
        // netrt: the test host runs mvm as root; a --net failure there is mvm's own.
        RunError::Net(_) => GuestErrorKind::Missing,
    }
}

/// Rebuilds an inner error on the host side, keeping its kind.
pub(super) fn error_from_guest(
    kind: GuestErrorKind,
    message: String,
    refusal: Option<GuestRefusal>,
    vm_exit: Option<ProcessEnd>,
    spec: &RunSpec,
) -> RunError {
    let inside = format!("inside the test host: {message}");
    match kind {
        GuestErrorKind::BootRefused => match refusal {
            Some(r) => RunError::BootRefused {
                reason: r.reason,
                status: r.status,
                detail: r.detail,
            },
            None => RunError::VmmDied {
                reason: inside,
                log: String::new(),
                exit: None,
            },
        },
        GuestErrorKind::NoBackend => RunError::NoBackend(inside),
        GuestErrorKind::Image | GuestErrorKind::Missing => RunError::Missing(inside),
        GuestErrorKind::VmmDied => RunError::VmmDied {
            reason: inside,
            log: String::new(),
            exit: vm_exit,
        },
        GuestErrorKind::AgentNotReady => RunError::AgentNotReady {
            timeout: Duration::from_secs(spec.ready_timeout_secs),
            reason: inside,
            log: String::new(),
        },
        GuestErrorKind::Timeout => {
            RunError::Timeout(Duration::from_secs(spec.timeout_secs.unwrap_or(0)))
        }
        GuestErrorKind::Interrupted => RunError::Interrupted,
        GuestErrorKind::Agent => RunError::Agent(inside),
        GuestErrorKind::Io => RunError::Io {
            what: "inside the test host".into(),
            source: std::io::Error::other(message),
        },
    }
}

/// Reads one control line of at most [`MAX_CTL_LINE`] bytes; `None` at EOF.
pub(super) fn read_ctl_line(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader.take(MAX_CTL_LINE).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control line longer than {MAX_CTL_LINE} bytes or cut short"),
        ));
    }
    Ok(Some(line))
}

/// Parses one control line from the test host.
pub fn parse_record(line: &str) -> Result<GuestRecord, serde_json::Error> {
    serde_json::from_str(line.trim_end())
}

pub(super) fn write_json_line(out: &mut impl Write, value: &impl Serialize) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    out.flush()
}

/// The VMM's events text cut to at most [`MAX_VMM_EVENTS`] bytes of whole lines.
pub(super) fn cut_events(mut text: String) -> String {
    if text.len() > MAX_VMM_EVENTS {
        let end = text
            .as_bytes()
            .get(..MAX_VMM_EVENTS)
            .and_then(|head| head.iter().rposition(|&b| b == b'\n'))
            .map_or(0, |i| i + 1);
        tracing::warn!(
            "VMM events are {} bytes; only the first {end} are sent back",
            text.len()
        );
        text.truncate(end);
    }
    text
}

/// The largest stdin frame.
pub(super) const STDIN_FRAME_MAX: usize = 64 << 10;

/// The test host's end of the stdin port: `[u32 LE length][bytes]` frames,
/// the empty frame meaning end of input. A virtio-serial port has no
/// reliable end of file: the host closing its socket reaches the guest on
/// the control queue, which can overtake the last data on the port's own
/// queue, so the end travels in band.
pub struct FramedStdin<R> {
    inner: R,
    left: usize,
    ended: bool,
}

impl<R: Read> FramedStdin<R> {
    /// Reads frames from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            ended: false,
        }
    }
}

impl<R: Read> Read for FramedStdin<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut len = [0u8; 4];
            self.inner.read_exact(&mut len)?;
            let len = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
            if len == 0 {
                self.ended = true;
                return Ok(0);
            }
            if len > STDIN_FRAME_MAX {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("stdin frame of {len} bytes (at most {STDIN_FRAME_MAX})"),
                ));
            }
            self.left = len;
        }
        let want = buf.len().min(self.left);
        let slot = buf.get_mut(..want).unwrap_or_default();
        let n = self.inner.read(slot)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "stdin port closed inside a frame",
            ));
        }
        self.left = self.left.saturating_sub(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;
    use std::io::BufReader;

    #[test]
    fn records_round_trip_and_refuse_junk() {
        let report = GuestRecord::Report {
            outcome: None,
            error: Some((GuestErrorKind::Timeout, "slow".into())),
            stdout_bytes: 3,
            stderr_bytes: 0,
            refusal: None,
            vmm_events: "{\"event\":\"vm_exit\"}\n".into(),
            vm_exit: Some(ProcessEnd {
                code: Some(1),
                signal: None,
            }),
            warm: Some(WarmEnd::Refused),
        };
        let line = serde_json::to_string(&report).unwrap();
        assert_eq!(parse_record(&line).unwrap(), report);
        assert_eq!(parse_record("\"started\"\n").unwrap(), GuestRecord::Started);
        let booted = GuestRecord::Booted {
            vmm_events: "{\"event\":\"snapshot_restored\"}\n".into(),
            restored: true,
        };
        let line = serde_json::to_string(&booted).unwrap();
        assert_eq!(parse_record(&line).unwrap(), booted);
        let secret = crate::secrets::Secret {
            name: "TOKEN".into(),
            value: crate::secrets::SecretValue::new(b"v".to_vec()),
            delivery: crate::secrets::Delivery::Env,
        };
        for host in [
            HostRecord::Proceed {
                secrets: Vec::new(),
                substitution: None,
            },
            HostRecord::Proceed {
                secrets: vec![secret],
                substitution: None,
            },
            HostRecord::Signal { signal: 2 },
            HostRecord::Resealed {
                seal: Some("{}".into()),
            },
        ] {
            let line = serde_json::to_string(&host).unwrap();
            assert_eq!(serde_json::from_str::<HostRecord>(&line).unwrap(), host);
        }
        assert_eq!(
            serde_json::to_string(&HostRecord::Signal { signal: 2 }).unwrap(),
            r#"{"signal":{"signal":2}}"#
        );
        assert!(parse_record("{\"report\":{\"bogus\":1}}").is_err());
        assert!(parse_record("").is_err());
        let observed = GuestRecord::Observed(crate::egress_proxy::Observed::Refused {
            secret: Some("API_TOKEN".into()),
            destination: "api.mvm.test at 192.0.2.7:443".into(),
            reason: "placeholder_in_target".into(),
        });
        let line = serde_json::to_string(&observed).unwrap();
        assert_eq!(parse_record(&line).unwrap(), observed);
    }

    #[test]
    fn proceed_carries_a_substitution_handoff() {
        let ca =
            crate::egress_proxy::SandboxCa::generate("p", &["api.mvm.test".to_owned()]).unwrap();
        let handoff = crate::egress_proxy::Handoff::new(
            mvm_loader::plan::Substitution {
                ca_sha256: ca.cert_sha256(),
                secrets: Vec::new(),
            },
            vec![(
                "API_TOKEN".into(),
                crate::secrets::SecretValue::new(b"sk-proceed-value".to_vec()),
            )],
            ca.to_parts(),
            &[rustls::pki_types::CertificateDer::from(
                ca.cert_der().to_vec(),
            )],
        );
        let proceed = HostRecord::Proceed {
            secrets: Vec::new(),
            substitution: Some(Box::new(handoff)),
        };
        let line = serde_json::to_string(&proceed).unwrap();
        assert!(!line.contains("sk-proceed-value"));
        assert!(!format!("{proceed:?}").contains("PRIVATE KEY"));
        assert_eq!(serde_json::from_str::<HostRecord>(&line).unwrap(), proceed);
        // An older host's proceed, without the field, still parses.
        let old: HostRecord = serde_json::from_str(r#"{"proceed":{"secrets":[]}}"#).unwrap();
        assert!(matches!(
            old,
            HostRecord::Proceed {
                substitution: None,
                ..
            }
        ));
    }

    #[test]
    fn inner_errors_keep_their_kind() {
        let e = error_from_guest(GuestErrorKind::Timeout, "t".into(), None, None, &spec());
        assert!(matches!(e, RunError::Timeout(d) if d == Duration::from_secs(2)));
        let end = ProcessEnd {
            code: None,
            signal: Some(9),
        };
        let e = error_from_guest(
            GuestErrorKind::VmmDied,
            "boom".into(),
            None,
            Some(end),
            &spec(),
        );
        assert!(matches!(e, RunError::VmmDied { exit: Some(x), .. } if x == end));
        assert!(matches!(e, RunError::VmmDied { .. }));
        assert!(e.to_string().contains("inside the test host: boom"));
        assert_eq!(
            error_kind(&RunError::Interrupted),
            GuestErrorKind::Interrupted
        );
        let refusal = GuestRefusal {
            reason: "kernel_mismatch".into(),
            status: 20,
            detail: "kernel digest mismatch".into(),
        };
        let e = error_from_guest(
            GuestErrorKind::BootRefused,
            "x".into(),
            Some(refusal),
            None,
            &spec(),
        );
        assert!(
            matches!(&e, RunError::BootRefused { reason, status: 20, .. } if reason == "kernel_mismatch"),
            "{e}"
        );
    }

    #[test]
    fn control_lines_are_bounded() {
        let long = vec![b'x'; usize::try_from(MAX_CTL_LINE).unwrap() + 10];
        let mut reader = BufReader::new(long.as_slice());
        assert!(read_ctl_line(&mut reader).is_err());
        let mut ok = BufReader::new(&b"\"started\"\n"[..]);
        assert_eq!(
            read_ctl_line(&mut ok).unwrap().as_deref(),
            Some("\"started\"\n")
        );
        assert_eq!(read_ctl_line(&mut ok).unwrap(), None);
    }

    #[test]
    fn stdin_frames_carry_bytes_and_an_in_band_end() {
        let mut wire = Vec::new();
        for chunk in [&b"piped "[..], &b"stdin\n"[..], &b""[..]] {
            wire.extend_from_slice(&u32::try_from(chunk.len()).unwrap().to_le_bytes());
            wire.extend_from_slice(chunk);
        }
        // Bytes after the end frame are never read.
        wire.extend_from_slice(b"junk");
        let mut out = String::new();
        FramedStdin::new(wire.as_slice())
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "piped stdin\n");

        let mut oversize = (u32::try_from(STDIN_FRAME_MAX).unwrap() + 1)
            .to_le_bytes()
            .to_vec();
        oversize.extend_from_slice(&[0; 8]);
        let err = FramedStdin::new(oversize.as_slice())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);

        let mut cut = 10u32.to_le_bytes().to_vec();
        cut.extend_from_slice(b"abc");
        let err = FramedStdin::new(cut.as_slice())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn events_sent_back_are_cut_at_a_line() {
        let line = format!("{}\n", "x".repeat(1000));
        let text = line.repeat(MAX_VMM_EVENTS / 1000 + 10);
        let cut = cut_events(text);
        assert!(cut.len() <= MAX_VMM_EVENTS);
        assert!(cut.ends_with('\n'));
        assert_eq!(cut.len() % line.len(), 0);
        assert_eq!(cut_events("short\n".into()), "short\n");
    }
}
