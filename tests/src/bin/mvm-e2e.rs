//! `mvm-e2e [--artifacts DIR] [--work DIR] [--list] [PATTERN]`: runs the
//! end-to-end cases whose names match PATTERN on this machine's KVM, one
//! line per case, then `N passed, N failed`. Exits 0 only if something ran
//! and nothing failed. See docs/e2e.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use mvm_tests::{cases, pattern::Pattern, runner};

struct Args {
    artifacts: PathBuf,
    work: PathBuf,
    list: bool,
    pattern: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut artifacts = std::env::var_os("MVM_E2E_ARTIFACTS").map(PathBuf::from);
    let mut work = std::env::temp_dir().join("mvm-e2e");
    let mut list = false;
    let mut pattern = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--artifacts") => {
                artifacts = Some(args.next().context("--artifacts needs a directory")?.into());
            }
            Some("--work") => work = args.next().context("--work needs a directory")?.into(),
            Some("--list") => list = true,
            Some("-h" | "--help") => {
                println!("usage: mvm-e2e [--artifacts DIR] [--work DIR] [--list] [PATTERN]");
                std::process::exit(0);
            }
            Some(p) if !p.starts_with('-') && pattern.is_none() => pattern = Some(p.to_owned()),
            _ => bail!("unexpected argument {arg:?} (see --help)"),
        }
    }
    // By default the artifacts sit beside this binary (that is how
    // scripts/e2e lays them out, in the test host and outside it).
    let artifacts = match artifacts {
        Some(dir) => dir,
        None => std::env::current_exe()
            .context("locate mvm-e2e")?
            .parent()
            .context("mvm-e2e has no parent directory")?
            .to_path_buf(),
    };
    Ok(Args {
        artifacts,
        work,
        list,
        pattern: pattern.unwrap_or_default(),
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("mvm-e2e: {e:#}");
            return ExitCode::from(2);
        }
    };
    let all = cases::all();
    let pattern = Pattern::parse(&args.pattern);
    if args.list {
        for case in all.iter().filter(|c| pattern.matches(c.name)) {
            println!("{}", case.name);
        }
        return ExitCode::SUCCESS;
    }
    let tally = runner::run(
        &all,
        &pattern,
        &args.artifacts,
        &args.work,
        &mut std::io::stdout(),
    );
    if tally.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
