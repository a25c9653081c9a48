//! `mvm-vmm`: boot a Linux guest. See `mvm-vmm --help` for arguments and exit
//! statuses.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use mvm_vmm::boot_report::{BootTimeline, Phase};
use mvm_vmm::cli::Args;
use mvm_vmm::exit::STATUS_BAD_ARGUMENTS;
use tracing::level_filters::LevelFilter;

/// The log level from `RUST_LOG`: a level (`off`, `error`, `warn`, `info`,
/// `debug`, `trace`), or directives (`mvm_vmm=debug,kvm=info`) of which the
/// most verbose level counts for every target. Unset or unreadable: `warn`.
fn log_level(value: Option<&str>) -> LevelFilter {
    value
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|directive| directive.rsplit('=').next().unwrap_or(directive).trim())
        // LevelFilter reads "" as ERROR; here it means nothing was said.
        .filter(|level| !level.is_empty())
        .filter_map(|level| level.parse::<LevelFilter>().ok())
        .max()
        .unwrap_or(LevelFilter::WARN)
}

fn main() {
    // Zero of the boot report's clock.
    let start = Instant::now();
    // Before any thread: a heap trim would openat under the device threads' filters.
    mvm_seccomp::keep_allocator_inside_filters();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(log_level(std::env::var("RUST_LOG").ok().as_deref()))
        .init();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_reads_a_level_or_the_most_verbose_directive() {
        assert_eq!(log_level(None), LevelFilter::WARN);
        assert_eq!(log_level(Some("")), LevelFilter::WARN);
        assert_eq!(log_level(Some("nonsense")), LevelFilter::WARN);
        assert_eq!(log_level(Some("debug")), LevelFilter::DEBUG);
        assert_eq!(log_level(Some("OFF")), LevelFilter::OFF);
        assert_eq!(
            log_level(Some("mvm_vmm=debug,kvm_ioctls=info")),
            LevelFilter::DEBUG
        );
        assert_eq!(
            log_level(Some("error,mvm_devices=trace")),
            LevelFilter::TRACE
        );
    }
}
