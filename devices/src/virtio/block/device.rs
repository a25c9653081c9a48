//! The block device's front: the disk's configuration, features and config space.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::request::DiskLimits;
use super::*;
use crate::virtio::{
    feature, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX,
};

/// Size of the config space we expose: capacity, size_max, seg_max, geometry, blk_size
/// (`struct virtio_blk_config` up to `blk_size`).
const CONFIG_SPACE_SIZE: usize = 24;

/// One `--disk` as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The backing file.
    pub path: PathBuf,
    /// Whether the guest may write.
    pub read_only: bool,
    /// The id GET_ID returns (`/sys/block/vdX/serial`); at most 20 printable ASCII bytes.
    /// Without one, an id derived from the file's device and inode numbers is used, which
    /// stays the same across runs for the same file.
    pub id: Option<String>,
}

/// Why a disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The id is too long or not printable ASCII.
    #[error("disk id {0:?} must be 1 to 20 printable ASCII characters")]
    BadId(String),
    /// The backing file cannot be opened.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backing file is not a regular file or block device of usable size.
    #[error("disk {path}: {reason}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Checks an id for GET_ID (`/sys/block/vdX/serial`): 1 to [`VIRTIO_BLK_ID_BYTES`]
/// printable ASCII bytes.
pub fn validate_id(id: &str) -> Result<(), BlockError> {
    if id.is_empty()
        || id.len() > VIRTIO_BLK_ID_BYTES
        || !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(BlockError::BadId(id.to_owned()));
    }
    Ok(())
}

/// An id that stays the same for the same file: FNV-1a over its device and inode numbers.
fn default_id(dev: u64, ino: u64) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in dev.to_le_bytes().iter().chain(ino.to_le_bytes().iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("mvm{hash:016x}")
}

/// The virtio-blk front a transport talks to.
#[derive(Debug)]
pub struct Block {
    features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: [u16; 1],
    id: String,
    limits: DiskLimits,
}

impl Block {
    /// Opens the disk and returns the front and the worker that owns the file.
    pub fn open(config: &DiskConfig) -> Result<(Block, BlockWorker), BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Open {
            path: config.path.clone(),
            source,
        })?;
        let len = disk_len(&config.path).map_err(|reason| BlockError::Unusable {
            path: config.path.clone(),
            reason,
        })?;
        let id = match &config.id {
            Some(id) => {
                validate_id(id)?;
                id.clone()
            }
            None => default_id(meta.dev(), meta.ino()),
        };
        if len % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %config.path.display(),
                len,
                "disk size is not a multiple of 512; the tail is not visible to the guest"
            );
        }
        Ok(Self::with_file(
            file,
            len >> SECTOR_SHIFT,
            config.read_only,
            id,
        ))
    }

    /// The front and worker for an already open file of `capacity_sectors` sectors.
    pub fn with_file(
        file: File,
        capacity_sectors: u64,
        read_only: bool,
        id: String,
    ) -> (Block, BlockWorker) {
        let limits = DiskLimits {
            capacity_sectors,
            read_only,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
        };
        let mut features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_FLUSH)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_SIZE_MAX);
        if read_only {
            features |= feature(VIRTIO_BLK_F_RO);
        }
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        let fields: [(usize, &[u8]); 4] = [
            (0, &capacity_sectors.to_le_bytes()),
            (8, &SIZE_MAX.to_le_bytes()),
            (12, &SEG_MAX.to_le_bytes()),
            (20, &u32::try_from(SECTOR_SIZE).unwrap_or(512).to_le_bytes()),
        ];
        for (offset, bytes) in fields {
            if let Some(dst) = config_space.get_mut(offset..offset + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        }
        let metrics = Arc::new(BlockMetrics::default());
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        for (dst, src) in id_bytes.iter_mut().zip(id.bytes()) {
            *dst = src;
        }
        let worker = BlockWorker::new(file, limits, id_bytes, metrics);
        let front = Block {
            features,
            config_space,
            queue_sizes: [QUEUE_SIZE],
            id,
            limits,
        };
        (front, worker)
    }

    /// The id GET_ID returns.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Capacity in sectors.
    #[must_use]
    pub fn capacity_sectors(&self) -> u64 {
        self.limits.capacity_sectors
    }

    /// Whether the disk is read-only.
    #[must_use]
    pub fn read_only(&self) -> bool {
        self.limits.read_only
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space, offset, data);
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }
}

/// The size in bytes of a disk's backing: a regular file's length, or a block device's
/// size (its end, as `lseek` reports it). Anything else is refused.
pub fn disk_len(path: &std::path::Path) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot stat: {e}"))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.file_type().is_block_device() {
        return Err("not a regular file or a block device".to_owned());
    }
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    file.seek(SeekFrom::End(0))
        .map_err(|e| format!("cannot find the block device's size: {e}"))
}
