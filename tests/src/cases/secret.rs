//! `secret/*`: a stored secret reaches the workload of a verified, measured boot as
//! `/run/secrets/NAME` (0400, the workload's uid, its own tmpfs), and a boot that is
//! refused gets none. In both, the value is searched for in everything mvm leaves on
//! the host (its output, the audit log, the receipt, `mvm secret ls`, the run
//! directories) and must not be found, in clear or in base64.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::audit::Homes;
use super::run::{audit_records, describe, events, expect_code, image_store, last_run, output};
use crate::case::{Case, CaseResult, Context, Failure};

/// The secret cases.
pub const CASES: &[Case] = &[
    Case::kvm("secret/released", released),
    Case::kvm("secret/refused-boot", refused_boot),
    // The user's own tier (emulated on these machines: the secret crosses the test
    // host's control port to the inner run): a QEMU boot, tens of seconds.
    Case::user_host("secret/users-tier", users_tier).limit_secs(420),
];

/// The secret's name, allowed by the case's policy.
const NAME: &str = "API_TOKEN";
/// `mvm run`'s exit status for a boot the VMM refused (runtime/src/run/exit.rs).
const EXIT_BOOT_REFUSED: i32 = 118;
/// The uid the agent runs a workload as, which owns its secrets.
const WORKLOAD_UID: &str = "1000";

fn fail(what: &str) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |e| Failure::new(format!("{what}: {e}"))
}

/// A value no file on the test host holds by chance.
pub(super) fn fresh_value() -> String {
    let mut bytes = [0u8; 12];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    format!("mvm-e2e-{}", hex::encode(bytes))
}

/// The policy allowing [`NAME`], and [`NAME`] stored with `value` through
/// `mvm secret set` (stdin, with the newline `echo` adds).
pub(super) fn store_secret(ctx: &Context, homes: &Homes, value: &str) -> CaseResult {
    std::fs::write(
        homes.config.join("policy.toml"),
        format!("[secrets]\nallow = [\"{NAME}\"]\n"),
    )
    .map_err(fail("writing the policy"))?;
    let mut command = homes.mvm(ctx, &["secret", "set", NAME])?;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(fail("starting mvm secret set"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{value}\n").as_bytes())
            .map_err(fail("writing the value"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(fail("waiting for mvm secret set"))?;
    expect_code(&out, 0)?;
    Ok(())
}

/// Fails if `value` (or its base64) is in `text`, naming `where_`.
pub(super) fn absent(value: &str, where_: &str, text: &str) -> CaseResult {
    let b64 = base64::engine::general_purpose::STANDARD.encode(value);
    if text.contains(value) || text.contains(&b64) {
        return Err(Failure::new(format!("the secret's value is in {where_}")));
    }
    Ok(())
}

/// Every file under `dir`, for the search.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files_under(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// The search: mvm's own output, the audit log, `mvm secret ls --json`, and every
/// file the case's runs left under its work directory except the store itself.
pub(super) fn search_host(
    ctx: &Context,
    homes: &Homes,
    value: &str,
    outputs: &[&Output],
) -> CaseResult {
    for (i, out) in outputs.iter().enumerate() {
        absent(
            value,
            &format!("mvm's stderr ({i})"),
            &String::from_utf8_lossy(&out.stderr),
        )?;
    }
    let ls = output(homes.mvm(ctx, &["secret", "ls", "--json"])?)?;
    expect_code(&ls, 0)?;
    let listed = String::from_utf8_lossy(&ls.stdout);
    if !listed.contains(NAME) {
        return Err(Failure::new(format!(
            "mvm secret ls --json does not list {NAME}: {listed}"
        )));
    }
    absent(value, "mvm secret ls --json", &listed)?;
    let store = homes.config.join("secrets");
    let mut files = Vec::new();
    files_under(&ctx.work, &mut files);
    for file in files.iter().filter(|f| !f.starts_with(&store)) {
        let bytes = std::fs::read(file).unwrap_or_default();
        absent(
            value,
            &file.display().to_string(),
            &String::from_utf8_lossy(&bytes),
        )?;
    }
    Ok(())
}

/// The statement a receipt envelope carries, parsed, and its payload's bytes (for the
/// search for a value).
pub(super) fn receipt_statement(receipt: &Path) -> Result<(Value, Vec<u8>), Failure> {
    let envelope: Value =
        serde_json::from_slice(&std::fs::read(receipt).map_err(fail("reading the receipt"))?)
            .map_err(|e| Failure::new(format!("receipt is not JSON: {e}")))?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(
            envelope
                .pointer("/payload")
                .and_then(Value::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| Failure::new(format!("receipt payload: {e}")))?;
    let statement: Value = serde_json::from_slice(&payload)
        .map_err(|e| Failure::new(format!("receipt statement: {e}")))?;
    Ok((statement, payload))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `mvm run --secret API_TOKEN --secret-env API_TOKEN`: the workload, as uid 1000, finds
/// the file 0400 and its own, on a tmpfs, holding the value, and the same value in its
/// environment (both compared by digest, so the value is never printed); the log has
/// `secret_released` (name and digest) between `boot_verified` and `exec_started`; the
/// receipt lists both deliveries; the value is nowhere on the host.
fn released(ctx: &Context) -> CaseResult {
    let homes = Homes::new(ctx)?;
    let value = fresh_value();
    store_secret(ctx, &homes, &value)?;
    let receipt = ctx.work_file("receipt.json");
    let receipt_arg = receipt.display().to_string();
    let script = format!(
        "id -u; stat -c '%a %u' /run/secrets/{NAME}; sha256sum < /run/secrets/{NAME}; \
         grep ' /run/secrets ' /proc/mounts | cut -d' ' -f3; \
         touch /run/secrets/planted 2>/dev/null && echo planted || echo not-planted; \
         printf %s \"${NAME}\" | sha256sum"
    );
    let out = output(homes.run(
        ctx,
        &[
            "--receipt",
            &receipt_arg,
            "--secret",
            NAME,
            "--secret-env",
            NAME,
            "--",
            "sh",
            "-c",
            &script,
        ],
    )?)?;
    expect_code(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    let want_sum = format!("{}  -", sha256_hex(value.as_bytes()));
    let want = [
        WORKLOAD_UID.to_owned(),
        format!("400 {WORKLOAD_UID}"),
        want_sum.clone(),
        "tmpfs".to_owned(),
        "not-planted".to_owned(),
        want_sum,
    ];
    if lines != want {
        return Err(
            Failure::new(format!("the workload saw {lines:?}, expected {want:?}"))
                .with_detail(describe(&out)),
        );
    }

    let records = last_run(&audit_records(&homes.log())?)?;
    let kinds = events(&records);
    let at = |kind: &str| kinds.iter().position(|k| k == kind);
    match (
        at("boot_verified"),
        at("secret_released"),
        at("exec_started"),
    ) {
        (Some(b), Some(s), Some(e)) if b < s && s < e => {}
        _ => {
            return Err(Failure::new(format!(
                "secret_released is not between boot_verified and exec_started: {kinds:?}"
            )))
        }
    }
    let want_digest = format!("sha256:{}", sha256_hex(value.as_bytes()));
    let record = records
        .iter()
        .find(|r| r.pointer("/event") == Some(&"secret_released".into()))
        .cloned()
        .unwrap_or_default();
    if record.pointer("/fields/name") != Some(&NAME.into())
        || record.pointer("/fields/value_sha256") != Some(&want_digest.clone().into())
    {
        return Err(Failure::new(format!("secret_released record: {record}")));
    }
    expect_code(&homes.verify(ctx, None)?, 0)?;

    let (statement, payload) = receipt_statement(&receipt)?;
    for (at, delivery) in [(0, "file"), (1, "env")] {
        let listed = statement
            .pointer(&format!("/predicate/secrets/{at}"))
            .cloned()
            .unwrap_or_default();
        if listed.pointer("/name") != Some(&NAME.into())
            || listed.pointer("/sha256") != Some(&want_digest.clone().into())
            || listed.pointer("/delivery") != Some(&delivery.into())
        {
            return Err(Failure::new(format!("the receipt's secrets: {statement}")));
        }
    }
    absent(
        &value,
        "the receipt's statement",
        &String::from_utf8_lossy(&payload),
    )?;
    // The workload's own stdout printed only the digest.
    absent(&value, "the workload's stdout", &stdout)?;
    search_host(ctx, &homes, &value, &[&out])
}

/// `mvm run --secret` on the tier this machine gives (no `--backend`): the workload
/// reads the value (compared by digest), and it is nowhere on the host.
fn users_tier(ctx: &Context) -> CaseResult {
    let homes = Homes::new(ctx)?;
    let value = fresh_value();
    store_secret(ctx, &homes, &value)?;
    let script = format!("sha256sum < /run/secrets/{NAME}");
    let out = output(homes.mvm(ctx, &["run", "--secret", NAME, "--", "sh", "-c", &script])?)?;
    expect_code(&out, 0)?;
    let want = format!("{}  -", sha256_hex(value.as_bytes()));
    if String::from_utf8_lossy(&out.stdout).trim() != want {
        return Err(Failure::new("the workload did not read the secret's value")
            .with_detail(describe(&out)));
    }
    let kinds = events(&last_run(&audit_records(&homes.log())?)?);
    if !kinds.iter().any(|k| k == "secret_released") {
        return Err(Failure::new(format!("no secret_released: {kinds:?}")));
    }
    search_host(ctx, &homes, &value, &[&out])
}

/// The image's initramfs changed by one byte after it was built (a private copy of the
/// image): admission signs a plan for the manifest's digest, the VMM measures the file
/// and refuses the boot (exit 118, `boot_refused` in the log), and no secret is
/// released: no `secret_released`, no `exec_started`, the value nowhere on the host.
fn refused_boot(ctx: &Context) -> CaseResult {
    let images = ctx.work_file("data").join("images");
    copy_default_image(&image_store(ctx)?.join("images"), &images)?;
    let homes = Homes::new(ctx)?;
    let value = fresh_value();
    store_secret(ctx, &homes, &value)?;
    let out = output(homes.run(
        ctx,
        &["--secret", NAME, "--", "cat", "/run/secrets/API_TOKEN"],
    )?)?;
    expect_code(&out, EXIT_BOOT_REFUSED)?;
    absent(
        &value,
        "mvm's stdout",
        &String::from_utf8_lossy(&out.stdout),
    )?;
    let records = last_run(&audit_records(&homes.log())?)?;
    let kinds = events(&records);
    if !kinds.iter().any(|k| k == "boot_refused")
        || kinds
            .iter()
            .any(|k| k == "secret_released" || k == "exec_started")
    {
        return Err(Failure::new(format!(
            "a refused boot's records: {kinds:?} (want boot_refused, no secret_released)"
        )));
    }
    expect_code(&homes.verify(ctx, None)?, 0)?;
    search_host(ctx, &homes, &value, &[&out])
}

/// Copies the image `default` names from the store's `images` to `to`, with one byte
/// of its initramfs changed (its manifest, and so its digest, unchanged).
pub(super) fn copy_default_image(from: &Path, to: &Path) -> CaseResult {
    // Never through a link to the shared store (`Homes` makes one): every later case
    // would boot the changed image.
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(Failure::new(format!(
            "{} exists already: the changed image goes only into a store of the case's own",
            to.display()
        )));
    }
    let name = std::fs::read_to_string(from.join("names/default"))
        .map_err(fail("reading the default image's name"))?;
    let hex = name.trim().trim_start_matches("sha256:").to_owned();
    let (src, dst) = (from.join(&hex), to.join(&hex));
    std::fs::create_dir_all(&dst).map_err(fail("creating the image copy"))?;
    std::fs::create_dir_all(to.join("names")).map_err(fail("creating the names"))?;
    std::fs::write(to.join("names/default"), &name).map_err(fail("writing the name"))?;
    for entry in std::fs::read_dir(&src).map_err(fail("reading the image"))? {
        let entry = entry.map_err(fail("reading the image"))?;
        let mut bytes = std::fs::read(entry.path()).map_err(fail("reading an image file"))?;
        if entry.file_name() == "initramfs.cpio" {
            let at = bytes.len() / 2;
            if let Some(b) = bytes.get_mut(at) {
                *b ^= 0x01;
            }
        }
        std::fs::write(dst.join(entry.file_name()), bytes).map_err(fail("writing the copy"))?;
    }
    Ok(())
}
