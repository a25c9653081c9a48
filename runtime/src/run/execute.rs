//! One run from options to outcome: tier, resource limits, image, network, admission
//! (or development mode), launch on the backend, and the run's evidence. `mvm run`
//! (`crate::cli::run`) and the SDK ([`crate::sdk`]) are both written on [`execute`].

use std::io::Read;
use std::path::PathBuf;

use super::output_digest::{DigestSink, OutputDigests};
use super::{admit, RunRequest};
use crate::backend::detect::{judge, HostFacts};
#[cfg(target_os = "linux")]
use crate::backend::emulated;
use crate::backend::scratch::ScratchDir;
use crate::backend::warm::WarmSource;
use crate::backend::{
    interrupt, kvm, locate, resources, NoJournal, OutputSink, PlanFiles, RunArtifacts, RunError,
    RunJournal, RunOutcome, RunSpec, StdinMode, Tier, Workload,
};
use crate::image::manifest::ImageConfig;
use crate::image::{ImageStore, StoredImage};
use crate::terminal::escape_controls;
use mvm_loader::plan::UtcTime;

/// What a run is asked beyond its [`RunSpec`]: where, with which image, under
/// admission or not, with which evidence.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The backend; `None` takes the best one this host offers.
    pub backend: Option<Tier>,
    /// The image: a name or a digest (prefix).
    pub image: String,
    /// What admission is asked for (resources, timeout, command, secrets).
    pub request: RunRequest,
    /// Write a signed receipt here.
    pub receipt: Option<PathBuf>,
    /// Development mode: no admission, nothing verified or audited.
    pub dev: bool,
    /// The network asked for (`--net`, `--allow`, `--dns`).
    pub net: crate::net::run::NetFlags,
    /// Install the Ctrl-C / SIGTERM handler that passes signals to the workload (the
    /// CLI does; a program embedding mvm usually handles its own signals).
    pub forward_signals: bool,
    /// Boot, never a warm start from the image's snapshot (`mvm run --cold`).
    pub cold: bool,
    /// The VM is restored from a snapshot that this plan (kept beside it) booted:
    /// admission checks that plan and today's policy instead of signing a new one
    /// ([`admit::admit_restore`]).
    pub restore_plan: Option<PathBuf>,
}

/// Chooses the tier: the one asked for (refused at once when this build cannot run it
/// on this host: nothing is admitted for it), else the best one detected.
pub fn choose_tier(asked: Option<Tier>, facts: &HostFacts) -> Result<Tier, RunError> {
    if let Some(tier) = asked {
        if !tier.built_here() {
            return Err(RunError::NoBackend(match tier {
                Tier::Vz => "vz: Apple's Virtualization.framework, macOS hosts only".to_owned(),
                _ => format!("{tier}: built for Linux hosts only (on macOS: --backend vz)"),
            }));
        }
        return Ok(tier);
    }
    let detection = judge(facts);
    detection.chosen.ok_or_else(|| {
        let reasons: Vec<String> = detection
            .verdicts
            .iter()
            .map(|v| format!("{}: {}", v.tier, v.reason))
            .collect();
        RunError::NoBackend(reasons.join("; "))
    })
}

/// Admits the run (unless development mode), launches it, and appends its evidence:
/// the whole of `mvm run` and of [`crate::sdk::Run`] between the caller's options and
/// the workload's outcome. `stdin` feeds the workload when `spec.stdin` forwards it.
pub fn execute(
    options: &RunOptions,
    spec: &RunSpec,
    sink: &mut dyn OutputSink,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<RunOutcome, RunError> {
    execute_workload(options, spec, Workload::command(sink, stdin))
}

/// [`execute`] for any [`Workload`]: a sandbox's supervisor runs its session here,
/// admitted, launched and recorded as a run is.
pub fn execute_workload(
    options: &RunOptions,
    spec: &RunSpec,
    workload: Workload<'_>,
) -> Result<RunOutcome, RunError> {
    let facts = HostFacts::probe();
    let tier = choose_tier(options.backend, &facts)?;
    // Before admission, the image and any VM process: the VMM's own bounds and
    // the host's memory, whatever the flags.
    resources::check(tier, spec.cpus, spec.mem_mib)?;
    if options.dev {
        admit::check_dev_memory(spec.mem_mib)?;
    }
    let image = ImageStore::open_default()?.resolve(&options.image)?;
    if options.forward_signals {
        interrupt::install().map_err(RunError::io("installing the Ctrl-C handler"))?;
    }
    // netrt: --net: names pinned, the network reserved before admission so that the
    // plan pins it; the host network lives (and is torn down) with `net`.
    let mut net_flags = options.net.clone();
    super::substitute::bind_net(&options.request.substitutions, &mut net_flags)?;
    let mut net = crate::net::run::prepare(&net_flags, tier)?;
    let mut spec = spec.clone();
    spec.net = net.as_ref().map(|n| n.request.clone());
    let command = matches!(workload, Workload::Command { .. });
    apply_image_config(&mut spec, image.manifest.config.as_ref(), command);
    if command && spec.argv.is_empty() {
        return Err(RunError::Missing(format!(
            "no command: give one after `--` (image {} has no default command)",
            options.image
        )));
    }
    let spec = &spec;
    if options.dev {
        if options.receipt.is_some() {
            return Err(RunError::Missing(
                "--receipt needs an admitted run: drop --dev / MVM_DEV".into(),
            ));
        }
        if let Some(asked) = options.request.substitutions.first() {
            return Err(RunError::Missing(format!(
                "--secret {}={}: a secret is substituted only for a verified, measured boot, and development mode has none: drop --dev / MVM_DEV",
                asked.name, asked.placeholder
            )));
        }
        if let Some(asked) = options.request.secrets.first() {
            return Err(RunError::Missing(format!(
                "--secret {}: a secret is released only to a verified, measured boot, and development mode has none: drop --dev / MVM_DEV",
                asked.name
            )));
        }
        eprintln!(
            "mvm: WARNING: development mode (--dev / MVM_DEV=1): no admission, no signed plan, NOTHING IS VERIFIED OR AUDITED"
        );
        let mut spec = spec.clone();
        let mut disks = options.request.disk_args(&image);
        disks.append(&mut spec.disks);
        spec.disks = disks;
        return launch(
            tier,
            &facts,
            &spec,
            &image,
            None,
            &mut NoJournal,
            workload,
            false,
        );
    }
    // `--disk`: each pinned in the plan (a read-only one by a dm-verity tree made now,
    // in `trees`, which lives as long as the run; a writable one by its size).
    let trees = ScratchDir::create().map_err(RunError::io("creating the disk directory"))?;
    let mut request = options.request.clone();
    if command {
        request.argv.clone_from(&spec.argv);
    }
    super::disks::pin_user_disks(&spec.disks, trees.path(), &mut request)?;
    // The image's root disk and the request's pinned and scratch disks, in the
    // plan's order.
    let mut spec = spec.clone();
    spec.disks = request.disk_args(&image);
    let spec = &spec;
    let mut admitted = match &options.restore_plan {
        Some(stored) => admit::admit_restore(&request, &image, tier, stored)?,
        None => admit::admit_run(&request, &image, tier, net.as_mut())?,
    };
    // The plan's timeout is the workload's (the policy's longest without --timeout).
    let mut spec = spec.clone();
    spec.timeout_secs = Some(u64::from(admitted.signed.plan.resources.timeout_secs));
    // Substituted secrets: the workload sees each placeholder as the variable of the
    // secret's name, and the guest trusts the run's CA (written in by the backend).
    if let Some((trust, placeholders)) = admitted.substitution_for_guest() {
        spec.env
            .extend(crate::secrets::guest_trust::workload_env(&placeholders));
        spec.egress_trust = Some(trust);
    }
    let mut digests = None;
    let workload = match workload {
        Workload::Command { sink, stdin } => {
            Workload::command(digests.insert(DigestSink::new(sink)), stdin)
        }
        Workload::Session(server) => Workload::Session(server),
    };
    let started = UtcTime::now();
    // `admitted` writes the run's records ahead, as the backend reaches them.
    let files = admitted.files.clone();
    // A warm start where the policy allows it and the caller did not ask for a boot, nor
    // for a receipt (whose measurements are a boot's).
    let warm = !options.cold
        && options.receipt.is_none()
        && crate::admission::keys::config_dir()
            .ok()
            .and_then(|c| crate::admission::policy::Policy::load_or_default(&c).ok())
            .is_some_and(|p| p.snapshots.warm_start);
    let result = launch(
        tier,
        &facts,
        &spec,
        &image,
        Some(&files),
        &mut admitted,
        workload,
        warm,
    );
    let finished = UtcTime::now();
    let output = digests.map_or_else(OutputDigests::empty, |d| d.digests());
    let plan_id = admitted.plan_id().to_owned();
    let vm_id = admitted.vm_id.clone();
    let finishing = std::time::Instant::now();
    let result = result.map(|mut outcome| {
        outcome.plan_id = Some(plan_id.clone());
        outcome
    });
    match admitted.finish(
        &spec.argv,
        &result,
        output,
        (started, finished),
        options.receipt.as_deref(),
    ) {
        Ok(evidence) => tracing::info!(
            plan = %plan_id,
            vm = %vm_id,
            first_seq = evidence.audit.first_seq,
            last_seq = evidence.audit.last_seq,
            audit_us = u64::try_from(finishing.elapsed().as_micros()).unwrap_or(u64::MAX),
            "run audited"
        ),
        // The workload ran but its evidence is incomplete: that is a failure.
        Err(e) if result.is_ok() => return Err(RunError::Missing(format!("evidence: {e}"))),
        Err(e) => eprintln!("mvm: {}", escape_controls(&e)),
    }
    result
}

/// The image's workload defaults (from its spec, or an imported image's config) under
/// what the caller asked for: its environment where the caller set no value, its
/// working directory when the caller named none, and (for a command, not a sandbox's
/// session) its command: the entrypoint, then the caller's arguments or else the
/// image's `cmd`, as a container runtime composes them.
fn apply_image_config(spec: &mut RunSpec, config: Option<&ImageConfig>, command: bool) {
    let Some(config) = config else {
        return;
    };
    for (key, value) in &config.env {
        spec.env.entry(key.clone()).or_insert_with(|| value.clone());
    }
    if spec.workdir.is_none() {
        spec.workdir.clone_from(&config.workdir);
    }
    if command {
        let args = if spec.argv.is_empty() {
            config.cmd.clone()
        } else {
            std::mem::take(&mut spec.argv)
        };
        spec.argv = config.entrypoint.iter().cloned().chain(args).collect();
    }
}

/// Starts the run on `tier`, verified against `plan` when given; `warm`: a warm start
/// is allowed.
#[allow(clippy::too_many_arguments)]
fn launch(
    tier: Tier,
    facts: &HostFacts,
    spec: &RunSpec,
    image: &StoredImage,
    plan: Option<&PlanFiles>,
    journal: &mut dyn RunJournal,
    workload: Workload<'_>,
    warm: bool,
) -> Result<RunOutcome, RunError> {
    let workload = match workload {
        Workload::Command { sink, stdin } => Workload::command(
            sink,
            match spec.stdin {
                StdinMode::Forward => stdin,
                StdinMode::Null => None,
            },
        ),
        Workload::Session(server) => Workload::Session(server),
    };
    match tier {
        Tier::Vz if cfg!(not(target_os = "macos")) => Err(RunError::NoBackend(
            "vz: Apple's Virtualization.framework, macOS hosts only".into(),
        )),
        Tier::Vz => {
            eprintln!(
                "mvm: warning: backend 'vz': Apple's hypervisor boots files mvm measured before hand-off; no per-block disk checks, no jail of mvm's; this backend has not been run on a Mac by mvm's tests"
            );
            crate::backend::vz::run(spec, image, plan, journal, workload)
        }
        Tier::Kvm if cfg!(not(target_os = "linux")) => Err(RunError::NoBackend(
            "kvm: built for Linux hosts only".into(),
        )),
        Tier::Kvm => {
            let artifacts = RunArtifacts {
                image: image.clone(),
                vmm: locate::vmm_binary()?,
                warm: if warm {
                    WarmSource::Store
                } else {
                    WarmSource::Off
                },
            };
            kvm::run_verified(spec, &artifacts, plan, journal, workload)
        }
        #[cfg(not(target_os = "linux"))]
        Tier::Emulated => {
            let _ = facts;
            Err(RunError::NoBackend(
                "emulated: built for Linux hosts only".into(),
            ))
        }
        #[cfg(target_os = "linux")]
        Tier::Emulated => {
            let qemu = facts.qemu.clone().ok_or_else(|| {
                RunError::NoBackend(
                    "emulated: qemu-system-x86_64 not found (install qemu-system-x86, or set MVM_QEMU)"
                        .into(),
                )
            })?;
            eprintln!(
                "mvm: warning: backend 'emulated': no hardware KVM here, so mvm-vmm runs inside a QEMU-TCG test host (slow; the outer wall is QEMU's emulator)"
            );
            emulated::run(spec, image, &qemu, plan, journal, workload, warm)
        }
        #[cfg(not(target_os = "linux"))]
        Tier::Container => Err(RunError::NoBackend(
            "container: built for Linux hosts only".into(),
        )),
        #[cfg(target_os = "linux")]
        Tier::Container => {
            eprintln!(
                "mvm: warning: backend 'container': NO VM; the workload shares this host's kernel behind namespaces and a seccomp filter only"
            );
            crate::backend::container::run(spec, image, plan, journal, workload)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::exit;

    #[test]
    fn the_tier_asked_for_wins_and_none_usable_is_an_error() {
        let none = HostFacts::default();
        assert_eq!(choose_tier(Some(Tier::Kvm), &none).unwrap(), Tier::Kvm);
        let vz = choose_tier(Some(Tier::Vz), &none);
        assert_eq!(vz.is_ok(), cfg!(target_os = "macos"), "{vz:?}");
        let err = choose_tier(None, &none).unwrap_err();
        assert_eq!(exit::for_error(&err), exit::NO_BACKEND);
        assert!(err.to_string().contains("kvm:"), "{err}");
        let qemu_only = HostFacts {
            qemu: Some(PathBuf::from("/usr/bin/qemu-system-x86_64")),
            kvm_modules: vec!["kvm_pvm".into()],
            dev_kvm: true,
            dev_kvm_rw: true,
            ..HostFacts::default()
        };
        assert_eq!(choose_tier(None, &qemu_only).unwrap(), Tier::Emulated);
    }

    fn spec(argv: &[&str]) -> RunSpec {
        RunSpec {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: [("A".to_owned(), "mine".to_owned())].into(),
            workdir: None,
            cpus: 1,
            mem_mib: 128,
            timeout_secs: None,
            stdin: StdinMode::Null,
            disks: Vec::new(),
            ready_timeout_secs: 10,
            net: None,
            egress_trust: None,
        }
    }

    #[test]
    fn the_image_config_fills_in_as_a_container_runtime_would() {
        let config = ImageConfig {
            env: [("A".into(), "image".into()), ("B".into(), "image".into())].into(),
            workdir: Some("/data".into()),
            cmd: vec!["echo hi".into()],
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            user: Some("1001:1002".into()),
            nix: None,
            kind: crate::image::manifest::ImageKind::Workload,
        };
        // No command: entrypoint + cmd; the caller's env wins, the image's fills in.
        let mut s = spec(&[]);
        apply_image_config(&mut s, Some(&config), true);
        assert_eq!(s.argv, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(s.env.get("A").map(String::as_str), Some("mine"));
        assert_eq!(s.env.get("B").map(String::as_str), Some("image"));
        assert_eq!(s.workdir.as_deref(), Some("/data"));
        // A command replaces cmd, after the entrypoint.
        let mut s = spec(&["echo other"]);
        apply_image_config(&mut s, Some(&config), true);
        assert_eq!(s.argv, ["/bin/sh", "-c", "echo other"]);
        // No entrypoint: the command alone, or cmd.
        let plain = ImageConfig {
            entrypoint: Vec::new(),
            ..config.clone()
        };
        let mut s = spec(&["ls"]);
        apply_image_config(&mut s, Some(&plain), true);
        assert_eq!(s.argv, ["ls"]);
        // A sandbox's session takes no command from the image.
        let mut s = spec(&[]);
        apply_image_config(&mut s, Some(&config), false);
        assert!(s.argv.is_empty());
        // No config: nothing changes.
        let mut s = spec(&[]);
        apply_image_config(&mut s, None, true);
        assert!(s.argv.is_empty());
    }
}
