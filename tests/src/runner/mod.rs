//! Running the selected cases and reporting one line each, then the tally.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::case::{Case, Context, Failure};
use crate::pattern::Pattern;

pub mod descendants;

/// The outcome of one case.
#[derive(Debug)]
pub struct Outcome {
    /// The case's name.
    pub name: &'static str,
    /// Seconds it took.
    pub seconds: f64,
    /// `Ok` or why it failed.
    pub result: Result<(), Failure>,
}

/// The tally of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
}

impl Tally {
    /// A run succeeds when something ran and nothing failed.
    pub fn success(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }

    /// The last line of every run, exactly `N passed, N failed`.
    pub fn line(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }
}

/// The line printed for one outcome, plus any evidence lines under it.
pub fn outcome_lines(outcome: &Outcome) -> String {
    match &outcome.result {
        Ok(()) => format!("PASS {} ({:.1}s)\n", outcome.name, outcome.seconds),
        Err(f) => {
            let mut s = format!(
                "FAIL {} ({:.1}s): {}\n",
                outcome.name, outcome.seconds, f.reason
            );
            s.push_str(&f.detail);
            s
        }
    }
}

/// How the runner runs each case.
#[derive(Debug, Clone)]
pub enum Isolation {
    /// In this process, one after the other, with no time limit (the
    /// runner's unit tests, and `mvm-e2e --one NAME` in a case's own process).
    InProcess,
    /// Each case in a child process `EXE --artifacts A --work W --one NAME`, in
    /// its own process group, killed with everything it started when it
    /// passes its time limit; the run goes on with the next case.
    Subprocess {
        /// The runner binary to start for each case (`mvm-e2e`).
        exe: PathBuf,
        /// A limit for every case in place of each case's own.
        limit: Option<Duration>,
    },
}

/// Runs every case in `cases` that `pattern` selects, printing each
/// outcome to `out` as it finishes and the tally at the end. Each case gets
/// a fresh directory `work_root/<name with / as ->`, removed once it passed
/// (run in a child process; kept when it failed).
pub fn run(
    cases: &[Case],
    pattern: &Pattern,
    artifacts: &Path,
    work_root: &Path,
    out: &mut dyn Write,
    isolation: &Isolation,
) -> Tally {
    if matches!(isolation, Isolation::Subprocess { .. }) {
        descendants::become_subreaper();
    }
    let mut tally = Tally::default();
    for case in cases.iter().filter(|c| pattern.matches(c.name)) {
        let passed = match isolation {
            Isolation::InProcess => run_here(case, artifacts, work_root, out),
            Isolation::Subprocess { exe, limit } => run_in_child(
                case,
                exe,
                artifacts,
                work_root,
                limit.unwrap_or(case.limit),
                out,
            ),
        };
        if passed {
            tally.passed += 1;
            // A passed case's files are of no more use, and in the test host they are
            // in its memory (2 GiB, shared with every later case's VMs): the snapshot
            // cases alone leave hundreds of MiB. A failed case's stay for a look.
            if matches!(isolation, Isolation::Subprocess { .. }) {
                let _ = std::fs::remove_dir_all(case_work_dir(work_root, case));
            }
        } else {
            tally.failed += 1;
        }
    }
    let _ = writeln!(out, "{}", tally.line());
    let _ = out.flush();
    tally
}

/// Runs `case` in this process and prints its outcome; true if it passed.
pub fn run_here(case: &Case, artifacts: &Path, work_root: &Path, out: &mut dyn Write) -> bool {
    let start = Instant::now();
    let result = run_one(case, artifacts, &case_work_dir(work_root, case));
    let outcome = Outcome {
        name: case.name,
        seconds: start.elapsed().as_secs_f64(),
        result,
    };
    // The console is the only channel out of the test host: keep going
    // even if a write fails.
    let _ = out.write_all(outcome_lines(&outcome).as_bytes());
    let _ = out.flush();
    outcome.result.is_ok()
}

/// A case's own work directory under `work_root`.
pub fn case_work_dir(work_root: &Path, case: &Case) -> PathBuf {
    work_root.join(case.name.replace('/', "-"))
}

/// How often the runner looks at a running case.
const POLL: Duration = Duration::from_millis(50);

/// Runs `case` as `exe ... --one NAME` and waits at most `limit`; true if it
/// passed. The child prints its own outcome; the runner prints one only
/// when the child could not (timed out, crashed, never started).
fn run_in_child(
    case: &Case,
    exe: &Path,
    artifacts: &Path,
    work_root: &Path,
    limit: Duration,
    out: &mut dyn Write,
) -> bool {
    let _ = out.flush();
    let start = Instant::now();
    let spawned = Command::new(exe)
        .arg("--artifacts")
        .arg(artifacts)
        .arg("--work")
        .arg(work_root)
        .arg("--one")
        .arg(case.name)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = writeln!(
                out,
                "FAIL {} (0.0s): start {}: {e}",
                case.name,
                exe.display()
            );
            return false;
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= limit => break None,
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                let _ = writeln!(out, "note: waiting for {}: {e}", case.name);
                break None;
            }
        }
    };
    let passed = match status {
        None => {
            descendants::kill_group(child.id());
            let _ = child.wait();
            let _ = writeln!(
                out,
                "FAIL {} (timed out after {} s)",
                case.name,
                limit.as_secs()
            );
            false
        }
        Some(status) if status.success() => true,
        // The child printed its FAIL line and exited 1.
        Some(status) if status.code() == Some(1) => false,
        Some(status) => {
            let _ = writeln!(
                out,
                "FAIL {} ({:.1}s): the case's process ended with {status}",
                case.name,
                start.elapsed().as_secs_f64()
            );
            false
        }
    };
    // Whatever the case started and left behind (a VMM whose parent died, a
    // daemon) was reparented to this runner, its subreaper: nothing outlives
    // its case.
    let left = descendants::kill_all();
    if left > 0 {
        let _ = writeln!(
            out,
            "note: {}: killed {left} process(es) it left behind",
            case.name
        );
    }
    let _ = out.flush();
    passed
}

fn run_one(case: &Case, artifacts: &Path, work: &Path) -> Result<(), Failure> {
    if case.needs_kvm {
        crate::kvm::check_usable().map_err(Failure::new)?;
    }
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)
        .map_err(|e| Failure::new(format!("create work dir {}: {e}", work.display())))?;
    let ctx = Context {
        artifacts: artifacts.to_path_buf(),
        work: work.to_path_buf(),
    };
    // A case that panics (a bug in the case) is a failure, not the end of
    // the run.
    match std::panic::catch_unwind(|| (case.run)(&ctx)) {
        Ok(result) => result,
        Err(_) => Err(Failure::new("case panicked")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::check;

    fn ok_case(_: &Context) -> Result<(), Failure> {
        Ok(())
    }
    fn failing_case(_: &Context) -> Result<(), Failure> {
        check(false, || "value was 3".into())
    }
    #[allow(clippy::panic)]
    fn panicking_case(_: &Context) -> Result<(), Failure> {
        panic!("boom")
    }

    const CASES: [Case; 3] = [
        Case::host("t/ok", ok_case),
        Case::host("t/fails", failing_case),
        Case::host("u/panics", panicking_case),
    ];

    fn run_to_string(pattern: &str) -> (Tally, String) {
        let work =
            std::env::temp_dir().join(format!("mvm-tests-runner-{}-{pattern}", std::process::id()));
        let mut out = Vec::new();
        let tally = run(
            &CASES,
            &Pattern::parse(pattern),
            Path::new("/nonexistent"),
            &work,
            &mut out,
            &Isolation::InProcess,
        );
        let _ = std::fs::remove_dir_all(&work);
        (tally, String::from_utf8(out).unwrap())
    }

    #[test]
    fn prints_one_line_per_case_and_the_tally() {
        let (tally, out) = run_to_string("t/");
        assert_eq!(
            tally,
            Tally {
                passed: 1,
                failed: 1
            }
        );
        assert!(!tally.success());
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("PASS t/ok ("), "{out}");
        assert!(lines[1].starts_with("FAIL t/fails ("), "{out}");
        assert!(lines[1].ends_with("): value was 3"), "{out}");
        assert_eq!(lines[2], "1 passed, 1 failed");
    }

    #[test]
    fn a_panicking_case_fails_and_the_run_goes_on() {
        let (tally, out) = run_to_string("u/");
        assert_eq!(
            tally,
            Tally {
                passed: 0,
                failed: 1
            }
        );
        assert!(out.contains("FAIL u/panics"), "{out}");
    }

    #[test]
    fn nothing_selected_is_not_success() {
        let (tally, out) = run_to_string("nomatch");
        assert_eq!(tally, Tally::default());
        assert!(!tally.success());
        assert_eq!(out, "0 passed, 0 failed\n");
    }
}
