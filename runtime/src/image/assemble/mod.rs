//! Building an image from a spec and its lock, in a builder VM.
//!
//! 1. The lock (made first if there is none) pins every input; the `.deb` files are
//!    fetched by digest into the content-addressed cache ([`crate::image::fetch`]).
//! 2. On the host, Rust code reads every package and checks every entry
//!    ([`crate::image::deb`]); the essential set is unpacked into one tar stream.
//!    Nothing from a package is executed or written to a host path.
//! 3. [`inputs`] puts all of it on a read-only ext4 disk, pinned by its dm-verity
//!    tree; the output is an empty scratch disk.
//! 4. The builder VM boots through the same admission, signed plan, verified boot
//!    and audit log as any run, with no network device, and runs `build.sh` as root
//!    in the guest: dpkg configures the packages and the spec's steps run, chrooted
//!    into the new tree, and `mkfs.erofs` writes the filesystem to the output disk.
//! 5. [`output`] reads back only what an EROFS superblock claims (checked against the
//!    disk), computes the dm-verity tree, and the store gets the image: the base
//!    image's kernel and initramfs, the root filesystem, its tree and a manifest
//!    with every input, the lock's digest and the root hash.
//!
//! The builder VM's own image is built the same way from `images/builder` (embedded
//! in this binary), the first time on the bare initramfs ([`builder`]).

pub mod builder;
pub mod inputs;
pub mod output;
mod work_dir;

pub(in crate::image) use work_dir::WorkDir;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use mvm_loader::plan::ScratchDisk;

use super::deb::DebError;
use super::fetch::{Cas, FetchError, Wanted};
use super::lock::{self, Lock, LockError, LockedPackage};
use super::manifest::{ImageConfig, Input, Manifest, Rootfs};
use super::spec::{ImageKind, LoadedSpec, SpecError};
use super::{ImageError, ImageStore, StoredImage};
use crate::backend::{OutputSink, RunError, RunSpec, StdinMode, Tier};
use crate::run::execute::{execute, RunOptions};
use crate::run::{RunRequest, ScratchFile};

/// The root filesystem's file name in an image directory.
pub const ROOTFS_FILE: &str = "rootfs.erofs";
/// Command line words of an image with a root disk: the agent mounts `vda` as `/`.
pub const ROOT_CMDLINE: &str = "mvm.root=vda mvm.rootfstype=erofs";
/// Command line words of a builder VM: its workload (the build) runs as root.
pub const BUILDER_CMDLINE: &str = "mvm.agent.allow_root=1 mvm.agent.uid=0 mvm.agent.gid=0";
/// The version of the host's part of assembly (the tree writer, the inputs disk's
/// layout, the manifest): part of the build cache's key, so bump it when a change
/// there would change what a build produces.
pub const ASSEMBLY_VERSION: u32 = 1;
/// The builder VM's memory (its tree is built in a tmpfs).
const BUILDER_MEM_MIB: u32 = 2048;
/// How much of it the tree may take.
const TARGET_MIB: u64 = 1536;

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// The spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The lock.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// An input could not be had.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A package is refused.
    #[error("package {package}: {source}")]
    Deb {
        /// Name and version.
        package: String,
        /// Why.
        source: DebError,
    },
    /// A package is not the one its lock entry names.
    #[error(
        "package {package}: the file is {found} (a different package behind a pinned digest?)"
    )]
    PackageMismatch {
        /// As locked.
        package: String,
        /// As found.
        found: String,
    },
    /// A host file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A host tool failed.
    #[error("{tool}: {reason}")]
    Tool {
        /// Which.
        tool: &'static str,
        /// Why.
        reason: String,
    },
    /// The builder VM could not run.
    #[error("builder VM: {0}")]
    Run(#[from] RunError),
    /// The build inside failed.
    #[error("the build failed in the builder VM ({status}); its last lines:\n{log}")]
    Failed {
        /// How it ended.
        status: String,
        /// The end of its output.
        log: String,
    },
    /// The builder's output is not an image.
    #[error("the builder VM's output is refused: {reason}")]
    BadOutput {
        /// Why.
        reason: String,
    },
    /// The store.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Another build of the same image holds its work directory.
    #[error(
        "another build of this image is running ({}, work directory {}); run this again when it has finished",
        .pid.map_or_else(|| "pid unknown".to_owned(), |pid| format!("pid {pid}")),
        .path.display()
    )]
    Busy {
        /// The work directory.
        path: PathBuf,
        /// The process that holds it, as its lock file says.
        pid: Option<u32>,
    },
}

/// How to build.
#[derive(Debug, Clone)]
pub struct AssembleOptions {
    /// The backend for the builder VM.
    pub backend: Option<Tier>,
    /// The build's time limit in the VM, seconds.
    pub timeout_secs: u64,
    /// Show progress bars (a terminal) or plain lines.
    pub progress: bool,
    /// Rebuild even if the store has an image of this lock.
    pub rebuild: bool,
}

impl Default for AssembleOptions {
    fn default() -> Self {
        Self {
            backend: None,
            timeout_secs: 3600,
            progress: false,
            rebuild: false,
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Assembled {
    /// The stored image.
    pub image: StoredImage,
    /// Whether it was already in the store (nothing was built).
    pub cached: bool,
    /// Bytes fetched from the network (0 when the cache had everything).
    pub fetched_bytes: u64,
}

pub(in crate::image) fn say(message: &str) {
    eprintln!("mvm: {message}");
}

/// The lock beside `spec`, made first (and said so) when there is none.
pub fn lock_for(spec: &LoadedSpec) -> Result<(Lock, Vec<u8>), AssembleError> {
    if spec.lock_path().exists() {
        return Ok(Lock::read_for(spec)?);
    }
    say(&format!(
        "{} has no lock: locking it first ({})",
        spec.path.display(),
        spec.lock_path().display()
    ));
    let made = lock::lock(spec, &|s| say(s))?;
    let (_, bytes) = lock::write(spec, &made)?;
    Ok((made, bytes))
}

/// Fetches every package of `lock` (a progress bar in bytes); returns the cached
/// files and the bytes that came over the network.
pub fn fetch_packages(
    lock: &Lock,
    spec_dir: &Path,
    progress: bool,
) -> Result<(Vec<(LockedPackage, PathBuf)>, u64), AssembleError> {
    let cas = Cas::open_default()?;
    let missing: u64 = lock
        .packages
        .iter()
        .filter(|p| !cas.has(&p.sha256))
        .map(|p| p.size)
        .sum();
    let bar = if progress && missing > 0 {
        let bar = ProgressBar::new(missing);
        if let Ok(style) = ProgressStyle::with_template(
            "mvm: fetching {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    if missing > 0 && !progress {
        say(&format!(
            "fetching {} MiB of packages",
            missing.div_ceil(1 << 20)
        ));
    }
    let mut out = Vec::with_capacity(lock.packages.len());
    for p in &lock.packages {
        let url = if p.archive == lock::LOCAL_ARCHIVE {
            let path = spec_dir.join(&p.filename);
            format!(
                "file://{}",
                std::path::absolute(&path).unwrap_or(path).display()
            )
        } else {
            lock::package_url(&lock.suite, p)
        };
        let label = format!("{} {}", p.name, p.version);
        bar.set_message(p.name.clone());
        let path = cas.get(
            &Wanted {
                input: &label,
                url: &url,
                sha256: &p.sha256,
                size: Some(p.size),
            },
            &|n| bar.inc(n),
        )?;
        out.push((p.clone(), path));
    }
    bar.finish_and_clear();
    Ok((out, missing))
}

/// Collects the builder's output: shown as it comes, the last lines kept.
struct BuildLog {
    tail: VecDeque<String>,
    partial: [Vec<u8>; 2],
    results: Vec<String>,
    result_bytes: usize,
}

/// The prefix of a line of the build script's stdout that reports a result to the
/// host (`mvm-result KEY VALUE`).
pub const RESULT_PREFIX: &str = "mvm-result ";
/// The most result bytes kept from one build.
const MAX_RESULT_BYTES: usize = 4 << 20;

impl BuildLog {
    fn new() -> Self {
        Self {
            tail: VecDeque::new(),
            partial: [Vec::new(), Vec::new()],
            results: Vec::new(),
            result_bytes: 0,
        }
    }

    /// Takes `data` of stdout (`stream` 0) or stderr (1), a line at a time.
    fn feed(&mut self, stream: usize, data: &[u8]) {
        let Some(partial) = self.partial.get_mut(stream) else {
            return;
        };
        partial.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(at) = partial.iter().position(|&b| b == b'\n') {
            lines.push(partial.drain(..=at).collect::<Vec<u8>>());
        }
        for line in lines {
            let raw = String::from_utf8_lossy(&line).trim_end().to_owned();
            if stream == 0 {
                if let Some(result) = raw.strip_prefix(RESULT_PREFIX) {
                    if self.result_bytes + result.len() <= MAX_RESULT_BYTES {
                        self.result_bytes += result.len();
                        self.results.push(result.to_owned());
                    }
                    continue;
                }
            }
            let text = crate::terminal::escape_controls(&raw).into_owned();
            if text.starts_with("mvm-build: ") {
                eprintln!("mvm: {}", text.trim_start_matches("mvm-build: "));
            } else {
                tracing::debug!("builder: {text}");
            }
            self.tail.push_back(text);
            if self.tail.len() > 40 {
                self.tail.pop_front();
            }
        }
    }

    fn tail(&self) -> String {
        let mut lines: Vec<String> = self.tail.iter().cloned().collect();
        for partial in &self.partial {
            if !partial.is_empty() {
                lines.push(String::from_utf8_lossy(partial).into_owned());
            }
        }
        lines.join("\n")
    }
}

impl OutputSink for BuildLog {
    fn stdout(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.feed(0, data);
        Ok(())
    }

    fn stderr(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.feed(1, data);
        Ok(())
    }
}

/// What a builder VM run gave: its plan, and the `mvm-result` lines of its stdout
/// (in order, without the prefix; at most 4 MiB of them).
#[derive(Debug, Clone, Default)]
pub struct BuilderRun {
    /// The builder VM's plan id.
    pub plan_id: String,
    /// The result lines.
    pub results: Vec<String>,
}

/// The guest command: mount the inputs disk (the second-to-last disk) and run the
/// script on it with the last disk (the output) as its argument.
const GUEST_COMMAND: &str = "set -eu; \
    disks=$(ls /sys/block | grep '^vd' | sort); n=$(echo \"$disks\" | wc -l); \
    in=$(echo \"$disks\" | sed -n \"$((n-1))p\"); out=$(echo \"$disks\" | sed -n \"${n}p\"); \
    mkdir -p /inputs; mount -t ext4 -o ro \"/dev/$in\" /inputs; \
    exec /bin/sh /inputs/build.sh \"/dev/$out\"";

/// The builder VM's vCPUs: two on hardware KVM; one on the emulated tier, whose test
/// host has a single emulated CPU: two vCPUs there take turns on it, and one that
/// spins on a lock the other holds burns its whole turn (builds stalled for minutes in
/// dpkg's configure step that way, now and then).
fn builder_cpus(asked: Option<Tier>) -> u8 {
    let facts = crate::backend::detect::HostFacts::probe();
    match crate::run::execute::choose_tier(asked, &facts) {
        Ok(Tier::Kvm) => 2,
        _ => 1,
    }
}

/// Runs the builder VM `builder` over `inputs` with an output disk of `out_mib`.
pub(in crate::image) fn run_builder(
    builder: &StoredImage,
    builder_ref: &str,
    inputs: &crate::run::PinnedFile,
    out: &Path,
    out_mib: u32,
    options: &AssembleOptions,
) -> Result<BuilderRun, AssembleError> {
    let file = std::fs::File::create(out).map_err(|source| AssembleError::Io {
        path: out.to_owned(),
        source,
    })?;
    file.set_len(u64::from(out_mib) << 20)
        .map_err(|source| AssembleError::Io {
            path: out.to_owned(),
            source,
        })?;
    drop(file);
    let argv = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        GUEST_COMMAND.to_owned(),
    ];
    let cpus = builder_cpus(options.backend);
    let request = RunRequest {
        image: builder_ref.to_owned(),
        cpus,
        mem_mib: BUILDER_MEM_MIB,
        timeout_secs: Some(options.timeout_secs),
        argv: argv.clone(),
        secrets: Vec::new(),
        substitutions: Vec::new(),
        forwards: Vec::new(),
        disks: vec![inputs.clone()],
        scratch_disks: vec![ScratchFile {
            path: out.to_owned(),
            disk: ScratchDisk {
                name: "output".into(),
                size_mib: out_mib,
            },
        }],
    };
    let run_options = RunOptions {
        backend: options.backend,
        image: builder.digest.clone(),
        request,
        receipt: None,
        dev: false,
        net: Default::default(),
        forward_signals: true,
        cold: false,
        restore_plan: None,
    };
    let spec = RunSpec {
        argv,
        env: Default::default(),
        workdir: Some("/".into()),
        cpus,
        mem_mib: BUILDER_MEM_MIB,
        timeout_secs: Some(options.timeout_secs),
        stdin: StdinMode::Null,
        disks: Vec::new(),
        ready_timeout_secs: 120,
        net: None,
        egress_trust: None,
    };
    let mut log = BuildLog::new();
    let outcome = execute(&run_options, &spec, &mut log, None)?;
    let status = outcome.status;
    let plan_id = outcome.plan_id.unwrap_or_default();
    if status.code != Some(0) {
        let how = if status.timed_out {
            format!("timed out after {} s", options.timeout_secs)
        } else if let Some(sig) = status.signal {
            format!("killed by signal {sig}")
        } else {
            format!("exit status {}", status.code.unwrap_or(-1))
        };
        return Err(AssembleError::Failed {
            status: how,
            log: log.tail(),
        });
    }
    Ok(BuilderRun {
        plan_id,
        results: log.results,
    })
}

/// Appends `image_built` to the host's audit log: the image, its digest, lock and
/// root hash, and the builder VM's plan (whose own records precede it).
pub(in crate::image) fn record_build(
    image: &StoredImage,
    plan_id: &str,
) -> Result<(), AssembleError> {
    let audit_err = |e: String| AssembleError::Tool {
        tool: "audit log",
        reason: e,
    };
    let config = crate::admission::keys::config_dir().map_err(|e| audit_err(e.to_string()))?;
    let data = super::store::data_dir()?;
    let (keys, _) = crate::admission::HostKeys::load_or_create(&config)
        .map_err(|e| audit_err(e.to_string()))?;
    let log = crate::audit::AuditLog::new(data.join(crate::audit::AUDIT_FILE), keys.audit.clone());
    let rootfs = image.manifest.rootfs.as_ref();
    let event = crate::audit::AuditEvent::new(crate::audit::EventKind::ImageBuilt)
        .plan(plan_id)
        .field("digest", image.digest.as_str())
        .field(
            "lock_sha256",
            image.manifest.lock_sha256.clone().unwrap_or_default(),
        )
        .field(
            "root_hash",
            rootfs
                .map(|r| r.verity.root_hash.to_string())
                .unwrap_or_default(),
        );
    log.append(event).map_err(|e| audit_err(e.to_string()))?;
    Ok(())
}

/// The image of `spec` built in `builder` (`None`: on the bare initramfs, for the
/// builder's own first build), stored under the spec's name.
pub fn assemble(
    spec: &LoadedSpec,
    lock: &Lock,
    lock_bytes: &[u8],
    builder: Option<&StoredImage>,
    options: &AssembleOptions,
) -> Result<Assembled, AssembleError> {
    let store = ImageStore::open_default()?;
    let base = store.resolve(super::DEFAULT_IMAGE)?;
    let lock_sha256 = Lock::digest_of(lock_bytes);
    let (debs, fetched_bytes) = fetch_packages(lock, spec.dir(), options.progress)?;
    let mut key = sha2::Sha256::default();
    {
        use sha2::Digest;
        key.update(lock_sha256.as_bytes());
        key.update(base.digest.as_bytes());
        key.update(builder.map_or("", |b| b.digest.as_str()).as_bytes());
        key.update(inputs::BUILD_SH.as_bytes());
        key.update(ASSEMBLY_VERSION.to_le_bytes());
    }
    let key = {
        use sha2::Digest;
        hex::encode(key.finalize())
    };
    if !options.rebuild {
        if let Some(image) = from_build_cache(&store, &spec.spec.image.name, &key)? {
            say(&format!(
                "{}: built before from the same lock, base and builder (build cache)",
                spec.spec.image.name
            ));
            return Ok(Assembled {
                image,
                cached: true,
                fetched_bytes,
            });
        }
    }
    let work = WorkDir::claim(&key)?;
    let result = assemble_in(
        spec,
        lock,
        &lock_sha256,
        &debs,
        &base,
        builder,
        options,
        work.path(),
    );
    drop(work);
    let image = result?;
    to_build_cache(&image, &key);
    Ok(Assembled {
        image,
        cached: false,
        fetched_bytes,
    })
}

/// Where finished builds are kept, by the hash of their inputs (the lock, the base
/// image, the builder image, `build.sh`): `~/.cache/mvm/images/<key>`.
fn build_cache_dir(key: &str) -> Result<PathBuf, AssembleError> {
    Ok(super::store::cache_dir()?.join("images").join(key))
}

/// The image of build `key` from the build cache, stored under `name`. The manifest
/// and its artifacts are checked as any stored image's; the root filesystem is
/// checked block by block when a VM reads it.
pub(in crate::image) fn from_build_cache(
    store: &ImageStore,
    name: &str,
    key: &str,
) -> Result<Option<StoredImage>, AssembleError> {
    let dir = build_cache_dir(key)?;
    let Ok(cached) = StoredImage::open_dir(&dir) else {
        return Ok(None);
    };
    if cached.verify().is_err() {
        return Ok(None);
    }
    let Some(rootfs) = &cached.manifest.rootfs else {
        return Ok(None);
    };
    let tree = format!("{}{}", rootfs.file, mvm_loader::verity::TREE_SUFFIX);
    let files: Vec<(String, PathBuf)> = [
        cached.manifest.kernel.file.clone(),
        cached.manifest.initramfs.file.clone(),
        rootfs.file.clone(),
        tree,
    ]
    .into_iter()
    .map(|f| {
        let path = dir.join(&f);
        (f, path)
    })
    .collect();
    let refs: Vec<(&str, &Path)> = files
        .iter()
        .map(|(f, p)| (f.as_str(), p.as_path()))
        .collect();
    Ok(Some(store.put_files(name, &cached.manifest, &refs)?))
}

/// Keeps a finished build in the build cache (best effort: a failure only costs a
/// rebuild later).
pub(in crate::image) fn to_build_cache(image: &StoredImage, key: &str) {
    let Ok(dir) = build_cache_dir(key) else {
        return;
    };
    if dir.join(super::manifest::MANIFEST_FILE).is_file() {
        return;
    }
    let tmp = dir.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let copied = std::fs::create_dir_all(&tmp).and_then(|()| {
        for entry in std::fs::read_dir(&image.dir)? {
            let entry = entry?;
            let dst = tmp.join(entry.file_name());
            if std::fs::hard_link(entry.path(), &dst).is_err() {
                std::fs::copy(entry.path(), &dst)?;
            }
        }
        std::fs::rename(&tmp, &dir)
    });
    if let Err(e) = copied {
        tracing::warn!("build cache {}: {e}", dir.display());
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

#[allow(clippy::too_many_arguments)]
fn assemble_in(
    spec: &LoadedSpec,
    lock: &Lock,
    lock_sha256: &str,
    debs: &[(LockedPackage, PathBuf)],
    base: &StoredImage,
    builder: Option<&StoredImage>,
    options: &AssembleOptions,
    work: &Path,
) -> Result<StoredImage, AssembleError> {
    let store = ImageStore::open_default()?;
    let staged = inputs::stage(spec, lock, debs, TARGET_MIB, work, &|m| {
        tracing::debug!("{m}")
    })?;
    // The builder VM: the builder image, or for its own first build the base image
    // with the builder's command line (root in the guest, no root disk).
    let vm = match builder {
        Some(b) => b.clone(),
        None => bootstrap_image(&store, base)?,
    };
    // The output holds at most what the tree may take.
    let out_mib = u32::try_from(TARGET_MIB + 64).unwrap_or(u32::MAX);
    let out = work.join("output.img");
    say(&format!(
        "building {} in a builder VM ({} packages, {} MiB)",
        spec.spec.image.name,
        debs.len(),
        staged.package_bytes.div_ceil(1 << 20)
    ));
    let plan_id = run_builder(&vm, &vm.digest, &staged.disk, &out, out_mib, options)?.plan_id;
    let len = output::erofs_len(&out)?;
    let rootfs = work.join(ROOTFS_FILE);
    let verity = output::extract(&out, len, &rootfs, lock_sha256)?;
    let _ = std::fs::remove_file(&out);
    let kind = spec.spec.image.kind;
    let mut cmdline = format!("{} {ROOT_CMDLINE}", base.manifest.cmdline);
    if kind == ImageKind::Builder {
        cmdline = format!("{cmdline} {BUILDER_CMDLINE}");
    }
    let mut inputs_list = vec![Input {
        name: "base-image".into(),
        sha256: base.digest.clone(),
        version: None,
    }];
    if let Some(b) = builder {
        inputs_list.push(Input {
            name: "builder-image".into(),
            sha256: b.digest.clone(),
            version: None,
        });
    }
    inputs_list.extend(lock.packages.iter().map(|p| Input {
        name: format!("deb:{}", p.name),
        sha256: format!("sha256:{}", p.sha256),
        version: Some(p.version.clone()),
    }));
    inputs_list.extend(spec.spec.files.iter().zip(&lock.files).map(|(f, l)| Input {
        name: format!("file:{}", f.dst),
        sha256: format!("sha256:{}", l.sha256),
        version: None,
    }));
    let manifest = rootfs_manifest(
        base,
        cmdline,
        inputs_list,
        verity,
        Some(lock_sha256.to_owned()),
        ImageConfig {
            env: spec.spec.image.env.clone(),
            workdir: spec.spec.image.workdir.clone(),
            cmd: spec.spec.image.cmd.clone(),
            entrypoint: Vec::new(),
            user: None,
            nix: None,
            kind,
        },
    );
    let stored = store_with_rootfs(
        &store,
        &spec.spec.image.name,
        base,
        &manifest,
        &rootfs,
        None,
    )?;
    record_build(&stored, &plan_id)?;
    Ok(stored)
}

/// The manifest of an image with a root disk: `base`'s kernel, initramfs and agent
/// port, the command line `cmdline`, the root filesystem `rootfs.erofs` with its tree
/// `verity`, and what it was made from.
pub(in crate::image) fn rootfs_manifest(
    base: &StoredImage,
    cmdline: String,
    inputs: Vec<Input>,
    verity: mvm_loader::verity::VerityParams,
    lock_sha256: Option<String>,
    config: ImageConfig,
) -> Manifest {
    Manifest {
        cmdline_sha256: super::manifest::sha256_digest(cmdline.as_bytes()),
        cmdline,
        inputs,
        rootfs: Some(Rootfs {
            file: ROOTFS_FILE.into(),
            fstype: "erofs".into(),
            verity,
        }),
        lock_sha256,
        config: Some(config),
        ..base.manifest.clone()
    }
}

/// Stores image `name`: `base`'s kernel (or `kernel`, when the image brings its own)
/// and initramfs, the root filesystem at `rootfs` (its dm-verity tree beside it) and
/// `manifest`, which names them.
pub(in crate::image) fn store_with_rootfs(
    store: &ImageStore,
    name: &str,
    base: &StoredImage,
    manifest: &Manifest,
    rootfs: &Path,
    kernel: Option<&Path>,
) -> Result<StoredImage, AssembleError> {
    let mut tree = rootfs.to_owned().into_os_string();
    tree.push(mvm_loader::verity::TREE_SUFFIX);
    let tree = PathBuf::from(tree);
    let tree_name = format!("{ROOTFS_FILE}{}", mvm_loader::verity::TREE_SUFFIX);
    let kernel = kernel.map_or_else(|| base.kernel_path(), Path::to_owned);
    let initramfs = base.initramfs_path();
    Ok(store.put_files(
        name,
        manifest,
        &[
            (base.manifest.kernel.file.as_str(), kernel.as_path()),
            (base.manifest.initramfs.file.as_str(), initramfs.as_path()),
            (ROOTFS_FILE, rootfs),
            (tree_name.as_str(), tree.as_path()),
        ],
    )?)
}

/// The base image with the builder's command line, stored as `mvm-bootstrap`.
fn bootstrap_image(store: &ImageStore, base: &StoredImage) -> Result<StoredImage, AssembleError> {
    let cmdline = format!("{} {BUILDER_CMDLINE}", base.manifest.cmdline);
    let manifest = Manifest {
        cmdline_sha256: super::manifest::sha256_digest(cmdline.as_bytes()),
        cmdline,
        ..base.manifest.clone()
    };
    let kernel = base.kernel_path();
    let initramfs = base.initramfs_path();
    Ok(store.put_files(
        "mvm-bootstrap",
        &manifest,
        &[
            (base.manifest.kernel.file.as_str(), kernel.as_path()),
            (base.manifest.initramfs.file.as_str(), initramfs.as_path()),
        ],
    )?)
}

/// `mvm image build PATH`: the spec at `path`, locked if needed, built in the
/// builder VM (built first if this machine has none for its lock). An image of the
/// same lock already in the store is reused unless `options.rebuild`.
pub fn build_spec(path: &Path, options: &AssembleOptions) -> Result<Assembled, AssembleError> {
    let spec = super::spec::load(path)?;
    let (lock, lock_bytes) = lock_for(&spec)?;
    let store = ImageStore::open_default()?;
    let lock_sha256 = Lock::digest_of(&lock_bytes);
    if !options.rebuild {
        let base = store.resolve(super::DEFAULT_IMAGE)?;
        if let Some(image) = find_by_lock(&store, &lock_sha256, &base.digest)? {
            store.name(&spec.spec.image.name, &image)?;
            return Ok(Assembled {
                image,
                cached: true,
                fetched_bytes: 0,
            });
        }
    }
    let builder = match spec.spec.image.kind {
        ImageKind::Builder => None,
        ImageKind::Workload => Some(builder::ensure(options)?),
    };
    assemble(&spec, &lock, &lock_bytes, builder.as_ref(), options)
}

/// An image in the store built from the lock of digest `lock_sha256` on the base
/// image `base` (same kernel and agent).
pub fn find_by_lock(
    store: &ImageStore,
    lock_sha256: &str,
    base: &str,
) -> Result<Option<StoredImage>, AssembleError> {
    Ok(store
        .list()?
        .into_iter()
        .map(|(image, _)| image)
        .find(|image| {
            image.manifest.lock_sha256.as_deref() == Some(lock_sha256)
                && image
                    .manifest
                    .inputs
                    .iter()
                    .any(|i| i.name == "base-image" && i.sha256 == base)
                && image.dir.join(ROOTFS_FILE).is_file()
        }))
}
