//! Running a command in a fresh microVM from a Rust program: the same admission, verified
//! boot, audit log and receipt as `mvm run`, which is written on the same code
//! ([`crate::run::execute`]).
//!
//! ```no_run
//! use mvm_runtime::sdk::Run;
//!
//! let out = Run::new(["sh", "-c", "echo hello from $(uname -r)"])
//!     .timeout_secs(60)
//!     .output()?;
//! assert_eq!(out.exit_code, 0);
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! # Ok::<(), mvm_runtime::backend::RunError>(())
//! ```
//!
//! What the host needs is what `mvm run` needs: the image in the data directory
//! (`scripts/setup` builds it), `mvm-vmm` (and, for the emulated tier, the static binaries)
//! where `mvm doctor` finds them, and the host's keys and policy in the config directory
//! (created on first use). A run is admitted against the policy like any other; its
//! records go to the same audit log. `cargo run -p mvm-runtime --example run -- CMD...`
//! runs one; `docs/sdk.md` says more.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use crate::backend::{OutputSink, RunError, RunOutcome, RunSpec, StdinMode, Tier, Timings};
use crate::run::execute::{execute, RunOptions};
use crate::run::{exit, RunRequest};
use crate::secrets::{Delivery, SecretRequest};

/// One command to run in a fresh microVM: build it, then [`Run::output`] or
/// [`Run::stream`].
pub struct Run {
    options: RunOptions,
    spec: RunSpec,
    stdin: Option<Box<dyn Read + Send>>,
}

/// What a finished run gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The exit code `mvm run` would exit with: the command's status, 128 + N for signal
    /// N, 124 on timeout.
    pub exit_code: i32,
    /// The command's own exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Whether the run's timeout stopped it.
    pub timed_out: bool,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
    /// The backend that ran it.
    pub tier: Tier,
    /// Boot, exec and stop times.
    pub timings: Timings,
}

/// An [`OutputSink`] that keeps what a run writes (also `mvm run --json`'s).
#[derive(Debug, Default)]
pub struct Collect {
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

impl OutputSink for Collect {
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stdout.extend_from_slice(data);
        Ok(())
    }

    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stderr.extend_from_slice(data);
        Ok(())
    }
}

impl Run {
    /// `command` (the program and its arguments) in the default image, 1 vCPU, 256 MiB,
    /// the best backend this host offers, admitted against the host's policy.
    pub fn new<I, S>(command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let argv: Vec<String> = command.into_iter().map(Into::into).collect();
        let image = crate::image::DEFAULT_IMAGE.to_owned();
        Self {
            options: RunOptions {
                backend: None,
                image: image.clone(),
                request: RunRequest {
                    image,
                    cpus: 1,
                    mem_mib: 256,
                    timeout_secs: None,
                    argv: argv.clone(),
                    secrets: Vec::new(),
                    substitutions: Vec::new(),
                    forwards: Vec::new(),
                    disks: Vec::new(),
                    scratch_disks: Vec::new(),
                },
                receipt: None,
                dev: false,
                net: crate::net::run::NetFlags::default(),
                forward_signals: false,
                cold: false,
                restore_plan: None,
            },
            spec: RunSpec {
                argv,
                env: BTreeMap::new(),
                workdir: None,
                cpus: 1,
                mem_mib: 256,
                timeout_secs: None,
                stdin: StdinMode::Null,
                disks: Vec::new(),
                ready_timeout_secs: 60,
                net: None,
                egress_trust: None,
            },
            stdin: None,
        }
    }

    /// The image: a name (`default`) or a digest (prefix).
    pub fn image(mut self, reference: impl Into<String>) -> Self {
        let reference = reference.into();
        self.options.image = reference.clone();
        self.options.request.image = reference;
        self
    }

    /// vCPUs (1 to the limit `mvm_loader::limits::MAX_VCPUS`).
    pub fn cpus(mut self, cpus: u8) -> Self {
        self.spec.cpus = cpus;
        self.options.request.cpus = cpus;
        self
    }

    /// Guest memory in MiB (at least 64).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.spec.mem_mib = mib;
        self.options.request.mem_mib = mib;
        self
    }

    /// An environment variable for the command.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.env.insert(key.into(), value.into());
        self
    }

    /// The command's working directory in the guest.
    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.spec.workdir = Some(dir.into());
        self
    }

    /// Stop the command and the VM after `secs` seconds (exit code 124); without it the
    /// policy's longest timeout applies.
    pub fn timeout_secs(mut self, secs: u64) -> Self {
        self.spec.timeout_secs = Some(secs);
        self.options.request.timeout_secs = Some(secs);
        self
    }

    /// How long to wait for the guest agent after the VM starts (default 60 s).
    pub fn ready_timeout_secs(mut self, secs: u64) -> Self {
        self.spec.ready_timeout_secs = secs;
        self
    }

    /// Give the command the stored secret `name` as `/run/secrets/NAME`
    /// (`docs/secrets.md`).
    pub fn secret(self, name: impl Into<String>) -> Self {
        self.with_secret(name.into(), Delivery::File)
    }

    /// Give the command the stored secret `name` as its environment variable `NAME`.
    pub fn secret_env(self, name: impl Into<String>) -> Self {
        self.with_secret(name.into(), Delivery::Env)
    }

    /// Give the command only `placeholder` for the stored secret `name` (as its
    /// environment variable `NAME`); the host's egress proxy puts the value in its
    /// place in the headers of HTTPS requests to `host` (port 443), and nowhere else.
    /// The VM gets a network device reaching `host` only (unless more is allowed), and
    /// the policy's `[secrets.hosts]` must bind the secret to `host`
    /// (`docs/secrets.md`).
    pub fn secret_for(
        mut self,
        name: impl Into<String>,
        placeholder: impl Into<String>,
        host: impl Into<String>,
    ) -> Self {
        let name = name.into();
        let host = host.into().to_ascii_lowercase();
        let bound = (host, crate::secrets::HTTPS_PORT);
        let request = &mut self.options.request;
        match request.substitutions.iter_mut().find(|s| s.name == name) {
            Some(s) => s.hosts.push(bound),
            None => request
                .substitutions
                .push(crate::secrets::SubstitutionRequest {
                    name,
                    placeholder: placeholder.into(),
                    hosts: vec![bound],
                }),
        }
        self
    }

    fn with_secret(mut self, name: String, delivery: Delivery) -> Self {
        self.options
            .request
            .secrets
            .push(SecretRequest { name, delivery });
        self
    }

    /// Use this backend instead of the best one detected.
    pub fn backend(mut self, tier: Tier) -> Self {
        self.options.backend = Some(tier);
        self
    }

    /// Write the run's signed receipt to `path` (`mvm receipt verify` checks it).
    pub fn receipt(mut self, path: impl Into<PathBuf>) -> Self {
        self.options.receipt = Some(path.into());
        self
    }

    /// Feed `source` to the command's stdin (it gets end-of-file without).
    pub fn stdin(mut self, source: impl Read + Send + 'static) -> Self {
        self.stdin = Some(Box::new(source));
        self.spec.stdin = StdinMode::Forward;
        self
    }

    /// Boot, even where a warm start from the image's snapshot is allowed (`mvm run
    /// --cold`).
    pub fn cold(mut self, cold: bool) -> Self {
        self.options.cold = cold;
        self
    }

    /// Development mode: no admission, nothing verified or audited (`mvm run --dev`).
    pub fn development(mut self, dev: bool) -> Self {
        self.options.dev = dev;
        self
    }

    /// Runs it, passing its output to `sink` as it arrives.
    pub fn stream(self, sink: &mut dyn OutputSink) -> Result<RunOutcome, RunError> {
        execute(&self.options, &self.spec, sink, self.stdin)
    }

    /// Runs it and collects its output. A run that failed before the command ended
    /// (denied, refused, no backend, ...) is an `Err`; a command that exited non-zero is an
    /// `Ok` with that status.
    pub fn output(self) -> Result<Output, RunError> {
        let mut collect = Collect::default();
        let outcome = self.stream(&mut collect)?;
        Ok(Output {
            exit_code: exit::for_status(&outcome.status),
            code: outcome.status.code,
            signal: outcome.status.signal,
            timed_out: outcome.status.timed_out,
            stdout: collect.stdout,
            stderr: collect.stderr,
            tier: outcome.tier,
            timings: outcome.timings,
        })
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("options", &self.options)
            .field("spec", &self.spec)
            .field("stdin", &self.stdin.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_sets_the_spec_and_what_admission_is_asked_alike() {
        let run = Run::new(["python3", "-V"])
            .image("python")
            .cpus(2)
            .memory_mib(512)
            .timeout_secs(30)
            .env("K", "V")
            .workdir("/tmp")
            .secret("TOKEN")
            .secret_env("KEY")
            .stdin(std::io::Cursor::new(b"in".to_vec()));
        assert_eq!(run.spec.argv, ["python3", "-V"]);
        assert_eq!(run.options.request.argv, ["python3", "-V"]);
        assert_eq!((run.spec.cpus, run.options.request.cpus), (2, 2));
        assert_eq!((run.spec.mem_mib, run.options.request.mem_mib), (512, 512));
        assert_eq!(run.spec.timeout_secs, Some(30));
        assert_eq!(run.options.request.timeout_secs, Some(30));
        assert_eq!(
            (
                run.options.image.as_str(),
                run.options.request.image.as_str()
            ),
            ("python", "python")
        );
        assert_eq!(run.spec.stdin, StdinMode::Forward);
        assert_eq!(run.options.request.secrets.len(), 2);
        assert!(!run.options.forward_signals && !run.options.dev);
    }
}
