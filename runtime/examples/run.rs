//! Runs one command in a fresh microVM through the SDK and prints what it wrote:
//!
//! ```sh
//! cargo run -p mvm-runtime --example run -- sh -c 'echo hello from $(uname -r)'
//! ```
//!
//! The host needs what `mvm run` needs (`scripts/setup` provides it); the run is admitted,
//! verified and audited like any other.

use std::io::Write;
use std::process::ExitCode;

use mvm_runtime::sdk::Run;

fn main() -> ExitCode {
    let command: Vec<String> = std::env::args().skip(1).collect();
    if command.is_empty() {
        eprintln!("usage: run CMD [ARGS...]");
        return ExitCode::from(2);
    }
    match Run::new(command).timeout_secs(300).output() {
        Ok(out) => {
            let _ = std::io::stdout().write_all(&out.stdout);
            let _ = std::io::stderr().write_all(&out.stderr);
            eprintln!(
                "run: exit code {} on the {} tier (boot {} ms, exec {} ms)",
                out.exit_code, out.tier, out.timings.boot_ms, out.timings.exec_ms
            );
            ExitCode::from(u8::try_from(out.exit_code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("run: {e}");
            ExitCode::from(u8::try_from(mvm_runtime::run::exit::for_error(&e)).unwrap_or(1))
        }
    }
}
