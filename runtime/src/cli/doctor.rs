//! `mvm doctor`: what this host offers, and why.

use serde_json::json;

use super::DoctorArgs;
use crate::backend::detect::{judge, HostFacts};
use crate::backend::locate;
use crate::backend::wall::{self, Wall};
use crate::image::{ImageStore, DEFAULT_IMAGE};
use crate::run::exit;

/// Every backend's wall, built or not, best first, for a process of this user.
fn all_walls() -> Vec<Wall> {
    wall::all(nix::unistd::Uid::effective().is_root())
}

/// The walls with this host's verdict on each (`usable`, `reason`), for `--json`.
fn walls(detection: &crate::backend::detect::Detection) -> Vec<serde_json::Value> {
    all_walls()
        .into_iter()
        .map(|w| {
            let verdict = detection
                .verdicts
                .iter()
                .find(|v| v.tier.to_string() == w.backend);
            let mut value = serde_json::to_value(&w).unwrap_or_default();
            if let Some(obj) = value.as_object_mut() {
                obj.insert("usable".into(), verdict.is_some_and(|v| v.usable).into());
                obj.insert(
                    "reason".into(),
                    verdict
                        .map_or("not built in this version".to_owned(), |v| v.reason.clone())
                        .into(),
                );
            }
            value
        })
        .collect()
}

/// Whether a process of this user may make a user namespace, which the jail of an
/// `mvm-vmm` started by an ordinary user needs (docs/jail.md): tried in a child, which
/// `unshare`s before it runs `mvm --version`.
#[cfg(not(target_os = "linux"))]
fn user_namespaces() -> Result<(), String> {
    Err("user namespaces are Linux's; this host has none".into())
}

/// See the other `user_namespaces`.
#[cfg(target_os = "linux")]
fn user_namespaces() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec only unshare(2) runs, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(std::io::Error::from)
        });
    }
    match command.status() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "{e} (kernel.unprivileged_userns_clone, user.max_user_namespaces or \
             kernel.apparmor_restrict_unprivileged_userns forbids them, or a security module)"
        )),
    }
}

/// Prints the findings; returns the exit code (0 when some backend is usable).
pub fn main(args: &DoctorArgs) -> i32 {
    let facts = HostFacts::probe();
    let detection = judge(&facts);
    let image = ImageStore::open_default().and_then(|s| s.resolve(DEFAULT_IMAGE));
    let vmm = locate::vmm_binary();
    let statics = locate::static_binaries();
    let userns = user_namespaces();
    let code = if detection.chosen.is_some() {
        0
    } else {
        exit::NO_BACKEND
    };
    if args.json {
        let value = json!({
            "chosen": detection.chosen,
            "tiers": detection.verdicts.iter().map(|v| json!({
                "tier": v.tier, "usable": v.usable, "reason": v.reason,
            })).collect::<Vec<_>>(),
            "host": {
                "cpu_vmx": facts.cpu_vmx,
                "cpu_svm": facts.cpu_svm,
                "dev_kvm": facts.dev_kvm,
                "dev_kvm_rw": facts.dev_kvm_rw,
                "kvm_modules": facts.kvm_modules,
                "qemu": facts.qemu,
                "user_namespaces": userns.is_ok(),
                "user_namespaces_error": userns.as_ref().err(),
            },
            "image": image.as_ref().map(|i| i.digest.clone()).map_err(|e| e.to_string()),
            "mvm_vmm": vmm.as_ref().map(|p| p.display().to_string()).map_err(|e| e.to_string()),
            "static_binaries": statics.as_ref().map(|_| true).map_err(|e| e.to_string()),
            "walls": walls(&detection),
        });
        println!("{value}");
        return code;
    }
    let mark = |ok: bool| if ok { "yes" } else { "no " };
    println!("backends (best first):");
    for v in &detection.verdicts {
        println!(
            "  {:<9} {}  {}",
            v.tier.to_string(),
            mark(v.usable),
            v.reason
        );
    }
    match detection.chosen {
        Some(tier) => println!("chosen: {tier}"),
        None => println!("chosen: none (mvm run exits {})", exit::NO_BACKEND),
    }
    println!("walls (what each backend puts around a workload; also in each receipt):");
    for w in all_walls() {
        let here = detection
            .verdicts
            .iter()
            .find(|v| v.tier.to_string() == w.backend)
            .map_or("not built", |v| {
                if v.usable {
                    "usable here"
                } else {
                    "not usable here"
                }
            });
        println!("  {} ({here}):", w.backend);
        println!(
            "    hardware-virtualized: {}; disk blocks verified as read: {}",
            mark(w.hardware_virtualized).trim_end(),
            mark(w.disk_blocks_verified).trim_end()
        );
        println!("    isolation: {}", w.isolation);
        println!("    plan verified by: {}", w.plan_verified_by);
        println!("    jail: {}", w.jail);
        println!("    seccomp: {}", w.seccomp);
        println!("    egress enforced in: {}", w.egress_enforced_in);
    }
    println!("host:");
    println!(
        "  cpu flags: vmx={} svm={}; /dev/kvm: {}{}; kvm modules: {}",
        facts.cpu_vmx,
        facts.cpu_svm,
        if facts.dev_kvm { "present" } else { "missing" },
        if facts.dev_kvm && !facts.dev_kvm_rw {
            " (not writable)"
        } else {
            ""
        },
        if facts.kvm_modules.is_empty() {
            "none".to_owned()
        } else {
            facts.kvm_modules.join(",")
        }
    );
    match &userns {
        Ok(()) => println!(
            "  user namespaces: yes (an ordinary user's mvm-vmm jails itself in one)"
        ),
        Err(e) => println!(
            "  user namespaces: no: {e}; an ordinary user's mvm-vmm refuses to start without --no-jail"
        ),
    }
    println!("needs:");
    match &image {
        Ok(i) => println!(
            "  image {DEFAULT_IMAGE}: {} ({})",
            i.digest,
            i.dir.display()
        ),
        Err(e) => println!("  image {DEFAULT_IMAGE}: missing: {e}"),
    }
    match &vmm {
        Ok(p) => println!("  mvm-vmm: {}", p.display()),
        Err(e) => println!("  mvm-vmm: {e}"),
    }
    if detection.chosen == Some(crate::backend::Tier::Emulated) {
        match &statics {
            Ok((m, v)) => println!(
                "  static mvm + mvm-vmm for the test host: {}, {}",
                m.display(),
                v.display()
            ),
            Err(e) => println!("  static binaries: {e}"),
        }
    }
    code
}
