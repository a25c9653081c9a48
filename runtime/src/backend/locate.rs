//! Finding the binaries and build outputs a backend needs, with an error that
//! says how to get each one.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::RunError;
use crate::image::elf;

/// Finds an executable called `name` on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The directory this `mvm` binary lives in.
fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .canonicalize()
        .ok()?
        .parent()
        .map(Path::to_owned)
}

/// The `mvm-vmm` to start: `$MVM_VMM`, else the one beside this `mvm`, else
/// the first on `PATH`.
pub fn vmm_binary() -> Result<PathBuf, RunError> {
    if let Some(path) = env_path("MVM_VMM") {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(RunError::Missing(format!(
                "MVM_VMM={} is not a file",
                path.display()
            )))
        };
    }
    exe_dir()
        .map(|d| d.join("mvm-vmm"))
        .filter(|p| p.is_file())
        .or_else(|| find_in_path("mvm-vmm"))
        .ok_or_else(|| {
            RunError::Missing(
                "mvm-vmm not found beside mvm or on PATH (cargo build -p mvm-vmm, or set MVM_VMM)"
                    .into(),
            )
        })
}

/// The file beside an installed `mvm` naming the checkout that built it
/// (written by `scripts/build-image`).
const CHECKOUT_FILE: &str = "mvm-checkout";

/// The project checkout, for its build scripts: `$MVM_REPO`, else the one
/// named in `mvm-checkout` beside this binary, else the first ancestor of
/// this binary or of the working directory that has `scripts/build-testhost`.
pub fn repo_root() -> Option<PathBuf> {
    if let Some(root) = env_path("MVM_REPO") {
        return Some(root);
    }
    let recorded = exe_dir()
        .and_then(|dir| std::fs::read_to_string(dir.join(CHECKOUT_FILE)).ok())
        .map(|text| PathBuf::from(text.trim()))
        .filter(|root| root.join("scripts/build-testhost").is_file());
    if recorded.is_some() {
        return recorded;
    }
    let starts = [exe_dir(), std::env::current_dir().ok()];
    starts.into_iter().flatten().find_map(|start| {
        start
            .ancestors()
            .find(|dir| dir.join("scripts/build-testhost").is_file())
            .map(Path::to_owned)
    })
}

/// Runs a project build script that prints its output directory on its last
/// line of stdout. `MVM_BIN` names this `mvm` to it, for the helpers the
/// scripts call (`mvm __cpio` in `scripts/build-testhost`) instead of
/// building one from the checkout.
pub fn run_build_script(name: &str) -> Result<PathBuf, RunError> {
    let root = repo_root().ok_or_else(|| {
        RunError::Missing(format!(
            "cannot find the mvm checkout to run scripts/{name} (set MVM_REPO)"
        ))
    })?;
    let script = root.join("scripts").join(name);
    let mut command = Command::new(&script);
    if let Ok(me) = std::env::current_exe() {
        command.env("MVM_BIN", me);
    }
    let out = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(RunError::io(format!("running {}", script.display())))?;
    if !out.status.success() {
        return Err(RunError::Missing(format!(
            "{} failed ({})",
            script.display(),
            out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text.lines().last().map(str::trim).unwrap_or_default();
    if dir.is_empty() || !Path::new(dir).is_dir() {
        return Err(RunError::Missing(format!(
            "{} printed no directory",
            script.display()
        )));
    }
    Ok(PathBuf::from(dir))
}

/// The machine's shared directory (`scripts/setup` publishes there) when this `mvm` is
/// the one installed in it (`<system>/bin/mvm`): an installed `mvm` uses what was
/// installed with it, a build from a checkout uses that checkout's scripts.
fn installed_system_dir() -> Option<PathBuf> {
    let system = crate::image::store::system_dir()?.canonicalize().ok()?;
    (exe_dir()? == system.join("bin")).then_some(system)
}

/// The test host (kernel `vmlinuz` and `base.cpio`): `$MVM_TESTHOST`, else the one
/// installed beside this `mvm` (`<system>/testhost`), else what `scripts/build-testhost`
/// prints (cached; fast after the first time).
pub fn testhost_dir() -> Result<PathBuf, RunError> {
    let installed = installed_system_dir()
        .map(|system| system.join("testhost"))
        .filter(|dir| dir.is_dir());
    let dir = match env_path("MVM_TESTHOST").or(installed) {
        Some(dir) => dir,
        None => run_build_script("build-testhost")?,
    };
    for file in ["vmlinuz", "base.cpio"] {
        if !dir.join(file).is_file() {
            return Err(RunError::Missing(format!(
                "test host {} has no {file} (rebuild: scripts/build-testhost)",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

fn is_static(path: &Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| elf::needs_interpreter(&bytes).ok())
        == Some(false)
}

/// The directory of the `mvm` on `PATH`, its links followed (where `scripts/setup`
/// installs it): what a program using the SDK, whose own binary is elsewhere, falls
/// back to.
fn installed_mvm_dir() -> Option<PathBuf> {
    find_in_path("mvm")?
        .canonicalize()
        .ok()?
        .parent()
        .map(Path::to_owned)
}

/// The `mvm` that supervises a sandbox: `$MVM_BIN`, else this binary when it
/// is `mvm`, else the `mvm` beside it or one directory up (a program embedding
/// the SDK, or an example, built in the same target directory), else the first
/// on `PATH`.
pub fn mvm_binary() -> Result<PathBuf, RunError> {
    if let Some(path) = env_path("MVM_BIN").filter(|p| p.is_file()) {
        return Ok(path);
    }
    let exe = std::env::current_exe().ok();
    if let Some(exe) = exe.filter(|e| e.file_name().is_some_and(|n| n == "mvm")) {
        return Ok(exe);
    }
    // Beside this program, or one up (cargo puts examples in target/*/examples/).
    exe_dir()
        .into_iter()
        .flat_map(|d| [d.join("mvm"), d.join("../mvm")])
        .find(|p| p.is_file())
        .or_else(|| find_in_path("mvm"))
        .ok_or_else(|| {
            RunError::Missing(
                "mvm not found beside this program or on PATH (cargo build -p mvm-runtime, or set MVM_BIN)"
                    .into(),
            )
        })
}

/// The static `mvm` and `mvm-vmm` that go into the test host:
/// `$MVM_STATIC_BIN_DIR`, else this binary's own directory, else the installed
/// `mvm`'s, whichever first has both static (as `scripts/build-image` builds them).
pub fn static_binaries() -> Result<(PathBuf, PathBuf), RunError> {
    let candidates = [
        env_path("MVM_STATIC_BIN_DIR"),
        exe_dir(),
        installed_mvm_dir(),
    ];
    for dir in candidates.into_iter().flatten() {
        let mvm = dir.join("mvm");
        let vmm = dir.join("mvm-vmm");
        if is_static(&mvm) && is_static(&vmm) {
            return Ok((mvm, vmm));
        }
    }
    Err(RunError::Missing(
        "the emulated backend needs static mvm and mvm-vmm binaries to carry into the test host: \
         run scripts/build-image (it builds them) and use its mvm, or set MVM_STATIC_BIN_DIR"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_not_static() {
        assert!(!is_static(Path::new("/bin/ls")));
        assert!(!is_static(Path::new("/nonexistent")));
        // busybox-static is installed by scripts/setup; without it this fails.
        assert!(
            is_static(Path::new("/bin/busybox")),
            "/bin/busybox (busybox-static)"
        );
    }
}
