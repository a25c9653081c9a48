//! The trust commands: `mvm keys init|show`, `mvm plan show|verify`,
//! `mvm audit show|verify`, `mvm receipt verify`.
//!
//! Exit statuses: 0 success; 1 the check failed (the message names what and where);
//! 2 bad command line; `mvm plan verify` uses the VMM's refusal statuses (10
//! untrusted_key, 11 bad_signature, 12 invalid_plan, 13 unknown_field, 14
//! newer_schema, 15 expired, 16 not_yet_valid) so a script gets the same answer
//! offline as at boot.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use mvm_loader::dsse::{self, TrustedKeys};
use mvm_loader::plan::envelope::{decode_plan_unverified, verify_plan, PlanVerifyError};
use mvm_loader::plan::{UtcTime, CLOCK_SKEW};

use crate::admission::keys::{config_dir, HostKeys};
use crate::audit::{self, AuditLog};
use crate::receipt::verify_receipt;
use crate::terminal::escape_controls;

/// The check failed.
pub const FAILED: i32 = 1;
/// A file could not be read or a key could not be loaded.
pub const UNUSABLE: i32 = 2;
/// Largest envelope, receipt or key file read.
const MAX_FILE: u64 = 1 << 20;

/// `mvm keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the host's admission and audit keys (if missing) and print their ids.
    Init,
    /// Print the key ids and public key files (for --trust).
    Show,
}

/// `mvm plan ...`.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Print a plan envelope readably (NOT verified: use `mvm plan verify`).
    Show {
        /// The DSSE envelope.
        envelope: PathBuf,
    },
    /// Check a plan's signature, schema and validity window offline.
    Verify {
        /// The DSSE envelope.
        envelope: PathBuf,
        /// A trusted public key file (repeatable; default: this host's admission.pub).
        #[arg(long, value_name = "PUBKEY")]
        trust: Vec<PathBuf>,
    },
}

/// `mvm audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the audit log.
    Show(AuditShowArgs),
    /// Check every record's signature, sequence and chain; name the first bad one.
    Verify {
        /// The log (default: the host's audit.jsonl).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// The audit public key file (default: this host's audit.pub).
        #[arg(long, value_name = "PUBKEY")]
        trust: Option<PathBuf>,
    },
}

/// `mvm audit show`.
#[derive(Debug, Args)]
pub struct AuditShowArgs {
    /// Only this VM's records.
    #[arg(long, value_name = "ID")]
    pub vm: Option<String>,
    /// One JSON record per line, as stored.
    #[arg(long)]
    pub json: bool,
    /// The log (default: the host's audit.jsonl).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

/// `mvm receipt ...`.
#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Check a receipt's signature and print what it states.
    Verify {
        /// The receipt (a DSSE envelope).
        file: PathBuf,
        /// A trusted public key file (repeatable; default: this host's audit.pub).
        #[arg(long, value_name = "PUBKEY")]
        trust: Vec<PathBuf>,
    },
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{}: larger than {limit} bytes", path.display()));
    }
    Ok(bytes)
}

/// The trusted keys from `files`, else this host's `<role>.pub`.
fn trusted_keys(files: &[PathBuf], role: &str) -> Result<TrustedKeys, String> {
    let default;
    let files = if files.is_empty() {
        let dir = config_dir().map_err(|e| e.to_string())?;
        default = [dir.join(format!("{role}.pub"))];
        &default[..]
    } else {
        files
    };
    let mut trusted = TrustedKeys::new();
    for f in files {
        let text = String::from_utf8(read_limited(f, MAX_FILE)?)
            .map_err(|_| format!("{}: not UTF-8 text", f.display()))?;
        trusted
            .add_public_key_file(&text)
            .map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(trusted)
}

fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("mvm: {msg}");
    code
}

/// `mvm keys`.
pub fn keys(command: &KeysCommand) -> i32 {
    let dir = match config_dir() {
        Ok(d) => d,
        Err(e) => return fail(UNUSABLE, e),
    };
    let keys = match command {
        KeysCommand::Init => match HostKeys::load_or_create(&dir) {
            Ok((keys, created)) => {
                println!(
                    "{} in {}",
                    if created {
                        "created host keys"
                    } else {
                        "host keys already exist"
                    },
                    dir.display()
                );
                keys
            }
            Err(e) => return fail(UNUSABLE, e),
        },
        KeysCommand::Show => match HostKeys::load(&dir) {
            Ok(keys) => keys,
            Err(e) => return fail(UNUSABLE, format!("{e} (run `mvm keys init`)")),
        },
    };
    for info in keys.public() {
        println!(
            "{:<10} {}  {}",
            info.role,
            info.keyid,
            info.public_key_file.display()
        );
    }
    0
}

/// The exit status `mvm plan verify` gives a refusal (the VMM's, see `mvm-vmm --help`).
pub fn plan_refusal_status(e: &PlanVerifyError) -> i32 {
    match e.reason() {
        "untrusted_key" => 10,
        "bad_signature" => 11,
        "unknown_field" => 13,
        "newer_schema" => 14,
        "expired" => 15,
        "not_yet_valid" => 16,
        "replay" => 17,
        "replay_store" => 18,
        _ => 12,
    }
}

/// `mvm plan`.
pub fn plan(command: &PlanCommand) -> i32 {
    match command {
        PlanCommand::Show { envelope } => {
            let bytes = match read_limited(envelope, MAX_FILE) {
                Ok(b) => b,
                Err(e) => return fail(UNUSABLE, e),
            };
            match decode_plan_unverified(&bytes) {
                Ok(plan) => {
                    println!("# NOT VERIFIED: run `mvm plan verify` to check the signature");
                    match serde_json::to_string_pretty(&plan) {
                        Ok(text) => println!("{text}"),
                        Err(e) => return fail(FAILED, e),
                    }
                    0
                }
                Err(e) => fail(
                    plan_refusal_status(&e),
                    format!("{}: {e}", envelope.display()),
                ),
            }
        }
        PlanCommand::Verify { envelope, trust } => {
            let trusted = match trusted_keys(trust, "admission") {
                Ok(t) => t,
                Err(e) => return fail(UNUSABLE, e),
            };
            let bytes = match read_limited(envelope, MAX_FILE) {
                Ok(b) => b,
                Err(e) => return fail(UNUSABLE, e),
            };
            match verify_plan(&bytes, &trusted, UtcTime::now(), CLOCK_SKEW) {
                Ok(v) => {
                    println!(
                        "plan {} verified: signed by {}, digest {}, valid {} .. {} (±{} s)",
                        v.plan.plan_id,
                        v.keyid,
                        v.digest,
                        v.plan.not_before,
                        v.plan.not_after,
                        CLOCK_SKEW.as_secs()
                    );
                    0
                }
                Err(e) => fail(
                    plan_refusal_status(&e),
                    format!("plan {} refused ({}): {e}", envelope.display(), e.reason()),
                ),
            }
        }
    }
}

/// The log to read: the one given, else the host's. A log that does not exist
/// is an error, not an empty log: a wrong `--log` or `MVM_DATA_DIR` must not
/// look like a host where nothing happened.
fn log_path(given: Option<&PathBuf>) -> Result<PathBuf, String> {
    let path = given
        .cloned()
        .map_or_else(|| audit::default_log_path().map_err(|e| e.to_string()), Ok)?;
    if !path.exists() {
        return Err(format!(
            "audit log {} does not exist: no run has been audited with this data directory \
             (MVM_DATA_DIR, else $XDG_DATA_HOME/mvm, else ~/.local/share/mvm), or --log names \
             the wrong file",
            path.display()
        ));
    }
    Ok(path)
}

/// Before the host's own log is shown or verified, the runs whose `mvm` died
/// are closed in it (`run_abandoned`), so what is read is what is true now. A
/// log named with `--log` (a copy, another host's) is only read. Without host
/// keys nothing can be appended, and nothing was admitted here either.
fn close_abandoned_runs(given: Option<&PathBuf>) {
    if given.is_some() {
        return;
    }
    let Ok(data) = crate::image::store::data_dir() else {
        return;
    };
    let Some(keys) = config_dir().ok().and_then(|dir| HostKeys::load(&dir).ok()) else {
        return;
    };
    let log = AuditLog::new(data.join(audit::AUDIT_FILE), keys.audit);
    crate::run::admit::report_abandoned(&log, &data);
}

/// `mvm audit`.
pub fn audit(command: &AuditCommand) -> i32 {
    match command {
        AuditCommand::Show(args) => {
            close_abandoned_runs(args.log.as_ref());
            let path = match log_path(args.log.as_ref()) {
                Ok(p) => p,
                Err(e) => return fail(FAILED, e),
            };
            let records = match audit::read_records(&path, args.vm.as_deref()) {
                Ok(r) => r,
                Err(e) => return fail(FAILED, e),
            };
            for record in records {
                if args.json {
                    match record.to_line() {
                        Ok(line) => println!("{}", String::from_utf8_lossy(&line)),
                        Err(e) => return fail(FAILED, e),
                    }
                } else {
                    // Reasons and details come from the VMM and, through it, the guest.
                    println!("{}", escape_controls(&record.to_string()));
                }
            }
            0
        }
        AuditCommand::Verify { log, trust } => {
            close_abandoned_runs(log.as_ref());
            let path = match log_path(log.as_ref()) {
                Ok(p) => p,
                Err(e) => return fail(FAILED, e),
            };
            let key_path = match trust {
                Some(p) => p.clone(),
                None => match config_dir() {
                    Ok(d) => d.join("audit.pub"),
                    Err(e) => return fail(UNUSABLE, e),
                },
            };
            let key = match read_limited(&key_path, MAX_FILE)
                .and_then(|b| String::from_utf8(b).map_err(|_| "not UTF-8 text".to_owned()))
                .and_then(|t| dsse::parse_public_key(&t).map_err(|e| e.to_string()))
            {
                Ok(k) => k,
                Err(e) => return fail(UNUSABLE, format!("{}: {e}", key_path.display())),
            };
            match audit::verify_log(&path, &key) {
                Ok(summary) => {
                    println!(
                        "audit log {} verified: {} records, last seq {}, last hash {}",
                        path.display(),
                        summary.records,
                        summary.last_seq,
                        summary.last_hash
                    );
                    0
                }
                Err(e) => fail(FAILED, e),
            }
        }
    }
}

/// `mvm receipt`.
pub fn receipt(command: &ReceiptCommand) -> i32 {
    let ReceiptCommand::Verify { file, trust } = command;
    let trusted = match trusted_keys(trust, "audit") {
        Ok(t) => t,
        Err(e) => return fail(UNUSABLE, e),
    };
    let bytes = match read_limited(file, MAX_FILE) {
        Ok(b) => b,
        Err(e) => return fail(UNUSABLE, e),
    };
    match verify_receipt(&bytes, &trusted) {
        Ok(r) => {
            let p = &r.statement.predicate;
            println!(
                "receipt {} verified: signed by {}, plan {} ({}), vm {}, exit status {}, \
                 command {}, stdout {} ({} bytes), audit seq {}..={}",
                file.display(),
                r.keyid,
                p.plan_id,
                r.plan_digest,
                p.vm_id,
                p.exit_status,
                p.command_sha256,
                p.stdout_sha256,
                p.stdout_bytes,
                p.audit.first_seq,
                p.audit.last_seq
            );
            0
        }
        Err(e) => fail(FAILED, format!("receipt {} refused: {e}", file.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_log_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("audit.jsonl");
        let e = log_path(Some(&missing)).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        assert!(e.contains(&missing.display().to_string()), "{e}");
        let show = AuditShowArgs {
            vm: None,
            json: false,
            log: Some(missing.clone()),
        };
        assert_eq!(audit(&AuditCommand::Show(show)), FAILED);
        std::fs::write(&missing, "").unwrap();
        assert_eq!(log_path(Some(&missing)).unwrap(), missing);
    }

    #[test]
    fn plan_refusals_keep_the_vmm_statuses() {
        let trusted = TrustedKeys::new();
        let e = verify_plan(b"{}", &trusted, UtcTime::now(), CLOCK_SKEW).unwrap_err();
        assert_eq!(e.reason(), "malformed_envelope");
        assert_eq!(plan_refusal_status(&e), 12);
    }
}
