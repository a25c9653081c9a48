//! `mvm doctor`: what this host offers, and why.

use serde_json::json;

use super::DoctorArgs;
use crate::backend::detect::{judge, HostFacts};
use crate::backend::locate;
use crate::image::{ImageStore, DEFAULT_IMAGE};
use crate::run::exit;

/// Prints the findings; returns the exit code (0 when some backend is usable).
pub fn main(args: &DoctorArgs) -> i32 {
    let facts = HostFacts::probe();
    let detection = judge(&facts);
    let image = ImageStore::open_default().and_then(|s| s.resolve(DEFAULT_IMAGE));
    let vmm = locate::vmm_binary();
    let statics = locate::static_binaries();
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
            },
            "image": image.as_ref().map(|i| i.digest.clone()).map_err(|e| e.to_string()),
            "mvm_vmm": vmm.as_ref().map(|p| p.display().to_string()).map_err(|e| e.to_string()),
            "static_binaries": statics.as_ref().map(|_| true).map_err(|e| e.to_string()),
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
