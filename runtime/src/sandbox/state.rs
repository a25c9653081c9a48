//! Where sandboxes live on the host: one directory per sandbox under the
//! user's runtime directory, holding what it was asked for (`config.json`,
//! written once by `create`), what its supervisor says it is (`state.json`,
//! replaced atomically), its control socket (`ctl.sock`) and the supervisor's
//! log. Names are links in `names/` (created atomically, so two `create`s of
//! one name cannot both win).
//!
//! A sandbox whose supervisor was killed keeps its directory: [`Sandbox::liveness`]
//! finds it stale (the recorded process is gone, or is another process that
//! reused its pid), and `rm` cleans it.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use mvm_loader::plan::UtcTime;
use serde::{Deserialize, Serialize};

use super::SandboxError;
use crate::backend::Tier;

/// The directory under the runtime directory that holds every sandbox.
const ROOT_NAME: &str = "mvm-sandboxes";
/// The longest config or state file read back.
const MAX_STATE_BYTES: u64 = 64 << 10;

/// Where sandboxes live: `$MVM_RUN_DIR`, else `$XDG_RUNTIME_DIR`, else `/tmp`, then
/// `mvm-sandboxes-<uid>` (mode 0700): one per user, since the base may be a shared `/tmp`.
pub fn root() -> PathBuf {
    crate::backend::scratch::base_dir().join(format!("{ROOT_NAME}-{}", nix::unistd::getuid()))
}

/// Refuses a sandboxes directory this user does not own alone: in a shared `/tmp`, another
/// user could have made it first, and would then see this user's sockets, or plant a
/// sandbox whose socket receives this user's commands and files. Absent is fine.
fn check_root(root: &Path) -> Result<(), SandboxError> {
    match crate::backend::scratch::check_private_dir(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        checked => checked.map_err(|e| SandboxError::io("the sandboxes directory", e)),
    }
}

/// What a sandbox was created with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Its id (`sb-` and 16 hex digits).
    pub id: String,
    /// Its name, if it was given one.
    pub name: Option<String>,
    /// The image reference.
    pub image: String,
    /// The backend asked for (`None`: the best available).
    pub backend: Option<Tier>,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// How long it may live, in seconds (the plan's timeout).
    pub ttl_secs: u64,
    /// Development mode: no admission, nothing verified or audited.
    pub dev: bool,
    /// Stored secrets put into `/run/secrets/NAME` after the verified boot.
    pub secrets: Vec<String>,
    /// TCP forwards, host port to guest port (`-p HOST:GUEST`).
    #[serde(default)]
    pub ports: Vec<(u16, u16)>,
    /// Lives only while a client is connected, and its supervisor removes it at
    /// the end (`mvm run -it`).
    #[serde(default)]
    pub ephemeral: bool,
    /// Its network (`--net`, `--allow`, `--dns`).
    #[serde(default)]
    pub net: crate::net::run::NetFlags,
    /// Secrets it sees only as placeholders (`--secret NAME=PLACEHOLDER --for HOST`).
    #[serde(default)]
    pub substitutions: Vec<crate::secrets::SubstitutionRequest>,
    /// When `create` was asked.
    pub created: UtcTime,
}

impl SandboxConfig {
    /// Whether it has a network device (asked for, or implied by a substituted secret).
    #[must_use]
    pub fn has_network(&self) -> bool {
        self.net.wanted() || !self.substitutions.is_empty()
    }
}

/// Where a sandbox is in its life, as its supervisor last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Admission and boot in progress.
    Starting,
    /// The agent answered; requests are served.
    Ready,
    /// It stopped (asked to, or its TTL ended, or its VM exited).
    Stopped,
    /// It could not start, or its run failed.
    Failed,
    /// It is paused: its VM is a sealed snapshot on disk (`snapshot/`), no process
    /// runs for it, and `resume` starts it again from there.
    Paused,
}

/// What a sandbox's supervisor says about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxState {
    /// Where it is in its life.
    pub status: Status,
    /// The supervisor's pid.
    pub pid: u32,
    /// The supervisor's start time (`/proc/PID/stat` field 22), telling it apart
    /// from a later process with the same pid.
    pub pid_start: u64,
    /// The tier it runs on, once chosen.
    #[serde(default)]
    pub tier: Option<Tier>,
    /// When it became ready.
    #[serde(default)]
    pub ready_at: Option<UtcTime>,
    /// When its TTL ends.
    #[serde(default)]
    pub expires: Option<UtcTime>,
    /// Why it stopped (`stop`, `ttl`, `vm_exited`, `signal`) or failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// The exit status `mvm` uses for its failure.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The epoch of its latest snapshot (0: none yet). A snapshot older than this is
    /// a rollback and is refused.
    #[serde(default)]
    pub epoch: u64,
    /// While paused: how much of its TTL was left.
    #[serde(default)]
    pub ttl_left_secs: Option<u64>,
}

impl SandboxState {
    /// A sandbox starting under supervisor `pid`.
    pub fn starting(pid: u32) -> Self {
        Self {
            status: Status::Starting,
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            tier: None,
            ready_at: None,
            expires: None,
            reason: None,
            exit_code: None,
            epoch: 0,
            ttl_left_secs: None,
        }
    }
}

/// Whether a sandbox's supervisor is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// Starting or ready, its supervisor alive.
    Live,
    /// Stopped, failed or paused, as its supervisor recorded before it exited.
    Ended,
    /// Its supervisor is gone without recording an end (killed).
    Stale,
}

/// One sandbox's directory.
#[derive(Debug, Clone)]
pub struct Sandbox {
    dir: PathBuf,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, SandboxError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_STATE_BYTES).read_to_end(&mut bytes))
        .map_err(|e| SandboxError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| SandboxError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes `value` to `path` through a temporary file and a rename: a reader
/// sees the old contents or the new, never half.
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), SandboxError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
        file.write_all(&bytes)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        SandboxError::io(format!("writing {}", path.display()), e)
    })
}

/// The start time of process `pid` (clock ticks since boot), if it runs (a
/// zombie, dead but not reaped by whoever inherited it, does not).
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it are counted from the last ')'.
    let rest = stat.get(stat.rfind(')')?.checked_add(2)?..)?;
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Creates `path` (and parents) with mode 0700.
fn private_dir(path: &Path) -> Result<(), SandboxError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| SandboxError::io(format!("creating {}", path.display()), e))
}

/// The longest Unix socket path `bind` and `connect` take, with its NUL.
const SUN_PATH_MAX: usize = 108;

/// A Unix socket path that `bind` and `connect` accept for `path`, however deep
/// its directory: `path` itself when short enough, else the same file reached
/// through `/proc/self/fd/N/` of an open handle on its directory (kept open as
/// long as the returned guard lives).
pub fn socket_path(path: &Path) -> std::io::Result<(Option<std::fs::File>, PathBuf)> {
    if path.as_os_str().len() < SUN_PATH_MAX {
        return Ok((None, path.to_owned()));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok((None, path.to_owned()));
    };
    let handle = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&handle)
    ))
    .join(name);
    Ok((Some(handle), short))
}

/// Checks a sandbox name: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`, not an id's shape.
pub fn check_name(name: &str) -> Result<(), SandboxError> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !first_ok || !rest_ok || name.len() > 63 {
        return Err(SandboxError::BadName(format!(
            "{name:?}: a name is 1 to 63 of [A-Za-z0-9._-], starting with a letter or digit"
        )));
    }
    if name.starts_with("sb-") {
        return Err(SandboxError::BadName(format!(
            "{name:?}: names starting with sb- are ids"
        )));
    }
    Ok(())
}

impl Sandbox {
    /// The sandbox whose directory is `dir`.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Creates a new sandbox's directory under `root` with `config` in it, and
    /// its name link; fails if the name is taken.
    pub fn create_in(root: &Path, config: &SandboxConfig) -> Result<Self, SandboxError> {
        private_dir(root)?;
        check_root(root)?;
        let dir = root.join(&config.id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| SandboxError::io(format!("creating {}", dir.display()), e))?;
        let sandbox = Self { dir };
        if let Some(name) = &config.name {
            let names = root.join("names");
            private_dir(&names)?;
            if let Err(e) = std::os::unix::fs::symlink(&config.id, names.join(name)) {
                let _ = std::fs::remove_dir_all(&sandbox.dir);
                return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    let owner = std::fs::read_link(names.join(name))
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    SandboxError::NameTaken {
                        name: name.clone(),
                        id: owner,
                    }
                } else {
                    SandboxError::io(format!("naming {}", config.id), e)
                });
            }
        }
        write_json_atomic(&sandbox.dir.join("config.json"), config)?;
        Ok(sandbox)
    }

    /// The sandbox that `reference` (an id, a unique id prefix of at least 4
    /// hex digits after `sb-`, or a name) names under `root`.
    pub fn find_in(root: &Path, reference: &str) -> Result<Self, SandboxError> {
        check_root(root)?;
        let not_found = || SandboxError::NotFound(reference.to_owned());
        if reference.is_empty() || reference.contains('/') || reference.starts_with('.') {
            return Err(not_found());
        }
        if !reference.starts_with("sb-") {
            let link = root.join("names").join(reference);
            let id = std::fs::read_link(&link).map_err(|_| not_found())?;
            let dir = root.join(id);
            return dir.is_dir().then_some(Self { dir }).ok_or_else(not_found);
        }
        let exact = root.join(reference);
        if exact.join("config.json").is_file() {
            return Ok(Self { dir: exact });
        }
        if reference.len() < "sb-".len() + 4 {
            return Err(not_found());
        }
        let matches: Vec<PathBuf> = Self::list_dirs(root)
            .into_iter()
            .filter(|d| {
                d.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(reference))
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok(Self { dir: one.clone() }),
            [] => Err(not_found()),
            _ => Err(SandboxError::Ambiguous(reference.to_owned())),
        }
    }

    fn list_dirs(root: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("sb-"))
                    && p.join("config.json").is_file()
            })
            .collect();
        dirs.sort();
        dirs
    }

    /// Every sandbox under `root`.
    pub fn all_in(root: &Path) -> Vec<Self> {
        if let Err(e) = check_root(root) {
            tracing::warn!("sandboxes: {e}");
            return Vec::new();
        }
        Self::list_dirs(root)
            .into_iter()
            .map(|dir| Self { dir })
            .collect()
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    /// Takes the sandbox's lock (`lock`, exclusive, not waiting): one command at a
    /// time changes whether it runs. Released when the returned file is dropped.
    pub fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, SandboxError> {
        let path = self.dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| SandboxError::io(format!("opening {}", path.display()), e))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
            |(_, errno)| {
                SandboxError::io(
                    format!("locking {}", path.display()),
                    std::io::Error::other(format!(
                        "{errno}: another command is resuming or pausing this sandbox"
                    )),
                )
            },
        )
    }

    /// Its latest sealed snapshot (while paused).
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshot")
    }

    /// Where the running VM's next snapshot is written; renamed over
    /// [`Sandbox::snapshot_dir`] once sealed.
    pub fn next_snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshot-next")
    }

    /// Its supervisor's log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("supervisor.log")
    }

    /// What it was created with.
    pub fn config(&self) -> Result<SandboxConfig, SandboxError> {
        read_json(&self.dir.join("config.json"))
    }

    /// What its supervisor last said, if it said anything yet.
    pub fn state(&self) -> Result<Option<SandboxState>, SandboxError> {
        let path = self.dir.join("state.json");
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }

    /// Replaces its state (the supervisor's job).
    pub fn set_state(&self, state: &SandboxState) -> Result<(), SandboxError> {
        write_json_atomic(&self.dir.join("state.json"), state)
    }

    /// Whether its supervisor is still there.
    pub fn liveness(state: Option<&SandboxState>) -> Liveness {
        match state {
            Some(s) if matches!(s.status, Status::Stopped | Status::Failed | Status::Paused) => {
                Liveness::Ended
            }
            Some(s) if process_start(s.pid) == Some(s.pid_start) => Liveness::Live,
            _ => Liveness::Stale,
        }
    }

    /// Removes its directory and its name link.
    pub fn remove(self, root: &Path) -> Result<(), SandboxError> {
        if let Ok(config) = self.config() {
            if let Some(name) = config.name {
                let link = root.join("names").join(name);
                // Only the link that points here: a name reused since is another's.
                if std::fs::read_link(&link).is_ok_and(|target| target == Path::new(&config.id)) {
                    let _ = std::fs::remove_file(&link);
                }
            }
        }
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| SandboxError::io(format!("removing {}", self.dir.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: &str, name: Option<&str>) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            name: name.map(Into::into),
            image: "base".into(),
            backend: None,
            cpus: 1,
            mem_mib: 128,
            ttl_secs: 60,
            dev: false,
            secrets: vec![],
            ports: vec![],
            ephemeral: false,
            net: crate::net::run::NetFlags::default(),
            substitutions: vec![],
            created: UtcTime::now(),
        }
    }

    #[test]
    fn a_config_written_before_sandboxes_had_a_network_still_reads() {
        let mut value = serde_json::to_value(config("sb-0000000000000001", None)).unwrap();
        let object = value.as_object_mut().unwrap();
        object.remove("net");
        object.remove("substitutions");
        let old: SandboxConfig = serde_json::from_value(value).unwrap();
        assert!(!old.has_network());
        let mut networked = old.clone();
        networked.net.allow = vec![crate::net::allow::parse_allow("192.0.2.7:443").unwrap()];
        assert!(networked.has_network());
        let back: SandboxConfig =
            serde_json::from_str(&serde_json::to_string(&networked).unwrap()).unwrap();
        assert_eq!(back.net, networked.net);
    }

    /// A sandboxes directory another user could write (or a link to one) is neither used
    /// nor read: a planted sandbox's socket would get this user's commands.
    #[test]
    fn a_sandboxes_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        Sandbox::create_in(&open, &config("sb-00112233aabbccdd", None)).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(Sandbox::create_in(&open, &config("sb-10112233aabbccdd", None)).is_err());
        assert!(Sandbox::find_in(&open, "sb-00112233aabbccdd").is_err());
        assert!(Sandbox::all_in(&open).is_empty());
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(Sandbox::all_in(&open).len(), 1);
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        assert!(Sandbox::find_in(&link, "sb-00112233aabbccdd").is_err());
        assert!(root()
            .to_string_lossy()
            .ends_with(&format!("mvm-sandboxes-{}", nix::unistd::getuid())));
    }

    #[test]
    fn names_are_unique_and_found_like_ids_and_prefixes() {
        let root = tempfile::tempdir().unwrap();
        let a =
            Sandbox::create_in(root.path(), &config("sb-00112233aabbccdd", Some("web"))).unwrap();
        let err = Sandbox::create_in(root.path(), &config("sb-99112233aabbccdd", Some("web")))
            .unwrap_err();
        assert!(
            matches!(&err, SandboxError::NameTaken { id, .. } if id == "sb-00112233aabbccdd"),
            "{err}"
        );
        assert!(
            !root.path().join("sb-99112233aabbccdd").exists(),
            "the loser leaves nothing"
        );
        for reference in ["web", "sb-00112233aabbccdd", "sb-0011"] {
            let found = Sandbox::find_in(root.path(), reference).unwrap();
            assert_eq!(found.dir(), a.dir(), "{reference}");
        }
        for reference in ["sb-0", "nope", "../x", "sb-ffff", ""] {
            assert!(
                Sandbox::find_in(root.path(), reference).is_err(),
                "{reference}"
            );
        }
        Sandbox::create_in(root.path(), &config("sb-00119999aabbccdd", None)).unwrap();
        assert!(matches!(
            Sandbox::find_in(root.path(), "sb-0011"),
            Err(SandboxError::Ambiguous(_))
        ));
        assert_eq!(Sandbox::all_in(root.path()).len(), 2);
        a.remove(root.path()).unwrap();
        assert!(Sandbox::find_in(root.path(), "web").is_err());
        Sandbox::create_in(root.path(), &config("sb-77112233aabbccdd", Some("web"))).unwrap();
    }

    #[test]
    fn a_dead_supervisor_is_stale_and_a_recorded_end_is_not() {
        let me = std::process::id();
        let start = process_start(me).unwrap();
        let mut state = SandboxState {
            status: Status::Ready,
            pid: me,
            pid_start: start,
            tier: None,
            ready_at: None,
            expires: None,
            reason: None,
            exit_code: None,
            epoch: 0,
            ttl_left_secs: None,
        };
        assert_eq!(Sandbox::liveness(Some(&state)), Liveness::Live);
        state.pid_start = start + 1;
        assert_eq!(
            Sandbox::liveness(Some(&state)),
            Liveness::Stale,
            "pid reused"
        );
        state.status = Status::Stopped;
        assert_eq!(Sandbox::liveness(Some(&state)), Liveness::Ended);
        // Paused: no supervisor on purpose, and not stale.
        state.status = Status::Paused;
        assert_eq!(Sandbox::liveness(Some(&state)), Liveness::Ended);
        assert_eq!(Sandbox::liveness(None), Liveness::Stale);
    }

    #[test]
    fn a_socket_deep_in_the_tree_is_reached_through_its_directory_handle() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("ctl.sock");
        assert!(
            std::os::unix::net::UnixListener::bind(&path).is_err(),
            "too long to bind"
        );
        let (_guard, short) = socket_path(&path).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&short).unwrap();
        let (_guard2, again) = socket_path(&path).unwrap();
        std::os::unix::net::UnixStream::connect(again).unwrap();
        drop(listener);
        assert!(path.exists(), "the socket is where it was asked for");
        let short_path = root.path().join("s.sock");
        assert_eq!(socket_path(&short_path).unwrap().1, short_path);
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "web-1", "x.y_z"] {
            check_name(good).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "sb-1", "a b", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
