//! The `vz` tier, in part: Apple's Virtualization.framework through `vfkit`, on macOS.
//!
//! Virtualization.framework measures nothing: it boots the files it is given. So on this
//! tier the runtime is the one that verifies: it checks the signed plan as the VMM would,
//! copies each artifact into a private directory (a copy-on-write clone on APFS), measures
//! the copy against the plan, and hands `vfkit` only those copies ([`handoff`]); `vfkit`'s
//! command line is built from the plan and the measured copies alone ([`invocation`]).
//! What that does not give: per-block verification of a root disk while the guest reads
//! it (the whole disk is measured once, before boot), and the VMM's jail and seccomp
//! filters (the hypervisor is Apple's; `vfkit` runs as the user).
//!
//! Built so far: both parts above, platform-neutral and unit-tested on Linux. Not built:
//! the runner that starts `vfkit`, watches its REST state and talks to the agent over the
//! vsock socket, and the macOS gating of the Linux-only modules (docs/backends.md). Nothing
//! of this has run on a Mac.

pub mod handoff;
pub mod invocation;

/// The tier's label, wherever it is shown.
pub const LABEL: &str = "vz: hardware-virtualized, measured by the runtime before hand-off, no per-block verification in the hypervisor";
