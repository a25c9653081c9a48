//! `--disk path=FILE,ro|rw[,id=ID]`: virtio-blk devices on virtio-mmio slots, each with
//! its own device thread.
//!
//! Disks are opened while the arguments are checked ([`open_disks`]), so a missing file
//! never creates a VM; they are attached in order ([`attach_disks`]), so the first
//! `--disk` is `/dev/vda`, the second `/dev/vdb`, and so on.

use std::sync::{Arc, Mutex};

use mvm_devices::virtio::block::{Block, BlockError, BlockWorker, DiskConfig};
use mvm_devices::virtio::mmio::MmioTransport;
use mvm_devices::virtio::worker::{self, WorkerLoop};
use mvm_devices::virtio::{Interrupt, VirtioDevice};

use crate::boot::{BootError, DeviceContext};

/// clap's parser for one `--disk` value.
pub fn parse_disk_arg(value: &str) -> Result<DiskConfig, String> {
    DiskConfig::parse(value).map_err(|e| e.to_string())
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
        let queues = u16::try_from(front.queue_max_sizes().len())
            .map_err(|_| BootError::BootState("virtio-blk: too many queues".into()))?;
        let res = ctx.devices.prepare_virtio_mmio(ctx.vm, queues)?;
        let host = |what| move |source| BootError::Host { what, source };
        let interrupt = crate::verified_boot::audited(Interrupt::new(res.interrupt));
        let (handle, inbox) = worker::channel().map_err(host("virtio-blk worker channel"))?;
        let notifiers = res
            .queue_notify
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(host("virtio-blk queue notifiers"))?;
        tracing::info!(
            disk = %config.path.display(),
            read_only = config.read_only,
            id = front.id(),
            sectors = front.capacity_sectors(),
            addr = res.slot.base,
            gsi = res.slot.gsi,
            "virtio-blk attached"
        );
        let transport = MmioTransport::with_notifiers(
            Box::new(front),
            handle,
            interrupt.clone(),
            ctx.memory.clone(),
            res.queue_notify,
        )
        .map_err(|e| BootError::BootState(format!("disk {}: {e}", config.path.display())))?;
        ctx.devices
            .attach_virtio_mmio(&res.slot, Arc::new(Mutex::new(transport)), ctx.cmdline)?;
        // The thread outlives this function; it ends with the process (or when the
        // transport, and with it the worker handle, is dropped).
        let name = format!("virtio-blk{index}");
        let thread = worker::spawn(
            &name,
            WorkerLoop::new(worker, inbox, notifiers, interrupt),
            crate::seccomp::device_hook(crate::seccomp::ThreadRole::Blk, name.clone()),
        )
        .map_err(|e| BootError::BootState(format!("disk {}: {e}", config.path.display())))?;
        drop(thread);
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
