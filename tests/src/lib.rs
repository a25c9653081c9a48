//! End-to-end test support: the case runner (`mvm-e2e`) and the guest-side
//! test program (`mvm-test-init`).
//!
//! A case boots real guests through `mvm-vmm` on a real KVM and asserts on
//! exit status, console output and files such as the boot report. Cases live
//! in [`cases`], one module per area, registered in one list. See
//! `docs/e2e.md` for how the harness runs and how to add a case.

pub mod as_user;
pub mod boot_report;
pub mod case;
pub mod cases;
pub mod guest;
pub mod kvm;
pub mod netbed;
pub mod netserve;
pub mod pattern;
pub mod runner;
pub mod tlsserve;
pub mod vm;
