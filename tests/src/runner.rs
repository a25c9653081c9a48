//! Running the selected cases and reporting one line each, then the tally.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::case::{Case, Context, Failure};
use crate::pattern::Pattern;

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

/// Runs every case in `cases` that `pattern` selects, printing each
/// outcome to `out` as it finishes and the tally at the end. Each case gets
/// a fresh directory `work_root/<name with / as ->`.
pub fn run(
    cases: &[Case],
    pattern: &Pattern,
    artifacts: &Path,
    work_root: &Path,
    out: &mut dyn Write,
) -> Tally {
    let mut tally = Tally::default();
    for case in cases.iter().filter(|c| pattern.matches(c.name)) {
        let start = Instant::now();
        let result = run_one(
            case,
            artifacts,
            &work_root.join(case.name.replace('/', "-")),
        );
        let outcome = Outcome {
            name: case.name,
            seconds: start.elapsed().as_secs_f64(),
            result,
        };
        if outcome.result.is_ok() {
            tally.passed += 1;
        } else {
            tally.failed += 1;
        }
        // The console is the only channel out of the test host: keep going
        // even if a write fails.
        let _ = out.write_all(outcome_lines(&outcome).as_bytes());
        let _ = out.flush();
    }
    let _ = writeln!(out, "{}", tally.line());
    let _ = out.flush();
    tally
}

fn run_one(case: &Case, artifacts: &Path, work: &PathBuf) -> Result<(), Failure> {
    if case.needs_kvm {
        crate::kvm::check_usable().map_err(Failure::new)?;
    }
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)
        .map_err(|e| Failure::new(format!("create work dir {}: {e}", work.display())))?;
    let ctx = Context {
        artifacts: artifacts.to_path_buf(),
        work: work.clone(),
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
