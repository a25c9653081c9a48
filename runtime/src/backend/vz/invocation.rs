//! `vfkit`'s command line for one VM, from measured files only.
//!
//! `vfkit` splits each option's value at commas and `key=value`s, and takes the kernel
//! command line in double quotes. A path holding a comma, a quote or a newline could add
//! a device or an option of its own (`disk.img,path=/etc/...`), so such values are refused,
//! not escaped; paths must be absolute (vfkit resolves relative ones against its own
//! working directory).

use std::path::{Path, PathBuf};

/// What `vfkit` boots: every path is a file the hand-off measured ([`super::handoff`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfkitVm {
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// The kernel (uncompressed, as Virtualization.framework requires).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line, exactly as the plan's digest covers it.
    pub cmdline: String,
    /// Disks, in order (`vda`, `vdb`, ...).
    pub disks: Vec<PathBuf>,
    /// The guest agent's vsock port, and the Unix socket the runtime connects to for it.
    pub agent_port: u32,
    /// The socket for the agent's port.
    pub agent_socket: PathBuf,
    /// Where the guest's console goes.
    pub console_log: PathBuf,
    /// vfkit's REST service (VM state), on a Unix socket.
    pub rest_socket: PathBuf,
}

/// Why no command line was built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvocationError {
    /// A path vfkit would misread.
    #[error("{what} {path:?}: {why}")]
    BadPath {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A command line vfkit would misread.
    #[error("kernel command line: {0}")]
    BadCmdline(&'static str),
}

/// Characters that end or split a vfkit option value.
const SEPARATORS: [char; 4] = [',', '"', '\n', '\r'];

fn checked(what: &'static str, path: &Path) -> Result<String, InvocationError> {
    let bad = |why| InvocationError::BadPath {
        what,
        path: path.to_owned(),
        why,
    };
    if !path.is_absolute() {
        return Err(bad("not absolute"));
    }
    let text = path.to_str().ok_or_else(|| bad("not UTF-8"))?;
    if text.contains(SEPARATORS) {
        return Err(bad(
            "holds a comma, quote or newline, which vfkit reads as syntax",
        ));
    }
    Ok(text.to_owned())
}

impl VfkitVm {
    /// The arguments after `vfkit`.
    pub fn args(&self) -> Result<Vec<String>, InvocationError> {
        if self.cmdline.contains(['"', '\n', '\r', '\0']) {
            return Err(InvocationError::BadCmdline(
                "holds a quote, newline or NUL, which vfkit reads as syntax",
            ));
        }
        let mut bootloader = format!("linux,kernel={}", checked("kernel", &self.kernel)?);
        if let Some(initrd) = &self.initrd {
            bootloader.push_str(&format!(",initrd={}", checked("initrd", initrd)?));
        }
        bootloader.push_str(&format!(",cmdline=\"{}\"", self.cmdline));
        let mut args = vec![
            "--cpus".to_owned(),
            self.cpus.to_string(),
            "--memory".to_owned(),
            self.memory_mib.to_string(),
            "--bootloader".to_owned(),
            bootloader,
        ];
        for disk in &self.disks {
            args.push("--device".to_owned());
            args.push(format!("virtio-blk,path={}", checked("disk", disk)?));
        }
        args.push("--device".to_owned());
        args.push(format!(
            "virtio-vsock,port={},socketURL={},connect",
            self.agent_port,
            checked("agent socket", &self.agent_socket)?
        ));
        args.push("--device".to_owned());
        args.push(format!(
            "virtio-serial,logFilePath={}",
            checked("console log", &self.console_log)?
        ));
        args.push("--device".to_owned());
        args.push("virtio-rng".to_owned());
        args.push("--restful-uri".to_owned());
        args.push(format!(
            "unix://{}",
            checked("REST socket", &self.rest_socket)?
        ));
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VfkitVm {
        VfkitVm {
            cpus: 2,
            memory_mib: 512,
            kernel: "/run/h/vmlinux".into(),
            initrd: Some("/run/h/initramfs.cpio".into()),
            cmdline: "console=hvc0 quiet mvm.agent.port=1024".into(),
            disks: vec!["/run/h/rootfs.erofs".into(), "/run/h/scratch.img".into()],
            agent_port: 1024,
            agent_socket: "/run/h/agent.sock".into(),
            console_log: "/run/h/console.log".into(),
            rest_socket: "/run/h/rest.sock".into(),
        }
    }

    /// Field by field: every value of the sample plan lands in its option, in order.
    #[test]
    fn a_sample_plan_becomes_this_command_line() {
        assert_eq!(
            sample().args().unwrap(),
            [
                "--cpus",
                "2",
                "--memory",
                "512",
                "--bootloader",
                "linux,kernel=/run/h/vmlinux,initrd=/run/h/initramfs.cpio,cmdline=\"console=hvc0 quiet mvm.agent.port=1024\"",
                "--device",
                "virtio-blk,path=/run/h/rootfs.erofs",
                "--device",
                "virtio-blk,path=/run/h/scratch.img",
                "--device",
                "virtio-vsock,port=1024,socketURL=/run/h/agent.sock,connect",
                "--device",
                "virtio-serial,logFilePath=/run/h/console.log",
                "--device",
                "virtio-rng",
                "--restful-uri",
                "unix:///run/h/rest.sock",
            ]
        );
        let mut bare = sample();
        bare.initrd = None;
        bare.disks.clear();
        let args = bare.args().unwrap();
        assert!(args.contains(
            &"linux,kernel=/run/h/vmlinux,cmdline=\"console=hvc0 quiet mvm.agent.port=1024\""
                .to_owned()
        ));
        assert!(!args.iter().any(|a| a.starts_with("virtio-blk")));
    }

    /// A value that would add syntax of its own is refused, never passed on.
    #[test]
    fn values_that_would_inject_options_are_refused() {
        let mut disk = sample();
        disk.disks = vec!["/run/h/d.img,path=/etc/shadow".into()];
        assert!(matches!(
            disk.args(),
            Err(InvocationError::BadPath { what: "disk", .. })
        ));
        let mut relative = sample();
        relative.kernel = "vmlinux".into();
        assert!(relative.args().is_err());
        let mut quoted = sample();
        quoted.cmdline = "quiet\" --device virtio-net,nat \"".into();
        assert!(matches!(quoted.args(), Err(InvocationError::BadCmdline(_))));
        let mut newline = sample();
        newline.agent_socket = "/run/h/a\n.sock".into();
        assert!(newline.args().is_err());
    }
}
