//! `--disk path=FILE,ro|rw[,id=ID]`: virtio-blk devices on virtio-mmio slots, each with
//! its own device thread. The value is parsed here ([`parse_disk_spec`]).
//!
//! Disks are opened while the arguments are checked ([`open_disks`]), so a missing file
//! never creates a VM; they are attached in order ([`attach_disks`]), so the first
//! `--disk` is `/dev/vda`, the second `/dev/vdb`, and so on.

use std::path::PathBuf;

use mvm_devices::virtio::block::{validate_id, Block, BlockError, BlockWorker, DiskConfig};

use crate::devices::{attach_virtio_device, DeviceContext, DeviceThread};
use crate::error::BootError;
use mvm_seccomp::{allow, roles::device_thread, Role};

/// A disk's thread: requests against the backing file it was given, and the verity tree.
pub const ROLE: Role = Role::new("blk", || {
    device_thread([
        allow!(SYS_lseek, "position the disk file before a read or write"),
        allow!(SYS_pread64, "read a disk or verity-tree block at an offset"),
        allow!(
            SYS_pwrite64,
            "write a block of a read-write disk at an offset"
        ),
        allow!(SYS_fdatasync, "VIRTIO_BLK_T_FLUSH"),
        allow!(SYS_fsync, "VIRTIO_BLK_T_FLUSH where sync_all is used"),
    ])
    // `read`/`write` serve both the eventfds and the disk file.
});

/// clap's parser for one `--disk` value.
pub fn parse_disk_arg(value: &str) -> Result<DiskConfig, String> {
    parse_disk_spec(value).map_err(|e| e.to_string())
}

/// Why a `--disk` value was refused.
#[derive(Debug, thiserror::Error)]
pub enum DiskArgError {
    /// The value does not parse.
    #[error("--disk {spec:?}: {reason}")]
    Spec {
        /// The argument.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The id is not one the device can report.
    #[error(transparent)]
    Id(#[from] BlockError),
}

/// Parses `path=FILE,ro|rw[,id=ID]`. The mode is required, so nobody gets a writable
/// disk by forgetting a flag.
pub fn parse_disk_spec(spec: &str) -> Result<DiskConfig, DiskArgError> {
    let err = |reason: &str| DiskArgError::Spec {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let mut path = None;
    let mut read_only = None;
    let mut id = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("path", p)) if !p.is_empty() && path.is_none() => path = Some(PathBuf::from(p)),
            Some(("id", i)) if id.is_none() => id = Some(i.to_owned()),
            None if part == "ro" && read_only.is_none() => read_only = Some(true),
            None if part == "rw" && read_only.is_none() => read_only = Some(false),
            _ => return Err(err(&format!("unexpected or repeated {part:?}"))),
        }
    }
    let config = DiskConfig {
        path: path.ok_or_else(|| err("missing path=FILE"))?,
        read_only: read_only.ok_or_else(|| err("missing ro or rw"))?,
        id,
    };
    if let Some(id) = &config.id {
        validate_id(id)?;
    }
    Ok(config)
}

/// An opened disk, not yet attached.
#[derive(Debug)]
pub struct OpenDisk {
    config: DiskConfig,
    front: Block,
    worker: BlockWorker,
}

impl OpenDisk {
    /// Whether the guest may only read this disk.
    pub fn read_only(&self) -> bool {
        self.config.read_only
    }

    /// The device-thread half, before it starts (verified boot adds its verifier).
    pub fn worker_mut(&mut self) -> &mut BlockWorker {
        &mut self.worker
    }

    /// In the jailed child: the breaks of the image's read lease, if any, come here.
    pub fn claim_lease_signals(&self) {
        self.worker.claim_lease_signals();
    }
}

/// Opens every disk, in order.
pub fn open_disks(configs: &[DiskConfig]) -> Result<Vec<OpenDisk>, BlockError> {
    configs
        .iter()
        .map(|config| {
            let (front, worker) = Block::open(config)?;
            Ok(OpenDisk {
                config: config.clone(),
                front,
                worker,
            })
        })
        .collect()
}

/// Puts each disk on the next virtio-mmio slot (irqfd, ioeventfd, bus, command line) and
/// starts its device thread.
pub fn attach_disks(ctx: &mut DeviceContext<'_>, disks: Vec<OpenDisk>) -> Result<(), BootError> {
    for (index, disk) in disks.into_iter().enumerate() {
        let OpenDisk {
            config,
            front,
            worker,
        } = disk;
        let (id, sectors) = (front.id().to_owned(), front.capacity_sectors());
        let slot = attach_virtio_device(
            ctx,
            front,
            worker,
            DeviceThread {
                name: format!("virtio-blk{index}"),
                role: ROLE,
                label: format!("disk {}", config.path.display()),
            },
        )?;
        tracing::info!(
            disk = %config.path.display(),
            read_only = config.read_only,
            id,
            sectors,
            addr = slot.base,
            gsi = slot.gsi,
            "virtio-blk attached"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_args_parse_and_bad_ones_name_the_problem() {
        let d = parse_disk_arg("path=/x.img,rw,id=data").unwrap();
        assert!(!d.read_only);
        assert_eq!(d.id.as_deref(), Some("data"));
        let err = parse_disk_arg("path=/x.img").unwrap_err();
        assert!(err.contains("missing ro or rw"), "{err}");
    }

    #[test]
    fn disk_spec_parsing() {
        assert_eq!(
            parse_disk_spec("path=/a/b.img,ro,id=root").unwrap(),
            DiskConfig {
                path: "/a/b.img".into(),
                read_only: true,
                id: Some("root".into())
            }
        );
        assert!(!parse_disk_spec("rw,path=x").unwrap().read_only);
        for bad in [
            "path=x",
            "ro",
            "path=x,ro,rw",
            "path=x,ro,path=y",
            "path=x,ro,id=",
            "path=x,ro,id=123456789012345678901",
            "path=x,ro,id=a\u{e9}",
            "path=x,ro,size=3",
            "path=,ro",
        ] {
            assert!(parse_disk_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disks_open_in_order_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        std::fs::write(&a, vec![0u8; 4096]).unwrap();
        std::fs::write(&b, vec![0u8; 8192]).unwrap();
        let configs = [
            parse_disk_arg(&format!("path={},ro", a.display())).unwrap(),
            parse_disk_arg(&format!("path={},rw", b.display())).unwrap(),
        ];
        let disks = open_disks(&configs).unwrap();
        assert_eq!(disks[0].front.capacity_sectors(), 8);
        assert!(disks[0].front.read_only());
        assert_eq!(disks[1].front.capacity_sectors(), 16);
        let missing = dir.path().join("nope.img");
        let err = open_disks(&[parse_disk_arg(&format!("path={},ro", missing.display())).unwrap()])
            .unwrap_err();
        assert!(err.to_string().contains("nope.img"), "{err}");
    }
}
