//! `mvm-vmm`: boot a Linux guest. See `mvm-vmm --help` for arguments and exit
//! statuses.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use mvm_vmm::boot_report::{BootTimeline, Phase};
use mvm_vmm::cli::Args;
use mvm_vmm::exit::STATUS_BAD_ARGUMENTS;

fn main() {
    // Zero of the boot report's clock.
    let start = Instant::now();
    // Before any thread: a heap trim would openat under the device threads' filters.
    mvm_seccomp::keep_allocator_inside_filters();
    mvm_vmm::logger::init(mvm_vmm::logger::level_from(
        std::env::var("RUST_LOG").ok().as_deref(),
    ));
    // Before clap: `--print-seccomp` needs no --kernel.
    if std::env::args().nth(1).as_deref() == Some("--print-seccomp") {
        print!("{}", mvm_seccomp::describe(&mvm_vmm::devices::all_roles()));
        std::process::exit(0);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                STATUS_BAD_ARGUMENTS
            } else {
                0
            });
        }
    };
    let timeline = Arc::new(BootTimeline::new(start));
    // The phase ends here: what follows (plan, configuration, jail) has its own marks.
    timeline.mark(Phase::ArgsParsed);
    let status = mvm_vmm::boot::run_cli(args, timeline);
    // Ends every thread (vCPUs, console input, signal waiter) with the process.
    std::process::exit(status);
}
