//! The `mvm` command line: argument definitions (parsing only) and one
//! module per command that acts on them.

pub mod bench;
pub mod doctor;
pub mod image;
pub mod run;
pub mod sandbox;
pub mod secret;
pub mod terminal_session;
pub mod trust;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

use crate::backend::Tier;
use crate::run::{exit, RunRequest};
use crate::secrets::{Delivery, SecretRequest};

/// mvm: run untrusted code inside a microVM.
#[derive(Debug, Parser)]
#[command(name = "mvm", version, about, propagate_version = true)]
pub struct Cli {
    /// Log more (repeat for more detail); logs go to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a fresh microVM and exit with its status.
    #[command(after_help = exit::HELP)]
    Run(RunArgs),
    /// Build, list and inspect guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Show which backends this host offers, and why.
    Doctor(DoctorArgs),
    /// Time N runs of a command (default `true`): min, median and p95 of each boot phase.
    Bench(bench::BenchArgs),
    /// The host's admission and audit keys.
    #[command(subcommand)]
    Keys(trust::KeysCommand),
    /// Show or verify a signed execution plan.
    #[command(subcommand)]
    Plan(trust::PlanCommand),
    /// Show or verify the host's audit log.
    #[command(subcommand)]
    Audit(trust::AuditCommand),
    /// Verify a run's signed receipt.
    #[command(subcommand)]
    Receipt(trust::ReceiptCommand),
    /// The host's secrets, which a verified run may be given (`mvm run --secret NAME`).
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Long-lived sandboxes: create, exec, cp, stop (docs/sandboxes.md).
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// A Model Context Protocol server on stdin/stdout: an AI agent's tool calls
    /// (run_command, host_info) run in fresh microVMs (docs/mcp.md).
    Mcp,
    /// Internal: writes DIR's tree as a newc cpio archive (owners root, times 0,
    /// sorted), for the build scripts' initramfs files.
    #[command(name = "__cpio", hide = true)]
    Cpio {
        /// Also add `/dev/console` (c 5 1): without it PID 1 starts with no stdio.
        #[arg(long)]
        dev_console: bool,
        /// The tree.
        dir: PathBuf,
        /// The archive to write.
        out: PathBuf,
    },
    /// Internal: prints the data directory (the image store's root), for scripts/setup.
    #[command(name = "__data-dir", hide = true)]
    DataDir,
    /// Internal: prints the test host machine's QEMU arguments, one per line.
    #[command(name = "__testhost-machine", hide = true)]
    TesthostMachine,
    /// Internal: prints the test host kernel's command line, with `mvm.run=RUN`
    /// when RUN is given and not empty (what the test host's /init runs).
    #[command(name = "__testhost-cmdline", hide = true)]
    TesthostCmdline {
        /// The argument for the test host's /testhost/run.
        #[arg(default_value = "")]
        run: String,
    },
    /// Internal: a sandbox's supervisor (started by `mvm sandbox create`).
    #[command(name = "__sandbox-supervise", hide = true)]
    SandboxSupervise {
        /// The sandbox's directory.
        dir: PathBuf,
        /// Start it from its sealed snapshot (`mvm sandbox resume`).
        #[arg(long)]
        resume: bool,
    },
    /// Internal: keeps a spare test host (booted ahead, `MVM_TESTHOST_SPARE=1`) for the
    /// next run of the emulated tier to claim.
    #[command(name = "__testhost-spare", hide = true)]
    TesthostSpare {
        /// The spare's directory (its QEMU arguments in `spare.json`).
        dir: PathBuf,
    },
    /// Internal: the container backend's init, which makes the container's namespaces
    /// and starts its agent (docs/backends.md).
    #[command(name = "__container-init", hide = true)]
    ContainerInit {
        /// The run's directory (its instructions in `container.json`).
        dir: PathBuf,
    },
    /// Internal: the side of the emulated backend that runs inside the test host.
    #[command(name = "__testhost-guest", hide = true)]
    TesthostGuest {
        /// The image directory carried into the test host.
        image_dir: PathBuf,
    },
}

/// `mvm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// vCPUs for the VM (at most mvm_loader::limits::MAX_VCPUS, checked
    /// before anything starts; exit 116).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub cpus: u8,
    /// Guest memory in MiB (at most the host's MemAvailable, and the policy's
    /// max_memory_mib, also with --dev; checked before anything starts).
    #[arg(long = "mem", value_name = "MiB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(64..))]
    pub mem_mib: u32,
    /// Set an environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory of the command in the guest.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Stop the command (and the VM) after this many seconds; exit 124.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub timeout: Option<u64>,
    /// How long to wait for the guest agent after the VM starts.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ready_timeout: u64,
    /// Attach a disk: `path=FILE,ro|rw`. Read-only: pinned in the plan by a dm-verity
    /// tree computed now, every block verified as the guest reads it. Writable: a
    /// scratch disk the plan names by its size (a whole number of MiB). In the guest
    /// they follow the image's root disk, read-only ones first.
    /// (repeatable).
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// Print one JSON object (stdout, stderr, exit status, timings) instead
    /// of streaming the output.
    #[arg(long)]
    pub json: bool,
    /// Forward stdin even when it is a terminal (line by line; `-it` for a terminal).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// A terminal in the guest, this one in raw mode: `mvm run -it -- sh` is a shell in
    /// a fresh microVM (run as a sandbox, removed at the end; docs/sandboxes.md).
    #[arg(short = 't', long,
          conflicts_with_all = ["json", "receipt", "secret_env", "disk", "net", "allow", "dns"])]
    pub tty: bool,
    /// Use this backend instead of the best one detected.
    #[arg(long, value_enum)]
    pub backend: Option<Tier>,
    /// The image to boot: a name or a digest (prefix).
    #[arg(long, default_value = crate::image::DEFAULT_IMAGE)]
    pub image: String,
    /// Give the command the stored secret NAME (`mvm secret set NAME`) as the file
    /// /run/secrets/NAME, readable only by its uid (repeatable). Released only after the
    /// VMM verified the signed plan, which names it, and measured what it booted; the
    /// policy's [secrets] allow must list it. Not with --dev.
    ///
    /// `--secret NAME=PLACEHOLDER` instead: the command sees only PLACEHOLDER (in its
    /// environment as NAME), and the host's egress proxy puts the value in its place in
    /// the request headers of HTTPS requests to the --for hosts, and nowhere else
    /// (docs/secrets.md).
    #[arg(
        long = "secret",
        value_name = "NAME[=PLACEHOLDER]",
        conflicts_with = "dev"
    )]
    pub secrets: Vec<String>,
    /// The host (port 443 unless given) a placeholder secret's value may go to
    /// (repeatable; NAME= when there are several placeholder secrets). Implies
    /// --allow HOST:PORT; the policy's [secrets.hosts] must list it.
    #[arg(
        long = "for",
        value_name = "[NAME=]HOST[:PORT]",
        conflicts_with = "dev"
    )]
    pub for_hosts: Vec<String>,
    /// Give the command the stored secret NAME as its environment variable NAME (UTF-8
    /// text; over an --env of the same name), released as --secret is (repeatable).
    /// Its children, and anything of its uid reading /proc/PID/environ, see it too.
    #[arg(long = "secret-env", value_name = "NAME", conflicts_with = "dev")]
    pub secret_env: Vec<String>,
    /// Write a signed receipt of the run here (verify with `mvm receipt verify`).
    #[arg(long, value_name = "FILE", conflicts_with = "dev")]
    pub receipt: Option<PathBuf>,
    /// Development only: no admission, no signed plan, nothing verified or
    /// audited (mvm-vmm --dev). Also MVM_DEV=1.
    #[arg(long)]
    pub dev: bool,
    /// Boot the VM even if a warm start from the image's snapshot is possible (kvm
    /// backend; docs/snapshots.md).
    #[arg(long)]
    pub cold: bool,
    // netrt: the network flags (docs/net.md).
    #[command(flatten)]
    pub network: NetArgs,
    /// The command and its arguments, after `--` (without one, the image's default
    /// command; after an image's entrypoint, its arguments).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// Whether this run skips admission: `--dev`, or `MVM_DEV=1`.
    pub fn dev_mode(&self) -> bool {
        self.dev || std::env::var_os("MVM_DEV").is_some_and(|v| v == "1")
    }

    /// What this run asks admission for.
    pub fn run_request(&self) -> RunRequest {
        RunRequest {
            image: self.image.clone(),
            cpus: self.cpus,
            mem_mib: self.mem_mib,
            timeout_secs: self.timeout,
            argv: self.command.clone(),
            secrets: self
                .secrets
                .iter()
                .filter(|value| !value.contains('='))
                .map(|name| (name, Delivery::File))
                .chain(self.secret_env.iter().map(|name| (name, Delivery::Env)))
                .map(|(name, delivery)| SecretRequest {
                    name: name.clone(),
                    delivery,
                })
                .collect(),
            substitutions: Vec::new(),
            forwards: Vec::new(),
            disks: Vec::new(),
            scratch_disks: Vec::new(),
        }
    }

    /// The `--secret NAME=PLACEHOLDER` values, each with its `--for` hosts.
    pub fn substitutions(&self) -> Result<Vec<crate::secrets::SubstitutionRequest>, String> {
        crate::secrets::split_secret_args(&self.secrets, &self.for_hosts).map(|(_, s)| s)
    }

    /// What this run asks of the network (`--net`, `--allow`, `--dns`).
    pub fn net_flags(&self) -> crate::net::run::NetFlags {
        self.network.flags()
    }
}

/// The network flags of `mvm run` and `mvm sandbox create` (docs/net.md).
#[derive(Debug, Clone, Default, Args)]
pub struct NetArgs {
    /// Give the VM a network device (needs CAP_NET_ADMIN on the kvm tier); nothing passes
    /// it but what --allow and --dns open. Implied by --allow and --dns.
    #[arg(long)]
    pub net: bool,
    /// Let the guest reach HOST_OR_CIDR:PORT[-PORT][/tcp|/udp] (repeatable; host names
    /// are resolved now and the plan pins their IPv4 addresses).
    #[arg(long, value_name = "DEST", value_parser = crate::net::allow::parse_allow)]
    pub allow: Vec<mvm_loader::plan::EgressRule>,
    /// A DNS resolver for the guest (repeatable, IPv4; DNS to anything else is dropped).
    #[arg(long, value_name = "IP", value_parser = crate::net::allow::parse_dns)]
    pub dns: Vec<std::net::Ipv4Addr>,
}

impl NetArgs {
    /// The flags as the run path takes them.
    pub fn flags(&self) -> crate::net::run::NetFlags {
        crate::net::run::NetFlags {
            net: self.net,
            allow: self.allow.clone(),
            dns: self.dns.clone(),
            intercept: Vec::new(),
        }
    }
}

/// `mvm image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image from a spec (PATH: a directory with mvm.toml, or the file),
    /// locking it first if it has no lock; without PATH, the base image (kernel +
    /// initramfs with mvm-agent and busybox).
    Build(ImageBuildArgs),
    /// Import an OCI image layout (a directory or a tar of one) or a `docker save`
    /// archive: every blob checked by digest, the layers merged on the host, the
    /// root disk written in the builder VM. `mvm run --image NAME` then runs its
    /// entrypoint and command with its environment, working directory and user.
    Import(ImageImportArgs),
    /// Resolve a spec against Debian's signed indexes into its lock (mvm.lock
    /// beside it): every package by exact version and sha256.
    Lock {
        /// A directory with mvm.toml, or the file.
        path: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List stored images.
    Ls {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's inputs, sizes and root hash, and check its artifacts.
    Inspect {
        /// A name or a digest (prefix).
        #[arg(default_value = crate::image::DEFAULT_IMAGE)]
        reference: String,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a name (and the image, when no other name points at it).
    Rm {
        /// The name.
        name: String,
    },
    /// Remove images no name points at, and cached inputs no stored lock needs.
    Gc {
        /// Print what was removed as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `mvm image import`.
#[derive(Debug, Args)]
pub struct ImageImportArgs {
    /// The archive: an OCI image layout directory, a tar of one, or a `docker save` tar.
    pub path: PathBuf,
    /// The name to store the image under.
    #[arg(long)]
    pub name: String,
    /// The builder VM.
    #[command(flatten)]
    pub builder: BuilderVmArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How a builder VM runs (`mvm image build`, `mvm image import`).
#[derive(Debug, Args)]
pub struct BuilderVmArgs {
    /// Build again even if the store or the build cache has this image.
    #[arg(long)]
    pub rebuild: bool,
    /// The time limit in the builder VM, seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// The backend for the builder VM (default: the best this host offers).
    #[arg(long, value_enum)]
    pub backend: Option<Tier>,
}

impl BuilderVmArgs {
    /// The options of a build; progress bars when stderr is a terminal.
    pub fn options(&self) -> crate::image::assemble::AssembleOptions {
        crate::image::assemble::AssembleOptions {
            backend: self.backend,
            timeout_secs: self.timeout,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            rebuild: self.rebuild,
        }
    }
}

/// `mvm image build`.
#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// A spec: a directory holding mvm.toml, or the file. Without it, the base
    /// image is built from --kernel, --agent and --busybox.
    #[arg(conflicts_with = "flake")]
    pub path: Option<PathBuf>,
    /// Build a Nix flake's output instead: PATH#ATTR, evaluated and built in the
    /// Nix builder VM (host Nix is never used); the output is a root filesystem tree.
    /// Needs --name.
    #[arg(long, value_name = "PATH#ATTR")]
    pub flake: Option<String>,
    /// With --flake: lock a flake that has no flake.lock (in the builder VM) and
    /// write the lock beside flake.nix. Without it an unlocked flake is refused.
    #[arg(long, requires = "flake")]
    pub lock: bool,
    /// The builder VM.
    #[command(flatten)]
    pub builder: BuilderVmArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The guest kernel (ELF vmlinux). Default: $MVM_KERNEL, else the output
    /// of scripts/build-kernel.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The static mvm-agent. Default: $MVM_AGENT, else mvm-agent beside mvm.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Debian's static busybox.
    #[arg(long, value_name = "PATH", default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    /// The kernel command line (default: the built-in one).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// The name to store the base image under.
    #[arg(long, default_value = crate::image::DEFAULT_IMAGE)]
    pub name: String,
}

/// `mvm doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `K=V`: a non-empty key without `=` or NUL, and a value without NUL.
pub fn parse_env(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not K=V"))?;
    if key.is_empty() || key.contains('\0') || value.contains('\0') {
        return Err(format!(
            "{text:?}: the name must be non-empty and neither part may hold NUL"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mvm").chain(args.iter().copied()))
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let cli = parse(&[
            "run",
            "--cpus",
            "2",
            "--mem",
            "512",
            "-e",
            "A=1",
            "--env",
            "B=x=y",
            "--workdir",
            "/tmp",
            "--timeout",
            "2",
            "--json",
            "--backend",
            "emulated",
            "--",
            "sh",
            "-c",
            "echo out; exit 7",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run");
        };
        assert_eq!(run.cpus, 2);
        assert_eq!(run.mem_mib, 512);
        assert_eq!(
            run.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(run.workdir.as_deref(), Some("/tmp"));
        assert_eq!(run.timeout, Some(2));
        assert!(run.json);
        assert_eq!(run.backend, Some(Tier::Emulated));
        assert_eq!(run.image, "default");
        assert_eq!(run.command, ["sh", "-c", "echo out; exit 7"]);
    }

    #[test]
    fn run_refuses_bad_input() {
        // No command parses: the image's default command runs, and an image without
        // one is refused when the run starts (run::execute).
        let Command::Run(bare) = parse(&["run"]).unwrap().command else {
            panic!("not a run");
        };
        assert!(bare.command.is_empty());
        assert!(parse(&["run", "--cpus", "0", "--", "true"]).is_err());
        assert!(parse(&["run", "--mem", "1", "--", "true"]).is_err());
        // Sizes past the limits parse: backend::resources refuses them naming the
        // limit (exit 116), with the VMM's own bounds, not the parser's.
        assert!(parse(&["run", "--mem", "1048576", "--cpus", "64", "--", "true"]).is_ok());
        assert!(parse(&["run", "--env", "NOEQUALS", "--", "true"]).is_err());
        assert!(parse(&["run", "--env", "=v", "--", "true"]).is_err());
        assert!(parse(&["run", "--backend", "vz", "--", "true"]).is_ok());
        assert!(parse(&["run", "--backend", "hyperv", "--", "true"]).is_err());
        let Command::Run(container) = parse(&["run", "--backend", "container", "--", "true"])
            .unwrap()
            .command
        else {
            panic!("not a run");
        };
        assert_eq!(container.backend, Some(Tier::Container));
        // Options after `--` belong to the command.
        let cli = parse(&["run", "--", "ls", "--json"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run");
        };
        assert!(!run.json);
        assert_eq!(run.command, ["ls", "--json"]);
    }

    #[test]
    fn run_help_documents_exit_codes() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        for code in ["120", "121", "122", "123", "124", "125", "130"] {
            assert!(help.contains(code), "{code} in run --help");
        }
    }

    #[test]
    fn image_and_doctor_parse() {
        assert!(matches!(
            parse(&["image", "ls"]).unwrap().command,
            Command::Image(ImageCommand::Ls { json: false })
        ));
        let Command::Image(ImageCommand::Inspect { reference, .. }) =
            parse(&["image", "inspect"]).unwrap().command
        else {
            panic!("not inspect");
        };
        assert_eq!(reference, "default");
        assert!(matches!(
            parse(&["doctor", "--json"]).unwrap().command,
            Command::Doctor(DoctorArgs { json: true })
        ));
    }
}
