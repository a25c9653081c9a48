//! `mvm-e2e [--artifacts DIR] [--work DIR] [--place kvm|user-host|all]
//! [--limit SECS] [--list] [PATTERN]`: runs the end-to-end cases whose names
//! match PATTERN, each in its own process under its own time limit, one line
//! per case, then `N passed, N failed`. Exits 0 only if something ran and
//! nothing failed. `--one NAME` runs one case in this process (what the runner
//! starts for each case). In PATTERN, `NAME+` is a starting point: of what the
//! rest selects, NAME and the cases listed after it run (how `scripts/e2e`
//! resumes after a stalled test host).
//! See docs/e2e.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use mvm_tests::case::Place;
use mvm_tests::runner::{self, Isolation};
use mvm_tests::{cases, pattern::Pattern};

const USAGE: &str = "usage: mvm-e2e [--artifacts DIR] [--work DIR] [--place kvm|user-host|all] \
                     [--limit SECS] [--list] [PATTERN] | --one NAME";

struct Args {
    artifacts: PathBuf,
    work: PathBuf,
    list: bool,
    /// Which cases: `None` is every place.
    place: Option<Place>,
    limit: Option<Duration>,
    one: Option<String>,
    pattern: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut artifacts = std::env::var_os("MVM_E2E_ARTIFACTS").map(PathBuf::from);
    let mut work = std::env::temp_dir().join("mvm-e2e");
    let mut list = false;
    let mut place = Some(Place::Kvm);
    let mut limit = None;
    let mut one = None;
    let mut pattern = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--artifacts") => {
                artifacts = Some(args.next().context("--artifacts needs a directory")?.into());
            }
            Some("--work") => work = args.next().context("--work needs a directory")?.into(),
            Some("--list") => list = true,
            Some("--place") => {
                place = match args.next().and_then(|v| v.into_string().ok()).as_deref() {
                    Some("kvm") => Some(Place::Kvm),
                    Some("user-host") => Some(Place::UserHost),
                    Some("all") => None,
                    other => bail!("--place must be kvm, user-host or all, not {other:?}"),
                }
            }
            Some("--limit") => {
                let secs: u64 = args
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .and_then(|v| v.parse().ok())
                    .context("--limit needs a number of seconds")?;
                limit = Some(Duration::from_secs(secs));
            }
            Some("--one") => {
                one = Some(
                    args.next()
                        .and_then(|v| v.into_string().ok())
                        .context("--one needs a case name")?,
                );
            }
            Some("-h" | "--help") => {
                println!("{USAGE}");
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
        place,
        limit,
        one,
        pattern: pattern.unwrap_or_default(),
    })
}

/// Resolves `NAME+` in `pattern`: a starting point, not a selection. The other
/// alternatives select as usual (none: every case), and of what they select,
/// only NAME and the cases listed after it remain. Returns a plain pattern
/// (the names, comma-separated, when there is a starting point).
fn expand_from(pattern: &str, names: &[&str]) -> String {
    let (starts, rest): (Vec<&str>, Vec<&str>) = pattern
        .split(',')
        .map(str::trim)
        .filter(|alt| !alt.is_empty())
        .partition(|alt| alt.ends_with('+'));
    let Some(from) = starts.first().and_then(|s| s.strip_suffix('+')) else {
        return pattern.to_owned();
    };
    let base = Pattern::parse(&rest.join(","));
    let chosen: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| base.matches(n) || *n == from)
        .skip_while(|n| *n != from)
        .collect();
    if chosen.is_empty() {
        // An empty pattern would select every case; no name starts with '-'.
        return "-".to_owned();
    }
    chosen.join(",")
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
    if let Some(name) = &args.one {
        let Some(case) = all.iter().find(|c| c.name == name) else {
            eprintln!("mvm-e2e: no case named {name}");
            return ExitCode::from(2);
        };
        let passed = runner::run_here(case, &args.artifacts, &args.work, &mut std::io::stdout());
        return if passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let selected: Vec<_> = all
        .into_iter()
        .filter(|c| args.place.is_none_or(|p| c.place == p))
        .collect();
    let names: Vec<&str> = selected.iter().map(|c| c.name).collect();
    let pattern = Pattern::parse(&expand_from(&args.pattern, &names));
    if args.list {
        for case in selected.iter().filter(|c| pattern.matches(c.name)) {
            println!("{}", case.name);
        }
        return ExitCode::SUCCESS;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("mvm-e2e: locate this binary: {e}");
            return ExitCode::from(2);
        }
    };
    let tally = runner::run(
        &selected,
        &pattern,
        &args.artifacts,
        &args.work,
        &mut std::io::stdout(),
        &Isolation::Subprocess {
            exe,
            limit: args.limit,
        },
    );
    if tally.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::expand_from;

    #[test]
    fn a_name_with_a_plus_starts_the_selection_there() {
        let names = ["a/1", "a/2", "b/1", "b/2"];
        assert_eq!(expand_from("a/2+", &names), "a/2,b/1,b/2");
        assert_eq!(expand_from("a/2+,a", &names), "a/2");
        assert_eq!(expand_from("a/1,b/2,a/2+", &names), "a/2,b/2");
        assert_eq!(expand_from("a", &names), "a");
        // Nothing for an unknown name (not everything: the empty pattern is all).
        assert_eq!(expand_from("x/1+", &names), "-");
        assert_eq!(expand_from("", &names), "");
    }
}
