//! `mvm`: the command line of the mvm runtime.

use clap::Parser;
use mvm_runtime::cli::{self, Cli, Command};

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let code = match &cli.command {
        Command::Run(args) => cli::run::main(args),
        Command::Doctor(args) => cli::doctor::main(args),
        Command::Bench(args) => cli::bench::main(args),
        Command::Keys(c) => cli::trust::keys(c),
        Command::Plan(c) => cli::trust::plan(c),
        Command::Audit(c) => cli::trust::audit(c),
        Command::Receipt(c) => cli::trust::receipt(c),
        Command::Secret(c) => cli::secret::main(c),
        Command::Sandbox(c) => cli::sandbox::main(c),
        Command::SandboxSupervise { dir, resume } => {
            mvm_runtime::sandbox::supervisor::supervise(dir, *resume)
        }
        Command::Mcp => mvm_runtime::mcp::serve(std::io::stdin().lock(), std::io::stdout()),
        Command::Image(command) => match cli::image::main(command) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("mvm: error: {e:#}");
                1
            }
        },
        Command::Cpio {
            dev_console,
            dir,
            out,
        } => match cli::image::write_cpio(dir, out, *dev_console) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("mvm: error: cpio {}: {e}", dir.display());
                1
            }
        },
        Command::DataDir => match mvm_runtime::image::store::data_dir() {
            Ok(dir) => {
                println!("{}", dir.display());
                0
            }
            Err(e) => {
                eprintln!("mvm: error: {e}");
                1
            }
        },
        #[cfg(target_os = "linux")]
        Command::TesthostMachine => {
            for arg in mvm_runtime::backend::emulated::qemu::TESTHOST_MACHINE {
                println!("{arg}");
            }
            0
        }
        #[cfg(target_os = "linux")]
        Command::TesthostCmdline { run } => {
            match mvm_runtime::backend::emulated::qemu::testhost_cmdline(run) {
                Ok(line) => {
                    println!("{line}");
                    0
                }
                Err(e) => {
                    eprintln!("mvm: error: {e}");
                    2
                }
            }
        }
        #[cfg(target_os = "linux")]
        Command::TesthostSpare { dir } => match mvm_runtime::backend::emulated::spare::keep(dir) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!("spare test host {}: {e}", dir.display());
                1
            }
        },
        #[cfg(target_os = "linux")]
        Command::ContainerInit { dir } => mvm_runtime::backend::container::init::main(dir),
        #[cfg(target_os = "linux")]
        Command::TesthostGuest { image_dir } => {
            match mvm_runtime::backend::emulated::guest_main(image_dir) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("mvm: testhost guest: {e}");
                    1
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        Command::TesthostMachine
        | Command::TesthostCmdline { .. }
        | Command::TesthostSpare { .. }
        | Command::ContainerInit { .. }
        | Command::TesthostGuest { .. } => {
            eprintln!("mvm: error: an internal command of the emulated and container tiers, which are built for Linux hosts only");
            2
        }
    };
    std::process::exit(code);
}
