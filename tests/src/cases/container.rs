//! `container/*`: the container tier (`mvm run --backend container`) on this machine,
//! through the installed-style `mvm` of the artifacts: no VM, the image's tree in
//! namespaces under a seccomp filter (docs/backends.md). They run on the user's machine,
//! not in the test host, as root (which sets up what `container/unprivileged-user` runs
//! as an ordinary user).

use std::io::Write;
use std::process::{Command, Stdio};

use crate::case::{Case, CaseResult, Context, Failure};
use crate::cases::run::{describe, expect_code, image_store, mvm_with, output};
use crate::cases::sandbox::ok;
use crate::cases::secret::copy_default_image;
use crate::cases::tier::mvm;

/// The cases: each run starts a container (well under a second) and its checks.
pub const CASES: &[Case] = &[
    Case::user_host("container/refused-by-default", refused_by_default).limit_secs(120),
    Case::user_host("container/run", run).limit_secs(180),
    Case::user_host("container/escapes", escapes).limit_secs(180),
    Case::user_host("container/sandbox", sandbox).limit_secs(180),
    Case::user_host("container/tampered", tampered).limit_secs(120),
    Case::user_host("container/unprivileged-user", unprivileged_user).limit_secs(180),
    // In the test host (or on a machine with a KVM): a Linux with cgroup v2, which the
    // build machines (cgroup v1) are not.
    Case::kvm("container/memory-limit", memory_limit).limit_secs(240),
];

/// `mvm run`'s exit code when the policy refuses the plan.
const DENIED: i32 = 119;
/// `mvm run`'s exit code when the start is refused (a measurement differs).
const BOOT_REFUSED: i32 = 118;
/// The first host uid the container's users map onto (`backend::container::UID_BASE`).
const UID_BASE: u32 = 0x5d00_0000;

fn need_root() -> CaseResult {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure::new(
            "these cases set up users and policies as root: run scripts/e2e as root",
        ));
    }
    Ok(())
}

/// The case's policy: the default, with the container tier allowed.
fn allow_container(ctx: &Context) -> CaseResult {
    let config = ctx.work_file("config");
    std::fs::create_dir_all(&config).map_err(|e| Failure::new(format!("{e}")))?;
    std::fs::write(
        config.join("policy.toml"),
        "[tier]\nminimum = \"container\"\n",
    )
    .map_err(|e| Failure::new(format!("writing the policy: {e}")))
}

/// The audit log's lines after the first `from`.
fn audit_after(ctx: &Context, from: usize) -> Result<Vec<String>, Failure> {
    let log = image_store(ctx)?.join("audit.jsonl");
    Ok(std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .skip(from)
        .map(str::to_owned)
        .collect())
}

/// Processes of this host running as a container's user (they outlived the run).
fn container_processes() -> Vec<u32> {
    processes_with_uid(|uid| uid >= UID_BASE)
}

/// Processes of this host whose real uid `matches`, zombies aside (a supervisor that
/// `mvm` left to run on is adopted by the harness, which reaps it only when it ends).
fn processes_with_uid(matches: impl Fn(u32) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .filter(|s| !s.lines().any(|l| l.starts_with("State:\tZ")))
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
                })
                .is_some_and(&matches)
        })
        .collect()
}

/// The default policy's minimum tier is `emulated`: a container run is refused before
/// anything starts (exit 119), naming the rule.
fn refused_by_default(ctx: &Context) -> CaseResult {
    need_root()?;
    let out = output(mvm(ctx, "run", &["--backend", "container", "--", "true"])?)?;
    expect_code(&out, DENIED)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.contains("tier") {
        return Err(
            Failure::new("the refusal does not name the tier rule").with_detail(describe(&out))
        );
    }
    Ok(())
}

/// With the policy allowing it: a command's output, exit code and `--json` (tier
/// `container`), the workload as uid 1000 on host `mvm`, stdin piped through, the
/// start audited as `boot_verified` with the tier, and nothing left running.
fn run(ctx: &Context) -> CaseResult {
    need_root()?;
    allow_container(ctx)?;
    let before = audit_after(ctx, 0)?.len();
    let script = "echo hi; echo oops >&2; id -u; hostname; cat; exit 3";
    let mut command = mvm(
        ctx,
        "run",
        &["--backend", "container", "--json", "--", "sh", "-c", script],
    )?;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| Failure::new(format!("starting mvm: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(b"piped in\n")
            .map_err(|e| Failure::new(format!("writing stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for mvm: {e}")))?;
    expect_code(&out, 3)?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("--json output is not JSON: {e}")).with_detail(describe(&out))
    })?;
    let field = |name: &str| value.get(name).cloned().unwrap_or_default();
    if field("stdout") != "hi\n1000\nmvm\npiped in\n"
        || field("stderr") != "oops\n"
        || field("tier") != "container"
    {
        return Err(Failure::new(format!("unexpected result: {value}")));
    }
    let records = audit_after(ctx, before)?;
    let verified = records
        .iter()
        .any(|r| r.contains("\"boot_verified\"") && r.contains("\"tier\":\"container\""));
    if !verified {
        return Err(Failure::new(format!(
            "no boot_verified with the container tier among the run's records: {records:?}"
        )));
    }
    let left = container_processes();
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "processes of the container's users left running: {left:?}"
        )));
    }
    Ok(())
}

/// `mvm-escape-probe` piped in and run as the workload: mounts, new namespaces, ptrace
/// of the agent (PID 1), kernel modules, kexec, bpf, userfaultfd, keyrings, a
/// `/proc/sys` write, swapon and perf events each fail; this host's hostname is
/// unchanged.
fn escapes(ctx: &Context) -> CaseResult {
    need_root()?;
    allow_container(ctx)?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    probe_escapes(ctx, |args| mvm(ctx, "run", args))?;
    let after = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if after != hostname {
        return Err(Failure::new(format!(
            "this host's hostname changed: {hostname:?} -> {after:?}"
        )));
    }
    Ok(())
}

/// Runs `mvm-escape-probe` as a container's workload through `run` (an `mvm run` of the
/// arguments given): each of its attempts (at least 14) must say it was denied.
fn probe_escapes(ctx: &Context, run: impl Fn(&[&str]) -> Result<Command, Failure>) -> CaseResult {
    let probe = std::fs::File::open(ctx.artifact("mvm-escape-probe")?)
        .map_err(|e| Failure::new(format!("the probe: {e}")))?;
    let script = "cat > /tmp/probe && chmod 755 /tmp/probe && /tmp/probe";
    let mut command = run(&["--backend", "container", "--", "sh", "-c", script])?;
    command.stdin(probe);
    let out = output(command)?;
    expect_code(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let allowed: Vec<&&str> = lines.iter().filter(|l| !l.contains(" denied ")).collect();
    if lines.len() < 14 || !allowed.is_empty() {
        return Err(
            Failure::new(format!("{} attempts, not denied: {allowed:?}", lines.len()))
                .with_detail(describe(&out)),
        );
    }
    Ok(())
}

/// A sandbox on the container tier: created, a command run in it as uid 1000 in
/// `/work`, a file copied in and read back, stopped; nothing of the container's users
/// left running.
fn sandbox(ctx: &Context) -> CaseResult {
    need_root()?;
    allow_container(ctx)?;
    let created = ok(ctx, &["create", "--backend", "container"])?;
    let id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    let result = (|| {
        let out = ok(ctx, &["exec", &id, "--", "sh", "-c", "echo in; pwd; id -u"])?;
        if out.stdout != b"in\n/work\n1000\n" {
            return Err(Failure::new("exec printed something else").with_detail(describe(&out)));
        }
        let file = ctx.work_file("copied.txt");
        std::fs::write(&file, b"copied in\n").map_err(|e| Failure::new(format!("{e}")))?;
        let to = format!("{id}:/work/copied.txt");
        ok(ctx, &["cp", &file.display().to_string(), &to])?;
        let out = ok(ctx, &["exec", &id, "--", "cat", "/work/copied.txt"])?;
        if out.stdout != b"copied in\n" {
            return Err(
                Failure::new("the copied file reads back otherwise").with_detail(describe(&out))
            );
        }
        Ok(())
    })();
    let stopped = ok(ctx, &["stop", &id]);
    result?;
    stopped?;
    let left = container_processes();
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "processes of the container's users left running: {left:?}"
        )));
    }
    Ok(())
}

/// One byte of the image's initramfs changed after it was built (in a store of the
/// case's own): the container does not start (exit 118), the refusal names the
/// initramfs, and the audit log has `boot_refused` and no `exec_started`.
fn tampered(ctx: &Context) -> CaseResult {
    need_root()?;
    allow_container(ctx)?;
    let data = ctx.work_file("data");
    copy_default_image(&image_store(ctx)?.join("images"), &data.join("images"))?;
    let mut command = mvm_with(ctx, &data, &ctx.work_file("config"))?;
    command
        .args(["run", "--backend", "container", "--", "echo", "ran"])
        .stdin(Stdio::null());
    let out = output(command)?;
    expect_code(&out, BOOT_REFUSED)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.contains("initramfs") || !out.stdout.is_empty() {
        return Err(
            Failure::new("the refusal does not name the initramfs, or the workload ran")
                .with_detail(describe(&out)),
        );
    }
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap_or_default();
    if !audit.contains("\"boot_refused\"") || audit.contains("\"exec_started\"") {
        return Err(Failure::new(format!(
            "the audit log should hold boot_refused and no exec_started: {audit}"
        )));
    }
    Ok(())
}

/// The ordinary user `container/unprivileged-user` runs `mvm` as, its group, and the
/// first of its subordinate ids.
const USER: (u32, u32, u32) = (4747, 4848, 300_000);

/// An ordinary user (an account with 65536 subordinate ids in `/etc/subuid` and
/// `/etc/subgid`, given to it by files bound over this host's in the user's own mount
/// namespace) runs the container tier with its own policy allowing it and the image
/// from a shared store: `mvm doctor` judges the tier usable; the workload is uid 1000
/// inside, the user's subordinate id 999 outside (its `uid_map` says the container's
/// root is the user and the rest its range); the escape probe's attempts are each
/// denied; a sandbox of the user's runs a command and stops; the start is in the user's
/// audit log; no process of the user or its range is left, no run directory, and
/// nothing under the user's sandbox root that the user does not own.
fn unprivileged_user(ctx: &Context) -> CaseResult {
    use std::os::unix::fs::PermissionsExt;
    need_root()?;
    let (uid, gid, sub) = USER;
    let io = |what: String| move |e: std::io::Error| Failure::new(format!("{what}: {e}"));
    // Outside root's home, which the user may not enter: its own `mvm`, a shared store
    // holding the default image (as scripts/setup publishes one), its home.
    let base = RemovedOnDrop::create(format!("/tmp/mvm-e2e-user.{}", std::process::id()))
        .map_err(io("a directory for the user".into()))?;
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod".into()))?;
    let mvm_bin = base.path().join("mvm");
    std::fs::copy(ctx.artifact(crate::cases::run::MVM)?, &mvm_bin)
        .map_err(io("copying mvm".into()))?;
    let system = base.path().join("system");
    copy_tree(&image_store(ctx)?.join("images"), &system.join("images"))?;
    let home = base.path().join("home");
    let runs = base.path().join("runs");
    let config = home.join(".config/mvm");
    std::fs::create_dir_all(&config).map_err(io("mkdir config".into()))?;
    std::fs::create_dir(&runs).map_err(io("mkdir runs".into()))?;
    std::fs::write(
        config.join("policy.toml"),
        "[tier]\nminimum = \"container\"\n",
    )
    .map_err(io("writing the policy".into()))?;
    for dir in [&home, &home.join(".config"), &config, &runs] {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io("chown".into()))?;
    }
    std::os::unix::fs::chown(config.join("policy.toml"), Some(uid), Some(gid))
        .map_err(io("chown".into()))?;
    let passwd = ctx.work_file("passwd");
    let host_passwd = std::fs::read_to_string("/etc/passwd").map_err(io("/etc/passwd".into()))?;
    std::fs::write(
        &passwd,
        format!(
            "{host_passwd}mvmtest:x:{uid}:{gid}::{}:/bin/sh\n",
            home.display()
        ),
    )
    .map_err(io("writing passwd".into()))?;
    let subids = ctx.work_file("subids");
    std::fs::write(&subids, format!("mvmtest:{sub}:65536\n"))
        .map_err(io("writing subids".into()))?;
    let user_mvm = |args: &[&str]| -> Result<Command, Failure> {
        let mut command = Command::new(&mvm_bin);
        command
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home)
            .env("MVM_RUN_DIR", &runs)
            .env("MVM_SYSTEM_DIR", &system)
            .args(args);
        crate::as_user::apply_with_files(
            &mut command,
            uid,
            gid,
            &[
                (&passwd, "/etc/passwd"),
                (&subids, "/etc/subuid"),
                (&subids, "/etc/subgid"),
            ],
        )?;
        Ok(command)
    };
    // `mvm doctor` judges the tier usable for this user.
    let mut command = user_mvm(&["doctor", "--json"])?;
    command.stdin(Stdio::null());
    let out = output(command)?;
    let doctor: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("doctor --json printed no JSON: {e}")).with_detail(describe(&out))
    })?;
    let container_usable = doctor
        .get("tiers")
        .and_then(|t| t.as_array())
        .and_then(|t| {
            t.iter()
                .find(|v| v.get("tier") == Some(&"container".into()))
        })
        .and_then(|v| v.get("usable"))
        .and_then(serde_json::Value::as_bool);
    if container_usable != Some(true) {
        return Err(Failure::new(format!(
            "mvm doctor does not judge the container tier usable for the user: {doctor}"
        )));
    }
    let script = "id -u; cat /proc/self/uid_map; echo kept > /work/f; cat /work/f";
    let mut command = user_mvm(&[
        "run",
        "--backend",
        "container",
        "--json",
        "--",
        "sh",
        "-c",
        script,
    ])?;
    command.stdin(Stdio::null());
    let out = output(command)?;
    expect_code(&out, 0)?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!("--json output is not JSON: {e}")).with_detail(describe(&out))
    })?;
    let stdout = value.get("stdout").and_then(|v| v.as_str()).unwrap_or("");
    let map: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .take(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let (uid_s, sub_s) = (uid.to_string(), sub.to_string());
    let want_map = vec![
        vec!["0", uid_s.as_str(), "1"],
        vec!["1", sub_s.as_str(), "65535"],
    ];
    if stdout.lines().next() != Some("1000")
        || map != want_map
        || !stdout.ends_with("kept\n")
        || value.get("tier").and_then(|v| v.as_str()) != Some("container")
    {
        return Err(Failure::new(format!(
            "unexpected result (want uid 1000, the map {want_map:?}, tier container): {value}"
        )));
    }
    probe_escapes(ctx, |args| {
        let mut run = vec!["run"];
        run.extend_from_slice(args);
        user_mvm(&run)
    })?;
    // A sandbox of the user's: created, a command run in it, stopped.
    let mut command = user_mvm(&["sandbox", "create", "--backend", "container"])?;
    command.stdin(Stdio::null());
    let created = output(command)?;
    expect_code(&created, 0)?;
    let id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    let mut command = user_mvm(&["sandbox", "exec", &id, "--", "sh", "-c", "id -u; pwd"])?;
    command.stdin(Stdio::null());
    let exec = output(command);
    let mut command = user_mvm(&["sandbox", "stop", &id])?;
    command.stdin(Stdio::null());
    let stopped = output(command)?;
    let exec = exec?;
    expect_code(&exec, 0)?;
    if exec.stdout != b"1000\n/work\n" {
        return Err(
            Failure::new("the user's sandbox exec printed something else")
                .with_detail(describe(&exec)),
        );
    }
    expect_code(&stopped, 0)?;
    let audit = home.join(".local/share/mvm/audit.jsonl");
    let audited = std::fs::read_to_string(&audit).unwrap_or_default();
    if !audited
        .lines()
        .any(|r| r.contains("\"boot_verified\"") && r.contains("\"tier\":\"container\""))
    {
        return Err(Failure::new(format!(
            "no boot_verified with the container tier in the user's audit log ({})",
            audit.display()
        )));
    }
    // The sandbox's supervisor (the user's) ends just after `stop` answered.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut left = processes_with_uid(|u| u == uid || (sub..sub + 65536).contains(&u));
    while !left.is_empty() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(100));
        left = processes_with_uid(|u| u == uid || (sub..sub + 65536).contains(&u));
    }
    if !left.is_empty() {
        return Err(Failure::new(format!(
            "processes of the user or its subordinate ids left running: {left:?}"
        )));
    }
    // Each run's directory goes with it; the user's sandbox root stays (a stopped
    // sandbox's record is listed until removed), and all of it is the user's own.
    let sandboxes = runs.join(format!("mvm-sandboxes-{uid}"));
    let mut leftovers: Vec<_> = std::fs::read_dir(&runs)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| *p != sandboxes)
                .collect()
        })
        .unwrap_or_default();
    leftovers.extend(not_owned_by(&sandboxes, uid));
    if !leftovers.is_empty() {
        return Err(Failure::new(format!(
            "left in the run directory: {leftovers:?}"
        )));
    }
    Ok(())
}

/// Copies the directory tree `from` to `to` (regular files and directories; modes kept).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> CaseResult {
    let fail = |what: &std::path::Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| Failure::new(format!("copying {what}: {e}"))
    };
    std::fs::create_dir_all(to).map_err(fail(to))?;
    for entry in std::fs::read_dir(from).map_err(fail(from))? {
        let entry = entry.map_err(fail(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(fail(&src))?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(fail(&src))?;
        }
    }
    Ok(())
}

/// A directory made fresh, removed with everything in it when dropped.
struct RemovedOnDrop(std::path::PathBuf);

impl RemovedOnDrop {
    fn create(path: String) -> std::io::Result<Self> {
        let path = std::path::PathBuf::from(path);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where containers' cgroups go (`backend::container::limits`).
const CGROUP_PARENT: &str = "/sys/fs/cgroup/mvm";

/// The cgroups of containers under [`CGROUP_PARENT`].
fn container_cgroups() -> Vec<String> {
    std::fs::read_dir(CGROUP_PARENT)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with("mvm-container-"))
                .collect()
        })
        .unwrap_or_default()
}

/// On a host with cgroup v2, as root: a container of 64 MiB is in a cgroup of its own
/// (its `/proc/self/cgroup` is the namespace's root) bounded by its size: a workload
/// that takes memory without end (`tail /dev/zero` keeps one endless line) is ended by
/// the kernel's OOM killer inside it (exit 137, the run says the container met its
/// limits), a workload within its size runs, and no cgroup of a container is left.
fn memory_limit(ctx: &Context) -> CaseResult {
    need_root()?;
    if !std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
        return Err(Failure::new(
            "no cgroup v2 at /sys/fs/cgroup: this case needs a host with it (the test host has)",
        ));
    }
    allow_container(ctx)?;
    let in_64_mib = |script: &str| {
        output(mvm(
            ctx,
            "run",
            &[
                "--backend",
                "container",
                "--mem",
                "64",
                "--",
                "sh",
                "-c",
                script,
            ],
        )?)
    };
    let out = in_64_mib("cat /proc/self/cgroup; exec tail /dev/zero")?;
    expect_code(&out, 137)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.lines().next() != Some("0::/") || !stderr.contains("met its cgroup limits") {
        return Err(Failure::new(
            "want the cgroup namespace's root (0::/) and the run saying the container met its limits",
        )
        .with_detail(describe(&out)));
    }
    let out = in_64_mib("head -c 16777216 /dev/zero > /tmp/f && wc -c < /tmp/f")?;
    expect_code(&out, 0)?;
    if String::from_utf8_lossy(&out.stdout).trim() != "16777216" {
        return Err(
            Failure::new("16 MiB in /tmp did not fit a 64 MiB container")
                .with_detail(describe(&out)),
        );
    }
    let left = container_cgroups();
    if !left.is_empty() {
        return Err(Failure::new(format!("containers' cgroups left: {left:?}")));
    }
    Ok(())
}

/// Everything under `dir` (itself included) that `uid` does not own.
fn not_owned_by(dir: &std::path::Path, uid: u32) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return out;
    };
    if meta.uid() != uid {
        out.push(dir.to_owned());
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            out.extend(not_owned_by(&entry.path(), uid));
        }
    }
    out
}
