//! Launching QEMU: the test host machine's command line, the process
//! (killed with its parent), and accepting its serial ports' connections.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::protocol::{PORT_CTL, PORT_ERR, PORT_IN, PORT_OUT};
use crate::backend::interrupt;
use crate::backend::{RunError, RunSpec};

/// The test host's memory beyond what the inner VM gets: its own kernel, the
/// initramfs (which holds the image and binaries) and the VMM.
const TESTHOST_OVERHEAD_MIB: u32 = 768;
/// The least memory the test host gets.
const TESTHOST_MIN_MIB: u32 = 1024;

/// The test host machine as QEMU arguments: q35 with TCG's `max` CPU (it emulates
/// AMD SVM with nested paging, so the test host has a real KVM) without ERMS
/// ([`TESTHOST_CPU`]), one vCPU, no default devices or graphics, and a guest reboot
/// ends QEMU. `scripts/e2e` boots the same machine (`mvm __testhost-machine` prints
/// these).
pub const TESTHOST_MACHINE: [&str; 11] = [
    "-M",
    "q35",
    "-cpu",
    TESTHOST_CPU,
    "-accel",
    "tcg",
    "-smp",
    "1",
    "-nographic",
    "-no-reboot",
    "-nodefaults",
];

/// The test host's CPU: TCG's `max` with ERMS (enhanced `rep movsb`/`rep stosb`) off.
///
/// With ERMS the test host kernel (and, through KVM, the inner guest) zeroes and copies
/// pages with `rep stosb`/`rep movsb`: one store per byte. TCG runs each store of a
/// page that still holds translated code through its slow path, which checks the
/// page's translations every time; the first zeroing of a huge page that had held the
/// last VM's kernel took 0.4-1.5 s there, once or twice per boot, whichever VMM's
/// fault it happened to be (`docs/boot-time.md`, "The stall, found"). Without ERMS the
/// kernels use `rep stosq`/`rep movsq` (eight bytes a store): the same fault takes
/// about 0.2 s, and the bench's boots were 20-40 % shorter under every VMM.
pub const TESTHOST_CPU: &str = "max,erms=off";

/// The test host kernel's command line, as `mvm run` boots it: the console on
/// the first serial port, quiet, a panic ends QEMU at once, and `idle=poll`.
///
/// `idle=poll`: the test host's idle loop spins instead of halting. QEMU 7.2's TCG
/// (Debian 12's) stalls for good, now and then, with the test host's CPU halted in
/// that loop and its timer interrupt never taken; without the halt it has not stalled
/// (`docs/e2e.md`, "What prevents it", has the runs). The price: a test host keeps one
/// host core busy for as long as it runs, idle or not.
pub const TESTHOST_CMDLINE: &str = "console=ttyS0 quiet panic=-1 idle=poll";

/// [`TESTHOST_CMDLINE`] with `mvm.run=RUN` added (when `run` is not empty): the
/// argument the test host's `/init` (`scripts/build-testhost`) hands to
/// `/testhost/run`. `scripts/e2e` passes its case pattern this way, through
/// `mvm __testhost-cmdline PATTERN`.
pub fn testhost_cmdline(run: &str) -> Result<String, String> {
    if run.is_empty() {
        return Ok(TESTHOST_CMDLINE.to_owned());
    }
    // The value must reach /init as one word, unchanged: the kernel splits the
    // line at spaces and treats quotes, and /init splits it again in shell.
    let survives = |c: char| c.is_ascii_alphanumeric() || "/_.,*-+".contains(c);
    match run.chars().find(|c| !survives(*c)) {
        Some(c) => Err(format!(
            "'{run}' holds {c:?}: only A-Z a-z 0-9 / _ . , * - + pass the test host's kernel command line unchanged"
        )),
        None => Ok(format!("{TESTHOST_CMDLINE} mvm.run={run}")),
    }
}

/// The test host's memory (QEMU's `-m`) for a guest of `guest_mib`: what the
/// host must back, and what `backend::resources` checks before starting QEMU.
pub fn testhost_memory_mib(guest_mib: u32) -> u32 {
    guest_mib
        .saturating_add(TESTHOST_OVERHEAD_MIB)
        .max(TESTHOST_MIN_MIB)
}

/// The QEMU arguments: the test host machine of `scripts/e2e`, its serial
/// console into `console_log`, the four ports on sockets in `sockets`, the run's
/// disks and then `extra` (the warm snapshot's disk).
pub fn qemu_args(
    testhost: &Path,
    initramfs: &Path,
    console_log: &Path,
    sockets: &Path,
    spec: &RunSpec,
    extra: &[Drive],
) -> Vec<String> {
    let mem = testhost_memory_mib(spec.mem_mib);
    let mut args: Vec<String> = TESTHOST_MACHINE.iter().map(|s| (*s).to_owned()).collect();
    args.push("-m".into());
    args.push(mem.to_string());
    args.push("-kernel".into());
    args.push(testhost.join("vmlinuz").display().to_string());
    args.push("-initrd".into());
    args.push(initramfs.display().to_string());
    args.push("-append".into());
    args.push(TESTHOST_CMDLINE.into());
    args.push("-serial".into());
    args.push(format!("file:{}", console_log.display()));
    args.push("-device".into());
    args.push("virtio-serial-pci,id=mvmser".into());
    for drive in disk_drives(&spec.disks).iter().chain(extra) {
        args.push("-drive".into());
        args.push(format!(
            "file={},if=none,id={},format=raw,readonly={}",
            drive.path.display(),
            drive.serial,
            if drive.read_only { "on" } else { "off" }
        ));
        args.push("-device".into());
        args.push(format!("virtio-blk-pci,drive={0},serial={0}", drive.serial));
    }
    if spec.net.is_some() {
        args.extend(super::uplink::qemu_args());
    }
    for (id, name) in [
        ("ctl", PORT_CTL),
        ("in", PORT_IN),
        ("out", PORT_OUT),
        ("err", PORT_ERR),
    ] {
        args.push("-chardev".into());
        args.push(format!(
            "socket,id={id},path={}",
            sockets.join(id).display()
        ));
        args.push("-device".into());
        args.push(format!(
            "virtserialport,bus=mvmser.0,chardev={id},name={name}"
        ));
    }
    args
}

/// One file the test host gets as a virtio-blk disk: a disk of the run, or the
/// dm-verity tree beside a read-only one. The serial names it inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// The file on this host.
    pub path: PathBuf,
    /// Whether QEMU opens it read-only.
    pub read_only: bool,
    /// `mvmdN` for disk N of the run, `mvmtN` for its tree.
    pub serial: String,
}

/// The drives for the run's disks, in order: each disk, and after a read-only one
/// its tree (`FILE.verity`), which the VMM inside reads beside it.
pub fn disk_drives(disks: &[String]) -> Vec<Drive> {
    let mut drives = Vec::new();
    for (n, (path, read_only)) in disks
        .iter()
        .filter_map(|d| crate::backend::parse_disk(d))
        .enumerate()
    {
        if read_only {
            let mut tree = path.clone().into_os_string();
            tree.push(mvm_loader::verity::TREE_SUFFIX);
            drives.push(Drive {
                path: path.clone(),
                read_only,
                serial: format!("mvmd{n}"),
            });
            drives.push(Drive {
                path: PathBuf::from(tree),
                read_only: true,
                serial: format!("mvmt{n}"),
            });
        } else {
            drives.push(Drive {
                path,
                read_only,
                serial: format!("mvmd{n}"),
            });
        }
    }
    drives
}

/// QEMU, killed and reaped on drop.
pub(super) struct Qemu {
    pub(super) child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(super) fn spawn_qemu(qemu: &Path, args: &[String], log: &Path) -> Result<Qemu, RunError> {
    let log_file =
        std::fs::File::create(log).map_err(RunError::io(format!("creating {}", log.display())))?;
    let mut command = Command::new(qemu);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    crate::backend::vmm_process::own_group_dies_with_us(&mut command);
    let child = command.spawn().map_err(|e| RunError::VmmDied {
        reason: format!("cannot start {}: {e}", qemu.display()),
        log: String::new(),
        exit: None,
    })?;
    Ok(Qemu { child })
}

/// Accepts QEMU's connection on `listener`, watching QEMU and Ctrl-C.
pub(super) fn accept_from(
    listener: &UnixListener,
    qemu: &mut Qemu,
    logs: &[&Path],
    timeout: Duration,
) -> Result<UnixStream, RunError> {
    listener
        .set_nonblocking(true)
        .map_err(RunError::io("listening for QEMU"))?;
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(RunError::io("accepting QEMU"))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(RunError::io("accepting QEMU")(e)),
        }
        if interrupt::requested() {
            return Err(RunError::Interrupted);
        }
        if let Ok(Some(status)) = qemu.child.try_wait() {
            return Err(RunError::VmmDied {
                reason: format!("qemu exited at start with {status}"),
                log: read_logs(logs),
                exit: Some(status.into()),
            });
        }
        if start.elapsed() > timeout {
            return Err(RunError::VmmDied {
                reason: "qemu did not connect its serial ports".into(),
                log: read_logs(logs),
                exit: None,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(super) fn read_logs(logs: &[&Path]) -> String {
    logs.iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    #[test]
    fn qemu_gets_four_named_ports_and_enough_memory() {
        let args = qemu_args(
            Path::new("/th"),
            Path::new("/c/i.cpio"),
            Path::new("/s/console.log"),
            Path::new("/s"),
            &spec(),
            &[Drive {
                path: "/w/disk".into(),
                read_only: true,
                serial: "mvmwarm".into(),
            }],
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("-drive file=/w/disk,if=none,id=mvmwarm,format=raw,readonly=on -device virtio-blk-pci,drive=mvmwarm,serial=mvmwarm"),
            "{joined}"
        );
        for name in [PORT_CTL, PORT_IN, PORT_OUT, PORT_ERR] {
            assert!(joined.contains(&format!("name={name}")), "{joined}");
        }
        assert!(joined.contains("-kernel /th/vmlinuz -initrd /c/i.cpio"));
        assert!(joined.contains("socket,id=ctl,path=/s/ctl"));
        let m = args.iter().position(|a| a == "-m").unwrap();
        assert_eq!(args[m + 1], "1024");
        assert!(joined.contains("-accel tcg"));
        assert!(joined.contains("-cpu max,erms=off -accel"), "{joined}");
        assert!(joined.contains("-append console=ttyS0 quiet panic=-1 idle=poll -serial"));
    }

    #[test]
    fn testhost_cmdline_carries_one_plain_word() {
        assert_eq!(
            testhost_cmdline("").unwrap(),
            "console=ttyS0 quiet panic=-1 idle=poll"
        );
        assert_eq!(
            testhost_cmdline("boot/report,boot/elf-*").unwrap(),
            "console=ttyS0 quiet panic=-1 idle=poll mvm.run=boot/report,boot/elf-*"
        );
        for bad in ["a b", "a\"b", "x=$y", "a\nb", "é"] {
            assert!(testhost_cmdline(bad).is_err(), "{bad:?}");
        }
    }
}
