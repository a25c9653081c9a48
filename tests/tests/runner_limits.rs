//! The runner's time limit, through the real `mvm-e2e` binary: a case that
//! hangs is reported by name once its limit passes, everything it started is
//! gone, and the run goes on with the next case.

use std::process::Command;

use mvm_tests::cases::selftest::GRANDCHILD_PID_FILE;

#[test]
fn a_hanging_case_is_named_killed_and_the_run_goes_on() {
    let work = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mvm-e2e"))
        .args(["--artifacts", "/nonexistent", "--work"])
        .arg(work.path())
        .arg("selftest")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.contains(&"FAIL selftest/hang (timed out after 3 s)"),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("PASS selftest/after-hang (")),
        "{stdout}"
    );
    assert_eq!(lines.last(), Some(&"1 passed, 1 failed"), "{stdout}");
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
    // The detached grandchild the hanging case started is gone too.
    let pid_file = work.path().join("selftest-hang").join(GRANDCHILD_PID_FILE);
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
    assert!(stat.is_err(), "grandchild {pid} still there: {stat:?}");
}
