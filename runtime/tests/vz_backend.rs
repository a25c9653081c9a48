//! The `vz` backend's whole run on Linux, against a stand-in for `vfkit`: this test
//! binary, re-executed with `MVM_FAKE_VFKIT`, answers `--version`, checks and records
//! the command line it was given, serves vfkit's REST state on `--restful-uri`, and
//! hands each connection to its `virtio-vsock,...,connect` socket to a real, in-process
//! `mvm-agent`. So the runtime's side runs for real (admission of a delegated plan, the
//! checks and the measured hand-off, vfkit's version, its start, the REST state, the
//! agent, exec, stop, the audit records); Apple's hypervisor and a guest are what is
//! missing. Nothing here says the backend works on a Mac.
//!
//! A custom harness (`harness = false`), as `kvm_backend`'s.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mvm_agent::agent::{Agent, Policy, PowerAction};
use mvm_runtime::backend::{vz, NoJournal, RunError, Tier, Workload};
use mvm_runtime::run::admit::admit_run_in;
use mvm_runtime::run::RunRequest;
use mvm_runtime::sdk::Collect;

/// The stand-in's role: `vfkit` (serve), `old` (report version 0.1.0), `error` (the
/// VM's state is `Error`).
const ROLE: &str = "MVM_FAKE_VFKIT";
/// Where the stand-in writes the arguments it was started with (one per line).
const ARGS_LOG: &str = "MVM_FAKE_VFKIT_ARGS";

fn value_of<'a>(args: &'a [String], option: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == option)
        .map(|w| w[1].as_str())
        .collect()
}

/// Answers one REST request per connection: the state, or a state change (a `Stop`
/// or `HardStop` ends the process, as vfkit ends once its VM stopped).
fn serve_rest(listener: UnixListener, state: &'static str) {
    for stream in listener.incoming() {
        let mut stream = stream.unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        if first.starts_with("GET /vm/state ") {
            let json = format!("{{\"state\":\"VirtualMachineState{state}\"}}");
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
                json.len()
            )
            .unwrap();
        } else if first.starts_with("POST /vm/state ") {
            stream
                .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            drop(stream);
            std::process::exit(0);
        } else {
            stream
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        }
    }
}

fn fake_vfkit(role: &str) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args == ["--version"] {
        println!(
            "vfkit version: {}",
            if role == "old" { "v0.1.0" } else { "v0.6.1" }
        );
        std::process::exit(0);
    }
    if let Some(log) = std::env::var_os(ARGS_LOG) {
        // What it was given, and what the kernel it was given is, as it starts.
        let bootloader = value_of(&args, "--bootloader")[0];
        let kernel = bootloader
            .split(',')
            .find_map(|kv| kv.strip_prefix("kernel="))
            .expect("kernel=");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            std::fs::read(kernel).unwrap(),
        ));
        let mut lines = args.clone();
        lines.push(format!(
            "# kernel {:o} dir {:o} sha256 {digest}",
            mode(Path::new(kernel)),
            mode(Path::new(kernel).parent().unwrap())
        ));
        std::fs::write(log, lines.join("\n")).unwrap();
    }
    let rest = value_of(&args, "--restful-uri")[0]
        .strip_prefix("unix://")
        .expect("unix://");
    let devices = value_of(&args, "--device");
    let vsock = devices
        .iter()
        .find(|d| d.starts_with("virtio-vsock,"))
        .expect("a virtio-vsock device");
    assert!(vsock.ends_with(",connect"), "{vsock}");
    let socket = vsock
        .split(',')
        .find_map(|kv| kv.strip_prefix("socketURL="))
        .expect("socketURL=");
    let agent_listener = UnixListener::bind(socket).unwrap();
    let rest_listener = UnixListener::bind(rest).unwrap();
    let state = if role == "error" { "Error" } else { "Running" };
    std::thread::spawn(move || serve_rest(rest_listener, state));
    let agent = Agent::new(Policy::default(), false, PowerAction::ExitProcess).expect("agent");
    let result =
        agent.serve_forever(|| Ok::<UnixStream, std::io::Error>(agent_listener.accept()?.0));
    std::process::exit(i32::from(result.is_err()));
}

struct Env {
    s: common::Setup,
    config: PathBuf,
    data: PathBuf,
    args_log: PathBuf,
}

fn request() -> RunRequest {
    RunRequest {
        image: "default".into(),
        cpus: 1,
        mem_mib: 128,
        timeout_secs: None,
        argv: ["sh", "-c", "echo from vz; exit 3"]
            .map(String::from)
            .to_vec(),
        secrets: Vec::new(),
        substitutions: Vec::new(),
        forwards: Vec::new(),
        disks: Vec::new(),
        scratch_disks: Vec::new(),
    }
}

fn started_with(env: &Env) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(&env.args_log).ok()?;
    Some(text.lines().map(str::to_owned).collect())
}

/// A delegated plan admitted for the image, run: the stand-in got only read-only,
/// measured copies in the run's private directory; the workload's output and status
/// came back; `boot_verified` names the vz tier; vfkit ended.
fn an_admitted_run_hands_over_measured_copies(env: &Env) {
    let _ = std::fs::remove_file(&env.args_log);
    let image = &env.s.artifacts.image;
    let mut admitted =
        admit_run_in(&env.config, &env.data, &request(), image, Tier::Vz, None).unwrap();
    assert!(admitted.signed.plan.required_tier <= mvm_loader::plan::Tier::Delegated);
    let files = admitted.files.clone();
    let mut out = Collect::default();
    let outcome = vz::run(
        &common::spec(&["sh", "-c", "echo from vz; exit 3"]),
        image,
        Some(&files),
        &mut admitted,
        Workload::command(&mut out, None),
    )
    .unwrap();
    assert_eq!(outcome.status.code, Some(3));
    assert_eq!(out.stdout, b"from vz\n");
    assert_eq!(outcome.tier, Tier::Vz);
    let args = started_with(env).expect("vfkit was started");
    let bootloader = value_of(&args, "--bootloader")[0].to_owned();
    let kernel = bootloader
        .split(',')
        .find_map(|kv| kv.strip_prefix("kernel="))
        .unwrap();
    assert!(kernel.ends_with("/boot/kernel"), "{bootloader}");
    assert!(
        !Path::new(kernel).exists(),
        "the run's private copies are gone with the run"
    );
    assert!(bootloader.contains(&format!("cmdline=\"{}\"", image.manifest.cmdline)));
    // As vfkit started: the kernel a read-only copy in a directory closed to writes,
    // with the image's bytes.
    let image_digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(image.kernel_path()).unwrap(),
    ));
    assert_eq!(
        args.last().unwrap(),
        &format!("# kernel 400 dir 500 sha256 {image_digest}")
    );
    let events = std::fs::read_to_string(&files.events).unwrap();
    assert!(events.contains("\"boot_verified\""), "{events}");
    assert!(events.contains("\"tier\":\"vz\""), "{events}");
}

/// A kernel changed after admission: refused before vfkit starts, `boot_refused`
/// with the measurement named; and a plan used twice: its nonce refuses the second.
fn tampering_and_replay_are_refused_before_vfkit_starts(env: &Env) {
    let image = &env.s.artifacts.image;
    let mut admitted =
        admit_run_in(&env.config, &env.data, &request(), image, Tier::Vz, None).unwrap();
    let files = admitted.files.clone();
    let kernel = image.kernel_path();
    let original = std::fs::read(&kernel).unwrap();
    let mut changed = original.clone();
    *changed.last_mut().unwrap() ^= 1;
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&kernel, &changed).unwrap();
    let _ = std::fs::remove_file(&env.args_log);
    let err = run_true(image, Some(&files), &mut admitted).unwrap_err();
    std::fs::write(&kernel, &original).unwrap();
    assert!(
        matches!(&err, RunError::BootRefused { reason, .. } if reason == "measurement"),
        "{err}"
    );
    assert!(started_with(env).is_none(), "vfkit must not have started");
    let events = std::fs::read_to_string(&files.events).unwrap();
    assert!(
        events.contains("\"boot_refused\"") && events.contains("the kernel"),
        "{events}"
    );

    // The same plan again (its nonce was spent by the refused run's check).
    let err = run_true(image, Some(&files), &mut admitted).unwrap_err();
    assert!(
        matches!(&err, RunError::BootRefused { reason, .. } if reason == "replay"),
        "{err}"
    );
    assert!(started_with(env).is_none());

    // A plan that requires the hardware tier is not run by the delegated one.
    let policy = env.config.join("policy.toml");
    std::fs::write(&policy, "[tier]\nminimum = \"hardware\"\n").unwrap();
    let admitted = admit_run_in(&env.config, &env.data, &request(), image, Tier::Kvm, None);
    std::fs::remove_file(&policy).unwrap();
    let mut hardware = admitted.unwrap();
    let files = hardware.files.clone();
    let err = run_true(image, Some(&files), &mut hardware).unwrap_err();
    assert!(
        matches!(&err, RunError::BootRefused { reason, .. } if reason == "tier"),
        "{err}"
    );
}

/// An old vfkit and a VM in the `Error` state are errors that name them.
fn an_old_vfkit_or_a_failed_vm_is_named(env: &Env) {
    let image = &env.s.artifacts.image;
    std::env::set_var(ROLE, "old");
    let err = run_true(image, None, &mut NoJournal).unwrap_err();
    assert!(
        matches!(&err, RunError::NoBackend(m) if m.contains("0.1.0") && m.contains("0.5.0")),
        "{err}"
    );
    std::env::set_var(ROLE, "error");
    let err = run_true(image, None, &mut NoJournal).unwrap_err();
    assert!(
        matches!(&err, RunError::VmmDied { reason, .. } if reason.contains("Virtualization.framework")),
        "{err}"
    );
    std::env::set_var(ROLE, "vfkit");
    std::env::set_var(vz::vfkit::VFKIT_ENV, env.s.dir.path().join("no-such-vfkit"));
    let err = run_true(image, None, &mut NoJournal).unwrap_err();
    assert!(
        matches!(&err, RunError::NoBackend(m) if m.contains("vfkit not found")),
        "{err}"
    );
    std::env::set_var(vz::vfkit::VFKIT_ENV, std::env::current_exe().unwrap());
}

/// `vz::run` of `true`, its output dropped.
fn run_true(
    image: &mvm_runtime::image::StoredImage,
    plan: Option<&mvm_runtime::backend::PlanFiles>,
    journal: &mut dyn mvm_runtime::backend::RunJournal,
) -> Result<mvm_runtime::backend::RunOutcome, RunError> {
    vz::run(
        &common::spec(&["true"]),
        image,
        plan,
        journal,
        Workload::command(&mut Collect::default(), None),
    )
}

type Case = fn(&Env);

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        fake_vfkit(&role);
    }
    let s = common::setup();
    std::env::set_var("MVM_RUN_DIR", &s.run_dir);
    let config = s.dir.path().join("config");
    let data = s.dir.path().join("data");
    let args_log = s.dir.path().join("vfkit-args");
    std::env::set_var(ROLE, "vfkit");
    std::env::set_var(ARGS_LOG, &args_log);
    std::env::set_var(vz::vfkit::VFKIT_ENV, std::env::current_exe().unwrap());
    let env = Env {
        s,
        config,
        data,
        args_log,
    };
    let cases: [(&str, Case); 3] = [
        (
            "an_admitted_run_hands_over_measured_copies",
            an_admitted_run_hands_over_measured_copies,
        ),
        (
            "tampering_and_replay_are_refused_before_vfkit_starts",
            tampering_and_replay_are_refused_before_vfkit_starts,
        ),
        (
            "an_old_vfkit_or_a_failed_vm_is_named",
            an_old_vfkit_or_a_failed_vm_is_named,
        ),
    ];
    for (name, case) in cases {
        let start = Instant::now();
        case(&env);
        common::assert_clean(&env.s.run_dir);
        println!("test {name} ... ok ({:?})", start.elapsed());
    }
    println!(
        "test result: ok. {} passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
        cases.len()
    );
}
