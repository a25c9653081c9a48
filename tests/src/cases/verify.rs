//! `verify/*`: verified boot. Plans are built and signed here with the loader
//! library, on the clock of the machine the VMM runs on. Every tampered plan or artifact
//! must be refused before any guest code runs (no console output, no `vm_created` in the
//! boot report), with its reason on stderr, its own exit status and a `boot_refused`
//! event; a valid plan boots once and is refused as a replay the second time; a
//! verity-pinned ext4 root with one changed block boots, the guest gets an I/O error
//! for that block only, and the events file records the failure.

use std::ffi::OsString;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::SigningKey;
use mvm_loader::dsse::{format_public_key, Envelope};
use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::envelope::sign_plan;
use mvm_loader::plan::{
    Artifacts, Devices, GuestPolicy, PinnedDisk, Plan, Resources, Tier, UtcTime, PLAN_PAYLOAD_TYPE,
    SCHEMA_VERSION,
};
use mvm_loader::verity::{build_tree, BuildOptions, Salt};
use serde_json::Value;

use crate::case::{
    check, test_cmdline, Case, CaseResult, Context, Failure, INITRAMFS_TEST, KERNEL_ELF, VMM,
};
use crate::cases::blk::ROOT_IMAGE;
use crate::guest::blk::{
    ROOT_FILE, ROOT_FILE_TEXT, SAY_REREAD_CHANGED, SAY_REREAD_ERROR, SAY_REREAD_FIRST,
};
use crate::guest::{MARKER, MODE_PARAM};
use crate::vm::{VmLaunch, VmRun};

/// The verify cases.
pub const CASES: &[Case] = &[
    Case::kvm("verify/kernel-byte", kernel_byte),
    Case::kvm("verify/initramfs-byte", initramfs_byte),
    Case::kvm("verify/cmdline-char", cmdline_char),
    Case::kvm("verify/plan-edited", plan_edited),
    Case::kvm("verify/untrusted-key", untrusted_key),
    Case::kvm("verify/expired", expired),
    Case::kvm("verify/not-yet-valid", not_yet_valid),
    Case::kvm("verify/unknown-field", unknown_field),
    Case::kvm("verify/newer-schema", newer_schema),
    Case::kvm("verify/valid-boots-then-replay", valid_then_replay),
    Case::kvm("verify/verity-block", verity_block),
    Case::kvm("verify/verity-lease", verity_lease),
];

/// Exit statuses of `mvm-vmm` (vmm/src/verified_boot.rs; keep in step).
mod status {
    pub const UNTRUSTED_KEY: i32 = 10;
    pub const BAD_SIGNATURE: i32 = 11;
    pub const UNKNOWN_FIELD: i32 = 13;
    pub const NEWER_SCHEMA: i32 = 14;
    pub const EXPIRED: i32 = 15;
    pub const NOT_YET_VALID: i32 = 16;
    pub const REPLAY: i32 = 17;
    pub const KERNEL_MISMATCH: i32 = 20;
    pub const INITRAMFS_MISMATCH: i32 = 21;
    pub const CMDLINE_MISMATCH: i32 = 22;
}

const MODE: &str = "marker";

fn fail(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(format!("{what}: {e}"))
}

/// A fixed test key; `seed` tells admission's key from a stranger's.
fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// 32 bytes of hex that differ per call (time, pid and a counter through sha256).
fn fresh_nonce(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Sha256Digest::of(format!("{tag}/{now}/{}/{n}", std::process::id()).as_bytes()).to_hex()
}

/// What one verified launch uses: artifacts, the plan, and the files around it.
pub(crate) struct Setup {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    plan: Plan,
    trust: PathBuf,
    events: PathBuf,
    replay: PathBuf,
}

impl Setup {
    /// A plan pinning the test kernel, initramfs and the `marker` mode's command line,
    /// valid from a minute ago for ten minutes.
    fn new(ctx: &Context, tag: &str) -> Result<Self, Failure> {
        Self::for_mode(ctx, tag, MODE)
    }

    /// The same for the test guest's `mode` (`bench/boot` uses `reboot`).
    pub(crate) fn for_mode(ctx: &Context, tag: &str, mode: &str) -> Result<Self, Failure> {
        let kernel = ctx.artifact(KERNEL_ELF)?;
        let initrd = ctx.artifact(INITRAMFS_TEST)?;
        let cmdline = test_cmdline(mode);
        let digest = |p: &Path| {
            std::fs::read(p)
                .map(|b| Sha256Digest::of(&b))
                .map_err(|e| fail(&format!("read {}", p.display()), e))
        };
        let now = UtcTime::now();
        let plan = Plan {
            schema_version: SCHEMA_VERSION,
            plan_id: format!("e2e-{tag}"),
            not_before: now.saturating_sub(Duration::from_secs(60)),
            not_after: now.saturating_add(Duration::from_secs(600)),
            nonce: fresh_nonce(tag),
            artifacts: Artifacts {
                kernel: digest(&kernel)?,
                initramfs: Some(digest(&initrd)?),
                cmdline: Sha256Digest::of(cmdline.as_bytes()),
                disks: Vec::new(),
            },
            resources: Resources {
                vcpus: 1,
                memory_mib: 128,
                timeout_secs: 60,
            },
            devices: Devices {
                vsock: None,
                scratch_disks: Vec::new(),
                net: None,
            },
            guest: GuestPolicy {
                uid: 1000,
                gid: 1000,
                max_processes: 64,
                max_open_files: 256,
                max_file_size_mib: 64,
            },
            secrets: Vec::new(),
            substitution: None,
            required_tier: Tier::Emulated,
        };
        let trust = ctx.work_file("admission.pub");
        std::fs::write(&trust, format_public_key(&key(1).verifying_key()))
            .map_err(|e| fail("write admission.pub", e))?;
        Ok(Self {
            kernel,
            initrd: Some(initrd),
            cmdline,
            plan,
            trust,
            events: ctx.work_file("events.jsonl"),
            replay: ctx.work_file("replay-nonces"),
        })
    }

    /// Signs the plan with admission's key and writes the envelope.
    pub(crate) fn signed(&self, ctx: &Context) -> Result<PathBuf, Failure> {
        let signed = sign_plan(self.plan.clone(), &key(1)).map_err(|e| fail("sign plan", e))?;
        write_envelope(ctx, &signed.envelope)
    }

    /// The arguments that make `mvm-vmm` verify `envelope`: the plan, admission's key,
    /// the replay store and the events file.
    pub(crate) fn verify_args(&self, envelope: &Path) -> Vec<OsString> {
        vec![
            "--plan".into(),
            envelope.into(),
            "--trust".into(),
            self.trust.clone().into(),
            "--replay-store".into(),
            self.replay.clone().into(),
            "--events".into(),
            self.events.clone().into(),
        ]
    }

    fn launch(&self, ctx: &Context, envelope: &Path) -> Result<VmLaunch, Failure> {
        let mut launch = VmLaunch::new(ctx.artifact(VMM)?, self.kernel.clone(), &ctx.work)
            .cmdline(&self.cmdline)
            .with_boot_report();
        for arg in self.verify_args(envelope) {
            launch = launch.arg(arg);
        }
        if let Some(initrd) = &self.initrd {
            launch = launch.initrd(initrd.clone());
        }
        Ok(launch)
    }
}

fn write_envelope(ctx: &Context, envelope: &Envelope) -> Result<PathBuf, Failure> {
    let path = ctx.work_file("plan.dsse.json");
    std::fs::write(&path, envelope.to_json()).map_err(|e| fail("write envelope", e))?;
    Ok(path)
}

/// The events the VMM wrote.
fn events(path: &Path) -> Result<Vec<Value>, Failure> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| fail(&format!("event line {l:?}"), e)))
        .collect()
}

fn find_event<'a>(events: &'a [Value], kind: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e.get("event").and_then(Value::as_str) == Some(kind))
}

/// An event's field `name` (null when absent).
fn field<'a>(event: &'a Value, name: &str) -> &'a Value {
    event
        .get("fields")
        .and_then(|f| f.get(name))
        .unwrap_or(&Value::Null)
}

/// The run was refused before any guest code ran: `status`, `reason` on stderr and in
/// the events file, no console output, no VM in the boot report.
fn expect_refused(setup: &Setup, run: &VmRun, status: i32, reason: &str) -> CaseResult {
    run.expect_exit(status)?;
    run.expect_stderr_any(&[&format!("boot refused ({reason})")])?;
    check(run.console.is_empty(), || {
        format!("the guest console is not empty: {:?}", run.console)
    })
    .map_err(|f| run.fail(f.reason))?;
    let report = run.report()?;
    check(report.micros("vm_created").is_none(), || {
        "the boot report has vm_created: a VM was created".into()
    })
    .map_err(|f| run.fail(f.reason))?;
    check(report.exit_reason() == Some(reason), || {
        format!("boot report exit_reason {:?}", report.exit_reason())
    })
    .map_err(|f| run.fail(f.reason))?;
    let events = events(&setup.events)?;
    let refused = find_event(&events, "boot_refused")
        .ok_or_else(|| run.fail("no boot_refused event".to_string()))?;
    check(field(refused, "reason") == reason, || {
        format!("boot_refused event: {refused}")
    })
    .map_err(|f| run.fail(f.reason))?;
    check(find_event(&events, "boot_verified").is_none(), || {
        "a boot_verified event for a refused boot".into()
    })
}

/// A copy of `path` in the work directory with byte `at` (from the middle if `None`)
/// changed.
fn tampered_copy(ctx: &Context, path: &Path, name: &str) -> Result<PathBuf, Failure> {
    let mut bytes = std::fs::read(path).map_err(|e| fail("read", e))?;
    let at = bytes.len() / 2;
    let b = bytes
        .get_mut(at)
        .ok_or_else(|| Failure::new(format!("{} is empty", path.display())))?;
    *b ^= 0x01;
    let copy = ctx.work_file(name);
    std::fs::write(&copy, bytes).map_err(|e| fail("write copy", e))?;
    Ok(copy)
}

fn kernel_byte(ctx: &Context) -> CaseResult {
    let mut setup = Setup::new(ctx, "kernel-byte")?;
    let envelope = setup.signed(ctx)?;
    setup.kernel = tampered_copy(ctx, &setup.kernel, "vmlinux.tampered")?;
    let run = setup.launch(ctx, &envelope)?.run()?;
    expect_refused(&setup, &run, status::KERNEL_MISMATCH, "kernel_mismatch")?;
    run.expect_stderr_any(&[&format!(
        "kernel digest mismatch: plan {}",
        setup.plan.artifacts.kernel
    )])
}

fn initramfs_byte(ctx: &Context) -> CaseResult {
    let mut setup = Setup::new(ctx, "initramfs-byte")?;
    let envelope = setup.signed(ctx)?;
    let initrd = setup.initrd.clone().unwrap_or_default();
    setup.initrd = Some(tampered_copy(ctx, &initrd, "initramfs.tampered")?);
    let run = setup.launch(ctx, &envelope)?.run()?;
    expect_refused(
        &setup,
        &run,
        status::INITRAMFS_MISMATCH,
        "initramfs_mismatch",
    )?;
    run.expect_stderr_any(&["initramfs digest mismatch: plan sha256:"])
}

fn cmdline_char(ctx: &Context) -> CaseResult {
    let mut setup = Setup::new(ctx, "cmdline-char")?;
    let envelope = setup.signed(ctx)?;
    // `quiet` becomes `quiez`: one character.
    setup.cmdline = setup.cmdline.replacen("quiet", "quiez", 1);
    let run = setup.launch(ctx, &envelope)?.run()?;
    expect_refused(&setup, &run, status::CMDLINE_MISMATCH, "cmdline_mismatch")?;
    run.expect_stderr_any(&["cmdline digest mismatch: plan sha256:"])
}

fn plan_edited(ctx: &Context) -> CaseResult {
    let setup = Setup::new(ctx, "plan-edited")?;
    let signed = sign_plan(setup.plan.clone(), &key(1)).map_err(|e| fail("sign", e))?;
    // Edit the signed payload (the memory size), keep the signature.
    let mut env: Value =
        serde_json::from_slice(&signed.envelope.to_json()).map_err(|e| fail("envelope json", e))?;
    let payload = BASE64
        .decode(
            env.get("payload")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        )
        .map_err(|e| fail("payload base64", e))?;
    let text = String::from_utf8(payload).map_err(|e| fail("payload utf-8", e))?;
    let edited = text.replacen("\"memory_mib\":128", "\"memory_mib\":256", 1);
    check(edited != text, || {
        "the payload has no memory_mib to edit".into()
    })?;
    if let Some(obj) = env.as_object_mut() {
        obj.insert("payload".into(), Value::from(BASE64.encode(edited)));
    }
    let path = ctx.work_file("plan.dsse.json");
    std::fs::write(&path, env.to_string()).map_err(|e| fail("write", e))?;
    let run = setup.launch(ctx, &path)?.run()?;
    expect_refused(&setup, &run, status::BAD_SIGNATURE, "bad_signature")
}

fn untrusted_key(ctx: &Context) -> CaseResult {
    let setup = Setup::new(ctx, "untrusted-key")?;
    let signed = sign_plan(setup.plan.clone(), &key(2)).map_err(|e| fail("sign", e))?;
    let envelope = write_envelope(ctx, &signed.envelope)?;
    let run = setup.launch(ctx, &envelope)?.run()?;
    expect_refused(&setup, &run, status::UNTRUSTED_KEY, "untrusted_key")
}

fn expired(ctx: &Context) -> CaseResult {
    let mut setup = Setup::new(ctx, "expired")?;
    let now = UtcTime::now();
    setup.plan.not_before = now.saturating_sub(Duration::from_secs(7200));
    setup.plan.not_after = now.saturating_sub(Duration::from_secs(3600));
    let envelope = setup.signed(ctx)?;
    let run = setup.launch(ctx, &envelope)?.run()?;
    expect_refused(&setup, &run, status::EXPIRED, "expired")
}

fn not_yet_valid(ctx: &Context) -> CaseResult {
    let mut setup = Setup::new(ctx, "not-yet-valid")?;
    let now = UtcTime::now();
    setup.plan.not_before = now.saturating_add(Duration::from_secs(3600));
    setup.plan.not_after = now.saturating_add(Duration::from_secs(7200));
    let envelope = setup.signed(ctx)?;
    let run = setup.launch(ctx, &envelope)?.run()?;
    expect_refused(&setup, &run, status::NOT_YET_VALID, "not_yet_valid")
}

/// Signs a payload made by editing the plan's JSON (what `sign_plan` would refuse).
fn signed_raw(
    ctx: &Context,
    setup: &Setup,
    edit: impl FnOnce(&mut Value),
) -> Result<PathBuf, Failure> {
    let mut v = serde_json::to_value(&setup.plan).map_err(|e| fail("plan json", e))?;
    edit(&mut v);
    let payload = serde_json::to_vec(&v).map_err(|e| fail("plan json", e))?;
    write_envelope(ctx, &Envelope::sign(PLAN_PAYLOAD_TYPE, &payload, &key(1)))
}

fn unknown_field(ctx: &Context) -> CaseResult {
    let setup = Setup::new(ctx, "unknown-field")?;
    let envelope = signed_raw(ctx, &setup, |v| {
        if let Some(r) = v.get_mut("resources").and_then(Value::as_object_mut) {
            r.insert("gpus".into(), Value::from(1));
        }
    })?;
    let run = setup.launch(ctx, &envelope)?.run()?;
    expect_refused(&setup, &run, status::UNKNOWN_FIELD, "unknown_field")
}

fn newer_schema(ctx: &Context) -> CaseResult {
    let setup = Setup::new(ctx, "newer-schema")?;
    let envelope = signed_raw(ctx, &setup, |v| {
        if let Some(obj) = v.as_object_mut() {
            obj.insert("schema_version".into(), Value::from(SCHEMA_VERSION + 1));
            obj.insert("teleport".into(), Value::from(true));
        }
    })?;
    let run = setup.launch(ctx, &envelope)?.run()?;
    expect_refused(&setup, &run, status::NEWER_SCHEMA, "newer_schema")?;
    run.expect_stderr_any(&["newer than"])
}

/// A valid plan boots and prints the marker, with `boot_verified` naming every digest;
/// the same envelope a second time is a replay.
fn valid_then_replay(ctx: &Context) -> CaseResult {
    let setup = Setup::new(ctx, "valid")?;
    let envelope = setup.signed(ctx)?;
    let run = setup.launch(ctx, &envelope)?.label("first").run()?;
    run.expect_exit(0)?;
    run.expect_console(MARKER)?;
    let report = run.report()?;
    let (Some(verified), Some(measured), Some(created)) = (
        report.micros("plan_verified"),
        report.micros("artifacts_measured"),
        report.micros("vm_created"),
    ) else {
        return Err(run.fail("boot report lacks plan_verified, artifacts_measured or vm_created"));
    };
    check(verified <= measured && measured <= created, || {
        format!("phases out of order: plan_verified {verified}, artifacts_measured {measured}, vm_created {created}")
    })
    .map_err(|f| run.fail(f.reason))?;
    println!("    verify: plan_verified {verified} us, artifacts_measured {measured} us (+{} us), vm_created {created} us", measured - verified);
    let evs = events(&setup.events)?;
    let ok = find_event(&evs, "boot_verified").ok_or_else(|| run.fail("no boot_verified event"))?;
    let a = &setup.plan.artifacts;
    for (name, want) in [
        ("kernel", a.kernel.to_string()),
        (
            "initramfs",
            a.initramfs.map(|d| d.to_string()).unwrap_or_default(),
        ),
        ("cmdline", a.cmdline.to_string()),
    ] {
        check(field(ok, name) == want.as_str(), || {
            format!("boot_verified {name} is {}, want {want}", field(ok, name))
        })?;
    }
    check(find_event(&evs, "vm_exit").is_some(), || {
        "no vm_exit event".into()
    })?;
    std::fs::remove_file(&setup.events).map_err(|e| fail("remove events", e))?;

    let again = setup.launch(ctx, &envelope)?.label("replay").run()?;
    expect_refused(&setup, &again, status::REPLAY, "replay")
}

/// The 4096-byte block of `image` that holds the root file's text.
fn root_file_block(image: &[u8]) -> Option<u64> {
    let needle = format!("{ROOT_FILE_TEXT}\n");
    image
        .chunks(4096)
        .position(|block| block.starts_with(needle.as_bytes()))
        .and_then(|i| u64::try_from(i).ok())
}

/// A copy of the ext4 root image, its verity tree, and a signed plan pinning it
/// and booting from it in guest mode `mode`.
fn pinned_root(ctx: &Context, mode: &str) -> Result<(PathBuf, Setup, PathBuf), Failure> {
    let image = ctx.work_file("root.ext4");
    std::fs::copy(ctx.artifact(ROOT_IMAGE)?, &image).map_err(|e| fail("copy root image", e))?;
    let mut tree = image.clone().into_os_string();
    tree.push(".verity");
    let params = build_tree(
        &image,
        Path::new(&tree),
        &BuildOptions::new(Salt(vec![0x5a; 32])),
    )
    .map_err(|e| fail("build verity tree", e))?;
    let mut setup = Setup::new(ctx, "verity")?;
    setup.initrd = None;
    setup.cmdline = format!(
        "console=ttyS0 quiet panic=-1 reboot=k root=/dev/vda ro rootfstype=ext4 init=/init \
         {MODE_PARAM}={mode}"
    );
    setup.plan.artifacts.initramfs = None;
    setup.plan.artifacts.cmdline = Sha256Digest::of(setup.cmdline.as_bytes());
    setup.plan.artifacts.disks = vec![PinnedDisk {
        name: "root".into(),
        verity: params,
    }];
    let envelope = setup.signed(ctx)?;
    Ok((image, setup, envelope))
}

/// The lease case's `fs.lease-break-time`, and how long the writer waits at most.
const LEASE_BREAK_SECS: u64 = 2;

/// A verity-pinned root, leased by the VMM: the guest reads a file straight from
/// the disk again and again (each block hashed once, then trusted); a host process
/// then opens the image for writing and changes a byte of that file's block. Its
/// `open` breaks the lease first, so the guest's next read is hashed again and
/// fails: the guest never sees the changed bytes.
fn verity_lease(ctx: &Context) -> CaseResult {
    let (image, setup, envelope) = pinned_root(ctx, "blk-reread")?;
    let bytes = std::fs::read(&image).map_err(|e| fail("read image", e))?;
    let block = root_file_block(&bytes)
        .ok_or_else(|| Failure::new(format!("{ROOT_FILE} text not found at a block start")))?;
    // A writer is held back lease-break-time (45 s by default); shorter here.
    let sysctl = Path::new("/proc/sys/fs/lease-break-time");
    let saved = std::fs::read_to_string(sysctl).map_err(|e| fail("read lease-break-time", e))?;
    std::fs::write(sysctl, LEASE_BREAK_SECS.to_string())
        .map_err(|e| fail("set lease-break-time", e))?;
    let launch = setup
        .launch(ctx, &envelope)?
        .arg("--disk")
        .arg(format!("path={},ro", image.display()));
    let console = launch.console_path();
    let writer = std::thread::spawn(move || -> Result<Duration, String> {
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains(SAY_REREAD_FIRST)
        {
            if start.elapsed() > Duration::from_secs(240) {
                return Err("the guest never read the file".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let a few re-reads go by on trusted marks, then write.
        std::thread::sleep(Duration::from_secs(1));
        let opened = std::time::Instant::now();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .map_err(|e| format!("open the image for writing: {e}"))?;
        let held = opened.elapsed();
        file.write_all_at(b"J", block * 4096)
            .map_err(|e| format!("write the image: {e}"))?;
        file.sync_all()
            .map_err(|e| format!("sync the image: {e}"))?;
        Ok(held)
    });
    let run = launch.run();
    let _ = std::fs::write(sysctl, saved.trim());
    let run = run?;
    let held = writer
        .join()
        .map_err(|_| run.fail("the writer thread panicked"))?
        .map_err(|e| run.fail(e))?;
    run.expect_exit(0)?;
    run.expect_console(SAY_REREAD_FIRST)?;
    check(!run.console.contains(SAY_REREAD_CHANGED), || {
        "the guest read the bytes a host process wrote after the block verified".into()
    })
    .map_err(|f| run.fail(f.reason))?;
    run.expect_console(SAY_REREAD_ERROR)
        .map_err(|f| run.fail(format!("{} (the writer was held {held:?})", f.reason)))?;
    let evs = events(&setup.events)?;
    let mode = find_event(&evs, "disk_verification")
        .ok_or_else(|| run.fail("no disk_verification event"))?;
    check(field(mode, "mode") == "once_while_leased", || {
        format!("disk_verification event {mode}, expected mode once_while_leased")
    })
    .map_err(|f| run.fail(f.reason))?;
    let failure =
        find_event(&evs, "verity_failure").ok_or_else(|| run.fail("no verity_failure event"))?;
    check(field(failure, "block") == block, || {
        format!("verity_failure event {failure}, expected block {block}")
    })
    .map_err(|f| run.fail(f.reason))
}

/// An ext4 root pinned by dm-verity; after admission one byte of the block holding
/// `/etc/mvm-blk.txt` changes. The guest boots from that root (its init and every
/// other block read fine), reading the file fails with an I/O error, and the events
/// file names the block.
fn verity_block(ctx: &Context) -> CaseResult {
    let (image, setup, envelope) = pinned_root(ctx, "blk-root")?;

    // After admission: change one byte of the file's block.
    let bytes = std::fs::read(&image).map_err(|e| fail("read image", e))?;
    let block = root_file_block(&bytes)
        .ok_or_else(|| Failure::new(format!("{ROOT_FILE} text not found at a block start")))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .map_err(|e| fail("open image", e))?;
    file.write_all_at(b"J", block * 4096)
        .map_err(|e| fail("tamper", e))?;
    drop(file);

    let run = setup
        .launch(ctx, &envelope)?
        .arg("--disk")
        .arg(format!("path={},ro", image.display()))
        .run()?;
    run.expect_exit(0)?;
    run.expect_console(MARKER)?;
    run.expect_console("Input/output error")?;
    check(!run.console.contains(ROOT_FILE_TEXT), || {
        "the guest read the changed file".into()
    })
    .map_err(|f| run.fail(f.reason))?;
    let evs = events(&setup.events)?;
    let failure =
        find_event(&evs, "verity_failure").ok_or_else(|| run.fail("no verity_failure event"))?;
    check(
        field(failure, "block") == block && field(failure, "disk") == "root",
        || format!("verity_failure event {failure}, expected block {block} of disk root"),
    )
    .map_err(|f| run.fail(f.reason))?;
    // The image was leased (nobody had it open for writing at boot), so blocks
    // are hashed once and trusted while no host process can write it.
    let mode = find_event(&evs, "disk_verification")
        .ok_or_else(|| run.fail("no disk_verification event"))?;
    check(field(mode, "mode") == "once_while_leased", || {
        format!("disk_verification event {mode}, expected mode once_while_leased")
    })
    .map_err(|f| run.fail(f.reason))
}
