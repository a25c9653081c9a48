//! What the custom-harness tests of the `kvm` backend share: this test binary
//! also plays `mvm-vmm` (when `MVM_FAKE_VMM` is set), serving the hybrid-vsock
//! handshake on the `--vsock` socket and handing each connection to a real,
//! in-process `mvm-agent`; a stored image whose kernel is a stub.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    dead_code
)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use mvm_agent::agent::{Agent, Policy, PowerAction};
use mvm_runtime::backend::{RunArtifacts, RunSpec, StdinMode};
use mvm_runtime::image::{build, BuildInputs, ImageStore};

/// What the fake VMM does: `agent` (serve), `die` (exit 3 at once), `mute`
/// (accept and close every connection: the guest never listens).
pub const ROLE: &str = "MVM_FAKE_VMM";

pub fn fake_vmm(role: &str) -> ! {
    if role == "die" {
        eprintln!("kvm: fake failure");
        std::process::exit(3);
    }
    let args: Vec<String> = std::env::args().collect();
    let vsock = args
        .iter()
        .position(|a| a == "--vsock")
        .and_then(|i| args.get(i + 1))
        .expect("--vsock");
    let uds = vsock.split("uds=").nth(1).expect("uds=");
    let listener = UnixListener::bind(uds).expect("bind");
    if role == "mute" {
        for stream in listener.incoming() {
            drop(stream);
        }
        std::process::exit(0);
    }
    let agent = Agent::new(Policy::default(), false, PowerAction::ExitProcess).expect("agent");
    let result = agent.serve_forever(|| loop {
        let (mut stream, _) = listener.accept()?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        if line.starts_with(b"CONNECT ") {
            stream.write_all(b"OK 1\n")?;
            return Ok::<UnixStream, std::io::Error>(stream);
        }
    });
    std::process::exit(i32::from(result.is_err()));
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub run_dir: PathBuf,
    pub artifacts: RunArtifacts,
}

pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let busybox = PathBuf::from("/bin/busybox");
    assert!(
        busybox.exists(),
        "needs Debian's busybox-static (scripts/setup installs it)"
    );
    let kernel = dir.path().join("vmlinux");
    let mut k = b"\x7fELF\x02\x01\x01".to_vec();
    k.resize(4096, 0);
    // e_machine: x86_64 (the vz backend checks the kernel's format before hand-off).
    k[18] = 62;
    std::fs::write(&kernel, k).unwrap();
    let inputs = BuildInputs {
        kernel,
        agent: busybox.clone(),
        busybox,
        cmdline: None,
    };
    let store = ImageStore::at(&dir.path().join("data"));
    let image = store.put("default", &build(&inputs).unwrap()).unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    // Workloads run as an unprivileged uid: let them into the temp tree.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Setup {
        artifacts: RunArtifacts {
            image,
            vmm: std::env::current_exe().unwrap(),
            warm: mvm_runtime::backend::warm::WarmSource::Off,
        },
        run_dir,
        dir,
    }
}

pub fn spec(argv: &[&str]) -> RunSpec {
    RunSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: Default::default(),
        workdir: None,
        cpus: 1,
        mem_mib: 128,
        timeout_secs: None,
        stdin: StdinMode::Null,
        disks: vec![],
        ready_timeout_secs: 10,
        net: None,
        egress_trust: None,
    }
}

pub fn set_role(role: &str) {
    // The runner is single-threaded when it sets this; children inherit it.
    std::env::set_var(ROLE, role);
}

pub fn assert_clean(run_dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(run_dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "run directories left: {left:?}");
}
