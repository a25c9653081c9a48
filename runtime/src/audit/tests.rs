use std::fs;
use std::sync::{Arc, Barrier};

use ed25519_dalek::SigningKey;
use mvm_loader::measure::sha256;
use mvm_loader::plan::UtcTime;

use super::*;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

fn at(secs: i64) -> UtcTime {
    UtcTime::from_unix(1_800_000_000 + secs).unwrap()
}

/// A log of `n` records in a fresh directory.
fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::new(&path, key());
    for i in 1..=n {
        let event = AuditEvent::new(EventKind::ExecExited)
            .plan("plan-1")
            .vm(format!("vm-{}", i % 2))
            .field("exit_status", i)
            .field("stdout_sha256", sha256(&i.to_le_bytes()));
        assert_eq!(
            log.append_at(event, at(i64::try_from(i).unwrap())).unwrap(),
            i
        );
    }
    (dir, path)
}

fn lines(path: &Path) -> Vec<Vec<u8>> {
    fs::read(path)
        .unwrap()
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn bad_record(path: &Path) -> (u64, Option<u64>, Problem) {
    match verify_log(path, &key().verifying_key()) {
        Err(AuditError::BadRecord {
            line, seq, problem, ..
        }) => (line, seq, problem),
        other => panic!("expected a bad record, got {other:?}"),
    }
}

#[test]
fn an_untouched_log_verifies() {
    let (_dir, path) = log_with(5);
    let summary = verify_log(&path, &key().verifying_key()).unwrap();
    assert_eq!(summary.records, 5);
    let last = lines(&path).pop().unwrap();
    assert_eq!(summary.last_hash, sha256(&last[..last.len() - 1]));
    let text = fs::read_to_string(&path).unwrap();
    let first = &read_records(&path, None).unwrap()[0];
    assert_eq!(
        first.to_string(),
        format!(
            "     1 2027-01-15T08:00:01Z exec_exited plan=plan-1 vm=vm-1 exit_status=1 stdout_sha256={}",
            sha256(&1u64.to_le_bytes())
        )
    );
    assert!(text.starts_with("{\"seq\":1,\"time\":\"2027-01-15T08:00:01Z\",\"event\":\"exec_exited\",\"plan_id\":\"plan-1\""), "{text}");
}

#[test]
fn every_single_byte_edit_is_caught_at_that_record() {
    let (_dir, path) = log_with(3);
    let original = fs::read(&path).unwrap();
    let first_len = lines(&path)[0].len();
    let second_len = lines(&path)[1].len();
    // Every byte of record 2, including its newline.
    for offset in first_len..first_len + second_len {
        for flip in [0x01u8, 0x20] {
            let mut bytes = original.clone();
            bytes[offset] ^= flip;
            fs::write(&path, &bytes).unwrap();
            let (line, _, problem) = bad_record(&path);
            // Breaking record 2's newline merges it with record 3: still line 2.
            assert_eq!(line, 2, "byte {offset} ^ {flip:#x}: {problem}");
        }
    }
}

#[test]
fn a_deleted_record_is_named() {
    let (_dir, path) = log_with(5);
    let mut all = lines(&path);
    all.remove(2); // seq 3
    fs::write(&path, all.concat()).unwrap();
    let (line, seq, problem) = bad_record(&path);
    assert_eq!((line, seq), (3, Some(4)));
    assert_eq!(
        problem,
        Problem::Sequence {
            found: 4,
            expected: 3
        }
    );
    // Deleting the first record is caught too.
    let (_dir2, path2) = log_with(3);
    let mut all = lines(&path2);
    all.remove(0);
    fs::write(&path2, all.concat()).unwrap();
    assert_eq!(bad_record(&path2).0, 1);
}

#[test]
fn swapped_records_are_named() {
    let (_dir, path) = log_with(5);
    let mut all = lines(&path);
    all.swap(1, 2);
    fs::write(&path, all.concat()).unwrap();
    let (line, seq, problem) = bad_record(&path);
    assert_eq!((line, seq), (2, Some(3)));
    assert!(matches!(
        problem,
        Problem::Sequence {
            found: 3,
            expected: 2
        }
    ));
}

#[test]
fn renumbered_records_still_break_the_chain() {
    // Re-signing is impossible without the key, so edit seq and keep the old
    // signature: the signature check names the record.
    let (_dir, path) = log_with(3);
    let text = fs::read_to_string(&path)
        .unwrap()
        .replacen("{\"seq\":2,", "{\"seq\":7,", 1);
    fs::write(&path, text).unwrap();
    assert_eq!(bad_record(&path).2, Problem::BadSignature);
}

#[test]
fn truncation_mid_record_is_named_and_blocks_appends() {
    let (_dir, path) = log_with(4);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let (line, _, problem) = bad_record(&path);
    assert_eq!((line, problem), (4, Problem::Truncated));
    let log = AuditLog::new(&path, key());
    let err = log
        .append(AuditEvent::new(EventKind::VmExited))
        .unwrap_err();
    assert!(matches!(err, AuditError::TornTail { .. }), "{err}");
}

#[test]
fn a_record_signed_by_another_key_is_named() {
    let (_dir, path) = log_with(2);
    // An attacker appends a well-formed, chained record with their own key.
    let intruder = AuditLog::new(&path, SigningKey::from_bytes(&[1; 32]));
    intruder
        .append(AuditEvent::new(EventKind::VmExited))
        .unwrap();
    let (line, seq, problem) = bad_record(&path);
    assert_eq!((line, seq, problem), (3, Some(3), Problem::BadSignature));
}

#[test]
fn payload_sized_fields_and_bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::new(dir.path().join("a.jsonl"), key());
    let big = "x".repeat(record::MAX_TEXT_BYTES + 1);
    let err = log
        .append(AuditEvent::new(EventKind::FileWritten).field("content", big))
        .unwrap_err();
    assert!(err.to_string().contains("never payloads"), "{err}");
    assert!(log
        .append(AuditEvent::new(EventKind::FileWritten).field("Bad Name", 1u64))
        .is_err());
    assert!(
        !dir.path().join("a.jsonl").exists()
            || fs::read(dir.path().join("a.jsonl")).unwrap().is_empty()
    );
}

#[test]
fn concurrent_writers_with_separate_handles_never_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let writers = 8;
    let each = 25u64;
    let barrier = Arc::new(Barrier::new(writers));
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let path = path.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Each append opens its own file description, as a separate
                // process would.
                let log = AuditLog::new(path, key());
                barrier.wait();
                for i in 0..each {
                    log.append(
                        AuditEvent::new(EventKind::ExecStarted)
                            .vm(format!("vm-{w}"))
                            .field("n", i)
                            .field("padding", "p".repeat(700)),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let summary = verify_log(&path, &key().verifying_key()).unwrap();
    assert_eq!(summary.records, writers as u64 * each);
    let per_vm = read_records(&path, Some("vm-3")).unwrap();
    assert_eq!(per_vm.len() as u64, each);
    assert!(per_vm.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[test]
fn concurrent_writer_processes_never_interleave() {
    // Re-run this test binary as child writer processes (see the helper test
    // below), each appending through its own process and file handle.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "audit::tests::child_writer",
                    "--ignored",
                    "--nocapture",
                ])
                .env("MVM_AUDIT_TEST_LOG", &path)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let summary = verify_log(&path, &key().verifying_key()).unwrap();
    assert_eq!(summary.records, 4 * 25);
}

#[test]
#[ignore = "run only as a child of concurrent_writer_processes_never_interleave"]
fn child_writer() {
    let Some(path) = std::env::var_os("MVM_AUDIT_TEST_LOG") else {
        return;
    };
    let log = AuditLog::new(PathBuf::from(path), key());
    for i in 0..25u64 {
        log.append(AuditEvent::new(EventKind::ExecStarted).field("n", i))
            .unwrap();
    }
}
