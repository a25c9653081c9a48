//! `mvm-agent`: the guest's PID 1, or a host-side agent on a Unix socket for tests.
//!
//! As PID 1 it ignores its arguments (the kernel passes it stray command-line words) and
//! reads `mvm.*` settings from `/proc/cmdline`: `mvm.agent.port`, `mvm.hostname`,
//! `mvm.agent.log`, and the policy keys of `Policy::from_cmdline`.
//!
//! For host-side tests of the PID 1 duties, run it as PID 1 of fresh pid, mount and UTS
//! namespaces with `MVM_AGENT_PID1_TEST_SOCKET=PATH`: it then serves that Unix socket
//! instead of vsock and writes nothing to the guest-signal port.
//!
//! `--container` (with `--listen-unix PATH`) is the container tier's PID 1: no VM init at
//! all (the launcher did the mounts), the container seccomp filter on the whole process
//! tree, and a shutdown request ends the process ([`mvm_agent::container`]). It is chosen
//! before the PID 1 check: as a VM's PID 1 the arguments are stray kernel command-line
//! words, and the plan pins that command line.
//!
//! The agent is Linux's (a guest's or a container's PID 1): on another system this binary
//! only says so.

#[cfg(target_os = "linux")]
mod linux;

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("mvm-agent: runs only on Linux, as a guest's or a container's PID 1");
    std::process::ExitCode::from(2)
}
