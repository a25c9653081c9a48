//! `--vsock cid=N,uds=PATH`: the virtio-vsock device and its host Unix socket.
//!
//! The flag's value is parsed here ([`parse_vsock_arg`]) and checked against the
//! plan's `devices.vsock` ([`check_plan`]); the socket is bound
//! while the arguments are checked ([`open_vsock`]), so a taken path never
//! creates a VM; [`attach_vsock`] puts the device on a virtio-mmio slot and
//! starts its thread. The device itself lives in `mvm_devices::virtio::vsock`.

use std::path::{Path, PathBuf};

use mvm_devices::virtio::vsock::{Vsock, VsockConfig, VsockError, VsockMetrics, VsockWorker};

use mvm_loader::plan::VsockDevice;

use crate::devices::{attach_virtio_device, DeviceContext, DeviceThread};
use crate::error::{BootError, PlanDisagreement};
use mvm_seccomp::ioctl::FIONBIO;
use mvm_seccomp::{allow, roles::device_thread, Role};

/// `AF_UNIX` (`<sys/socket.h>`), the only family the vsock thread may open a socket in.
const AF_UNIX: u64 = 1;

/// The vsock thread: the VM's listening Unix socket, and connections to `<uds>_<port>`.
pub const ROLE: Role = Role::new("vsock", || {
    device_thread([
        allow!(SYS_accept4, "accept a host connection on the VM's socket"),
        allow!(
            SYS_socket,
            "a Unix stream socket for a guest connection to <uds>_<port>",
            arg 0 in [AF_UNIX => "AF_UNIX"]
        ),
        allow!(SYS_connect, "connect that socket to <uds>_<port>"),
        allow!(SYS_recvfrom, "read from a host connection (std's recv)"),
        allow!(
            SYS_sendto,
            "write to a host connection (std's send with MSG_NOSIGNAL)"
        ),
        allow!(SYS_shutdown, "half-close a connection the guest shut down"),
        allow!(
            SYS_getsockopt,
            "SO_ERROR of a non-blocking connect that completed"
        ),
        allow!(
            SYS_ioctl,
            "make an accepted connection non-blocking",
            arg 1 in [FIONBIO => "FIONBIO"]
        ),
        allow!(
            SYS_timerfd_settime,
            "arm the timer that drops host CONNECTs the guest never answers"
        ),
    ])
});

/// clap's parser for the `--vsock` value.
pub fn parse_vsock_value(value: &str) -> Result<VsockConfig, String> {
    parse_vsock_arg(value).map_err(|e| e.to_string())
}

/// `--vsock` against the plan's `devices.vsock`: none where the plan has none, and the
/// plan's guest CID.
pub fn check_plan(
    arg: Option<&VsockConfig>,
    plan: Option<&VsockDevice>,
) -> Result<(), PlanDisagreement> {
    match (plan, arg) {
        (None, Some(v)) => Err(PlanDisagreement {
            flag: "--vsock cid",
            given: v.guest_cid.to_string(),
            field: "devices.vsock",
            plan: "none".into(),
        }),
        (Some(p), Some(v)) if u64::from(p.guest_cid) != v.guest_cid => Err(PlanDisagreement {
            flag: "--vsock cid",
            given: v.guest_cid.to_string(),
            field: "devices.vsock.guest_cid",
            plan: p.guest_cid.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Removes the VM's socket file when dropped: the device thread is never joined
/// (it ends with the process), so its own cleanup cannot be relied on.
#[derive(Debug)]
pub struct SocketFileGuard(PathBuf);

impl SocketFileGuard {
    /// The guarded path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        // Already gone is fine.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A vsock device whose socket is listening, not yet attached.
#[derive(Debug)]
pub struct OpenVsock {
    front: Vsock,
    worker: VsockWorker,
}

impl OpenVsock {
    /// The device's counters, for the boot report.
    pub fn metrics(&self) -> std::sync::Arc<VsockMetrics> {
        self.worker.metrics()
    }
}

/// Checks the CID and binds the VM's socket. The guard removes the socket file
/// when the VMM is done with it.
pub fn open_vsock(config: &VsockConfig) -> Result<(OpenVsock, SocketFileGuard), VsockError> {
    let (front, worker) = Vsock::new(config)?;
    Ok((
        OpenVsock { front, worker },
        SocketFileGuard(config.uds_path.clone()),
    ))
}

/// Puts the device on the next virtio-mmio slot (irqfd, ioeventfds, bus, command
/// line) and starts its device thread.
pub fn attach_vsock(ctx: &mut DeviceContext<'_>, vsock: OpenVsock) -> Result<(), BootError> {
    let OpenVsock { front, worker } = vsock;
    let cid = front.guest_cid();
    let uds = worker.muxer().uds_path().to_path_buf();
    let slot = attach_virtio_device(
        ctx,
        front,
        worker,
        DeviceThread {
            name: "virtio-vsock".into(),
            role: ROLE,
            label: "vsock".into(),
        },
    )?;
    tracing::info!(
        cid,
        uds = %uds.display(),
        addr = slot.base,
        gsi = slot.gsi,
        "virtio-vsock attached"
    );
    Ok(())
}

/// Why a `--vsock` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockArgError {
    /// A `key=value` pair the flag does not know, or without `=`.
    #[error("--vsock: unknown or malformed item {0:?} (expected cid=N,uds=PATH)")]
    Item(String),
    /// `cid=` is not a number.
    #[error("--vsock: cid {0:?} is not a decimal number")]
    Cid(String),
    /// A key given twice.
    #[error("--vsock: {0} given twice")]
    Duplicate(&'static str),
    /// A key missing.
    #[error("--vsock: {0}= is required (expected cid=N,uds=PATH)")]
    Missing(&'static str),
    /// `uds=` empty.
    #[error("--vsock: uds= is empty")]
    EmptyPath,
}

/// Parses `cid=N,uds=PATH` (in any order). The CID's range is checked when the
/// device is created. The path is taken verbatim after `uds=`, so it may not
/// contain a comma.
pub fn parse_vsock_arg(value: &str) -> Result<VsockConfig, VsockArgError> {
    let mut cid = None;
    let mut uds = None;
    for item in value.split(',') {
        match item.split_once('=') {
            Some(("cid", v)) => {
                let n = v
                    .parse::<u64>()
                    .map_err(|_| VsockArgError::Cid(v.to_owned()))?;
                if cid.replace(n).is_some() {
                    return Err(VsockArgError::Duplicate("cid"));
                }
            }
            Some(("uds", v)) => {
                if v.is_empty() {
                    return Err(VsockArgError::EmptyPath);
                }
                if uds.replace(PathBuf::from(v)).is_some() {
                    return Err(VsockArgError::Duplicate("uds"));
                }
            }
            _ => return Err(VsockArgError::Item(item.to_owned())),
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or(VsockArgError::Missing("cid"))?,
        uds_path: uds.ok_or(VsockArgError::Missing("uds"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_binds_and_the_guard_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let (open, guard) = open_vsock(&VsockConfig {
            guest_cid: 3,
            uds_path: path.clone(),
        })
        .unwrap();
        assert!(path.exists());
        // A second VM on the same path is refused before it exists.
        assert!(open_vsock(&VsockConfig {
            guest_cid: 4,
            uds_path: path.clone(),
        })
        .is_err());
        drop(guard);
        assert!(!path.exists());
        drop(open);
    }

    #[test]
    fn parses_both_orders() {
        let want = VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::from("/run/vm/v.sock"),
        };
        assert_eq!(
            parse_vsock_arg("cid=3,uds=/run/vm/v.sock"),
            Ok(want.clone())
        );
        assert_eq!(parse_vsock_arg("uds=/run/vm/v.sock,cid=3"), Ok(want));
    }

    #[test]
    fn refuses_malformed_values() {
        assert_eq!(
            parse_vsock_arg("cid=x,uds=/a"),
            Err(VsockArgError::Cid("x".into()))
        );
        assert_eq!(
            parse_vsock_arg("cid=-1,uds=/a"),
            Err(VsockArgError::Cid("-1".into()))
        );
        assert_eq!(parse_vsock_arg("cid=3"), Err(VsockArgError::Missing("uds")));
        assert_eq!(
            parse_vsock_arg("uds=/a"),
            Err(VsockArgError::Missing("cid"))
        );
        assert_eq!(
            parse_vsock_arg("cid=3,cid=4,uds=/a"),
            Err(VsockArgError::Duplicate("cid"))
        );
        assert_eq!(parse_vsock_arg("cid=3,uds="), Err(VsockArgError::EmptyPath));
        assert_eq!(
            parse_vsock_arg("cid=3,uds=/a,port=5"),
            Err(VsockArgError::Item("port=5".into()))
        );
        assert_eq!(parse_vsock_arg(""), Err(VsockArgError::Item(String::new())));
    }
}
