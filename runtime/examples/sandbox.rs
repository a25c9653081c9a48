//! A sandbox through the SDK: create it, put a script in, run it twice (state
//! carries between calls), take its output back, stop it.
//!
//! ```sh
//! cargo run -p mvm-runtime --example sandbox
//! ```
//!
//! The host needs what `mvm sandbox create` needs (`scripts/setup` provides it):
//! the sandbox is admitted, verified and audited like any run, and lives in
//! its own supervisor process (the installed `mvm`, or `$MVM_BIN`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mvm_agent::protocol::ExecRequest;
use mvm_agent::Stdin;
use mvm_runtime::sandbox::{self, SandboxError, SandboxOptions};

const SCRIPT: &str = "#!/bin/sh\n\
    echo \"run $(( $(cat /work/count 2>/dev/null || echo 0) + 1 ))\" | tee -a /work/log\n\
    expr $(cat /work/count 2>/dev/null || echo 0) + 1 > /work/count\n";

fn main() -> ExitCode {
    match session() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox: {e}");
            ExitCode::FAILURE
        }
    }
}

fn session() -> Result<(), SandboxError> {
    let started = Instant::now();
    let info = sandbox::create(&SandboxOptions {
        ttl: Duration::from_secs(300),
        ..SandboxOptions::default()
    })?;
    eprintln!(
        "sandbox: {} ready on the {} tier in {} ms",
        info.id,
        info.tier.map_or("?".to_owned(), |t| t.to_string()),
        started.elapsed().as_millis()
    );
    let result = use_it(&info.id);
    // Stopped whatever happened above: the VM powers off, the records close.
    let stopped = sandbox::stop(&info.id);
    result?;
    eprintln!("sandbox: {} {}", info.id, stopped?.status);
    Ok(())
}

fn use_it(id: &str) -> Result<(), SandboxError> {
    let sb = sandbox::connect(id)?;
    sb.write_file("/work/count.sh", 0o755, &mut SCRIPT.as_bytes())?;
    let run = ExecRequest {
        argv: vec!["/work/count.sh".into()],
        ..ExecRequest::default()
    };
    for _ in 0..2 {
        let out = sb.exec(&run, Stdin::Null)?.wait_output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    let mut log = Vec::new();
    sb.read_file("/work/log", &mut log)?;
    println!(
        "--- /work/log, read back ---\n{}",
        String::from_utf8_lossy(&log)
    );
    Ok(())
}
