//! `blk/*`: real Linux guests on virtio-blk disks: a read-only ext4 root, a
//! read-write disk whose bytes the host checks, the disk id in sysfs, and two vCPUs doing
//! I/O at once.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::case::{check, Case, CaseResult, Context, Failure, KERNEL_ELF, VMM};
use crate::guest::blk::{
    first_mismatch, read_prefix, PARALLEL_REGION, PARALLEL_SEED, PARALLEL_THREADS, PATTERN_BYTES,
    ROOT_FILE_TEXT, SAY_FILE, SAY_PARALLEL_OK, SAY_RO_ALLOWED, SAY_RO_REFUSED, SAY_SERIAL,
    SAY_WRITTEN, WRITE_SEED,
};
use crate::guest::MODE_PARAM;
use crate::vm::VmLaunch;

/// The blk cases.
pub const CASES: &[Case] = &[
    Case::kvm("blk/ro-root", ro_root),
    Case::kvm("blk/rw-pattern", rw_pattern),
    Case::kvm("blk/two-vcpus", two_vcpus),
];

/// Generous: under the QEMU-TCG test host on a loaded machine a boot alone can take
/// 30 s, and the guest then moves 8 MiB through an emulated CPU.
const IO_TIMEOUT: Duration = Duration::from_secs(360);

/// The read-only ext4 root image built by `scripts/build-blk-images`.
pub const ROOT_IMAGE: &str = "blk-root.ext4";
/// The id the root disk is given; the guest reads it from `/sys/block/vda/serial`.
pub const ROOT_ID: &str = "mvm-blk-root";

fn sha256_file(path: &Path) -> Result<String, Failure> {
    let bytes =
        std::fs::read(path).map_err(|e| Failure::new(format!("read {}: {e}", path.display())))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// A zero-filled disk image of `len` bytes in the case's work directory.
fn blank_disk(ctx: &Context, name: &str, len: u64) -> Result<std::path::PathBuf, Failure> {
    let path = ctx.work_file(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(len))
        .map_err(|e| Failure::new(format!("create {}: {e}", path.display())))?;
    Ok(path)
}

fn disk_arg(path: &Path, mode: &str) -> String {
    format!("path={},{mode}", path.display())
}

/// Boots from the read-only ext4 root (no initramfs): the init prints a file of that root
/// and the disk id, its write to the disk fails, and the image is unchanged afterwards.
fn ro_root(ctx: &Context) -> CaseResult {
    let image = ctx.artifact(ROOT_IMAGE)?;
    let before = sha256_file(&image)?;
    let cmdline = format!(
        "console=ttyS0 quiet panic=-1 reboot=k root=/dev/vda ro rootfstype=ext4 init=/init \
         {MODE_PARAM}=blk-root"
    );
    let run = VmLaunch::new(ctx.artifact(VMM)?, ctx.artifact(KERNEL_ELF)?, &ctx.work)
        .cmdline(&cmdline)
        .timeout(IO_TIMEOUT)
        .arg("--disk")
        .arg(format!("{},id={ROOT_ID}", disk_arg(&image, "ro")))
        .run()?;
    run.expect_exit(0)?;
    run.expect_console(&format!("{SAY_FILE}{ROOT_FILE_TEXT}"))?;
    run.expect_console(&format!("{SAY_SERIAL}vda={ROOT_ID}"))?;
    run.expect_console(SAY_RO_REFUSED)?;
    check(!run.console.contains(SAY_RO_ALLOWED), || {
        "the guest wrote to the read-only disk".into()
    })
    .map_err(|f| run.fail(f.reason))?;
    let after = sha256_file(&image)?;
    check(before == after, || {
        format!("root image changed: sha256 {before} before, {after} after")
    })
}

/// A read-write disk: the guest writes 8 MiB of a known pattern and syncs; the host reads
/// back the same bytes, and nothing past them.
fn rw_pattern(ctx: &Context) -> CaseResult {
    let disk_len = 2 * PATTERN_BYTES as u64;
    let disk = blank_disk(ctx, "data.img", disk_len)?;
    let run = ctx
        .test_guest(KERNEL_ELF, "blk-write")?
        .timeout(IO_TIMEOUT)
        .arg("--disk")
        .arg(disk_arg(&disk, "rw"))
        .run()?;
    run.expect_exit(0)?;
    run.expect_console(SAY_WRITTEN)?;
    let bytes = read_prefix(&disk, 2 * PATTERN_BYTES)
        .map_err(|e| Failure::new(format!("read back {}: {e}", disk.display())))?;
    let (written, rest) = bytes.split_at(PATTERN_BYTES);
    if let Some(bad) = first_mismatch(WRITE_SEED, 0, written) {
        return Err(run.fail(format!(
            "byte {bad} of the disk is not what the guest wrote"
        )));
    }
    check(rest.iter().all(|b| *b == 0), || {
        "bytes past the written 8 MiB changed".into()
    })
}

/// Two vCPUs, each pinned guest thread writing, syncing and reading back its own region
/// at the same time; the host checks both regions.
fn two_vcpus(ctx: &Context) -> CaseResult {
    let disk = blank_disk(ctx, "data.img", (PARALLEL_THREADS * PARALLEL_REGION) as u64)?;
    let run = ctx
        .test_guest(KERNEL_ELF, "blk-parallel")?
        .vcpus(2)
        .timeout(IO_TIMEOUT)
        .arg("--disk")
        .arg(disk_arg(&disk, "rw"))
        .run()?;
    run.expect_exit(0)?;
    run.expect_console(SAY_PARALLEL_OK)?;
    let bytes = read_prefix(&disk, PARALLEL_THREADS * PARALLEL_REGION)
        .map_err(|e| Failure::new(format!("read back {}: {e}", disk.display())))?;
    for (cpu, region) in bytes.chunks(PARALLEL_REGION).enumerate() {
        let seed = PARALLEL_SEED.wrapping_add(u8::try_from(cpu).unwrap_or(u8::MAX));
        if let Some(bad) = first_mismatch(seed, 0, region) {
            return Err(run.fail(format!(
                "region of cpu {cpu}: byte {bad} is not what the guest wrote"
            )));
        }
    }
    Ok(())
}
