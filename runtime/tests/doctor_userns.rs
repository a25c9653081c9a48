//! `mvm doctor` says whether this user may make a user namespace (the jail of an ordinary
//! user's `mvm-vmm` needs one). The "no" branch runs the real binary inside a user
//! namespace whose `user.max_user_namespaces` is 0 (`unshare -U -r`, util-linux): the host's
//! own setting is not touched.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

fn doctor_host(wrapper: Option<&str>) -> serde_json::Value {
    let mvm = env!("CARGO_BIN_EXE_mvm");
    let out = match wrapper {
        None => Command::new(mvm)
            .args(["doctor", "--json"])
            .output()
            .unwrap(),
        Some(script) => Command::new("unshare")
            .args(["-U", "-r", "sh", "-c", script, "sh", mvm])
            .output()
            .unwrap(),
    };
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    value["host"].clone()
}

#[test]
fn doctor_says_whether_user_namespaces_can_be_made() {
    let here = doctor_host(None);
    assert!(here["user_namespaces"].is_boolean(), "{here}");
    let forbidden = doctor_host(Some(
        "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$1\" doctor --json",
    ));
    assert_eq!(forbidden["user_namespaces"], false, "{forbidden}");
    let why = forbidden["user_namespaces_error"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("user.max_user_namespaces"), "{why}");
}
