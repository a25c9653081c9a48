//! The agent's command line and its modes, on Linux.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::Duration;

use mvm_agent::agent::{Agent, Policy, PowerAction};
use mvm_agent::container;
use mvm_agent::init::{self, guest_signal};
use mvm_agent::protocol::AGENT_VSOCK_PORT;
use tracing::Level;

const USAGE: &str = "usage: mvm-agent                         (as PID 1 in the guest)
       mvm-agent --listen-unix PATH [options]
       mvm-agent --listen-vsock PORT [options]
       mvm-agent --container --listen-unix PATH [options]   (as PID 1 of a container)
       mvm-agent --print-seccomp          (the container filter, syscall by syscall)
options: --allow-root  --uid N  --gid N  --nofile N  --nproc N  --log error|warn|info|debug";

/// The flag of container mode.
const CONTAINER: &str = "--container";

fn init_logging(level: Level) {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .try_init();
}

fn parse_level(value: &str) -> Option<Level> {
    value.parse().ok()
}

/// The environment variable of the host-side PID 1 test mode (see the crate docs).
const PID1_TEST_SOCKET_ENV: &str = "MVM_AGENT_PID1_TEST_SOCKET";

/// Serves connections forever on the guest's transport (vsock, or the test socket).
fn serve_guest(
    agent: &std::sync::Arc<Agent>,
    port: u32,
    test_socket: Option<&str>,
) -> std::io::Result<()> {
    let on_listening = || {
        if let Err(e) = guest_signal::send(guest_signal::AGENT_LISTENING) {
            tracing::warn!("agent-listening signal: {e}");
        }
    };
    match test_socket {
        Some(path) => {
            let listener = UnixListener::bind(path)?;
            on_listening();
            agent.serve_forever(|| listener.accept().map(|(stream, _)| stream))
        }
        None => agent.serve_vsock(port, on_listening),
    }
}

/// Configures the network from `mvm.net=`; a failure is logged, and the workload then
/// runs without the network it asked for (its connections fail, visibly).
fn configure_network(value: &str) {
    match mvm_agent::net_config::parse_net_config(value) {
        Ok(config) => match init::net::configure(&config) {
            Ok(name) => tracing::info!(
                "network: {name} {}/{} via {}",
                config.address,
                config.prefix_len,
                config.gateway
            ),
            Err(e) => tracing::error!("network set-up: {e}"),
        },
        Err(e) => tracing::error!("{e}"),
    }
}

/// PID 1: never returns, and never exits (that would panic the kernel).
fn run_init() -> ! {
    let test_socket = std::env::var(PID1_TEST_SOCKET_ENV).ok();
    if test_socket.is_some() {
        guest_signal::disable();
    }
    let blocked = init::block_power_signals();
    let mut mount_failures = init::mount_early();
    init::ensure_stdio();
    let cmdline = init::kernel_cmdline();
    let level = init::cmdline_value(&cmdline, "mvm.agent.log")
        .and_then(parse_level)
        .unwrap_or(Level::WARN);
    init_logging(level);
    // An image's root disk becomes `/` before anything else is mounted in it; a root
    // the plan named but that does not mount stops the guest (never a workload in the
    // initramfs instead).
    match init::root::RootDisk::from_cmdline(&cmdline)
        .and_then(|root| root.map(|r| init::root::switch(&r)).transpose())
    {
        Ok(Some(())) => mount_failures = init::mount_filesystems(),
        Ok(None) => mount_failures.extend(init::mount_rest()),
        Err(e) => {
            tracing::error!("{e}; powering off");
            eprintln!("mvm-agent: {e}; powering off");
            init::power::power_off(false);
        }
    }
    if let Err(e) = guest_signal::send(guest_signal::INIT_REACHED) {
        tracing::warn!("init-reached signal: {e}");
    }
    if let Err(e) = blocked {
        tracing::warn!("cannot block power signals: {e}");
    }
    for failure in &mount_failures {
        tracing::warn!("{failure}");
    }
    let hostname = init::cmdline_value(&cmdline, "mvm.hostname").unwrap_or("mvm");
    if let Err(e) = init::set_hostname(hostname) {
        tracing::warn!("hostname {hostname:?}: {e}");
    }
    if let Err(e) = init::net::loopback_up() {
        tracing::warn!("lo up: {e}");
    }
    if let Some(value) = init::cmdline_value(&cmdline, mvm_agent::net_config::CMDLINE_KEY) {
        configure_network(value);
    }
    let port = init::cmdline_value(&cmdline, "mvm.agent.port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(AGENT_VSOCK_PORT);
    let policy = Policy::from_cmdline(&cmdline);
    let mut attempt: u32 = 0;
    loop {
        match Agent::new(policy.clone(), true, PowerAction::Guest) {
            Ok(agent) => {
                if let Err(e) = init::spawn_power_signal_thread() {
                    tracing::warn!("power signal thread: {e}");
                }
                loop {
                    // The vsock driver may probe after init starts: retry until it is there.
                    let result = serve_guest(&agent, port, test_socket.as_deref());
                    if let Err(e) = result {
                        if attempt % 50 == 0 {
                            tracing::warn!("listening on vsock port {port}: {e}; retrying");
                        }
                    }
                    attempt = attempt.wrapping_add(1);
                    std::thread::sleep(Duration::from_millis(if attempt < 100 {
                        20
                    } else {
                        1000
                    }));
                }
            }
            Err(e) => {
                tracing::error!("cannot start the agent: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Listen {
    Unix(String),
    Vsock(u32),
}

#[derive(Debug)]
struct Options {
    listen: Listen,
    policy: Policy,
    level: Level,
    /// PID 1 of a container (`--container`): only with a Unix socket.
    container: bool,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut listen = None;
    let mut policy = Policy::default();
    let mut level = Level::INFO;
    let mut container = false;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = |name: &str| {
            iter.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--listen-unix" => listen = Some(Listen::Unix(value(arg)?)),
            "--listen-vsock" => {
                let v = value(arg)?;
                listen = Some(Listen::Vsock(
                    v.parse().map_err(|_| format!("bad vsock port {v:?}"))?,
                ));
            }
            CONTAINER => container = true,
            "--allow-root" => policy.allow_root = true,
            "--uid" => {
                let v = value(arg)?;
                policy.default_uid = v.parse().map_err(|_| format!("bad uid {v:?}"))?;
            }
            "--gid" => {
                let v = value(arg)?;
                policy.default_gid = v.parse().map_err(|_| format!("bad gid {v:?}"))?;
            }
            "--nofile" => {
                let v = value(arg)?;
                policy.limits.nofile = v.parse().map_err(|_| format!("bad --nofile {v:?}"))?;
            }
            "--nproc" => {
                let v = value(arg)?;
                policy.limits.nproc = v.parse().map_err(|_| format!("bad --nproc {v:?}"))?;
            }
            "--log" => {
                let v = value(arg)?;
                level = parse_level(&v).ok_or_else(|| format!("bad log level {v:?}"))?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen = listen.ok_or("one of --listen-unix or --listen-vsock is required")?;
    if container && !matches!(listen, Listen::Unix(_)) {
        return Err(format!(
            "{CONTAINER} serves a Unix socket only: give --listen-unix PATH (a container \
             has no vsock)"
        ));
    }
    Ok(Options {
        listen,
        policy,
        level,
        container,
    })
}

/// Binds the Unix socket at `path`, replacing a stale socket from an earlier run (any
/// other file is left, and the bind fails).
fn bind_unix(path: &str) -> std::io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {path}: {e}")))
}

/// PID 1 of a container (`--container`): no VM init; the container filter on the whole
/// process tree before anything is served; a shutdown request or SIGTERM ends it.
fn run_container(path: &str, policy: Policy, level: Level) -> ExitCode {
    if let Err(e) = container::prepare_process() {
        init_logging(level);
        tracing::error!("container set-up: {e}");
        return ExitCode::FAILURE;
    }
    init_logging(level);
    if std::process::id() == 1 {
        for failure in container::make_dirs() {
            tracing::warn!("{failure}");
        }
    } else {
        // Tests, by hand or in guest-agent/tests: the root and /run are the host's.
        tracing::warn!(
            "{CONTAINER} but not PID 1: no container root to prepare ({}), orphans come to \
             this agent as a subreaper, and a shutdown ends only the agent",
            container::SECRETS_DIR
        );
    }
    // Before any thread or workload: the filter is for every process of the container.
    if let Err(e) = mvm_seccomp::install_container_filter() {
        tracing::error!("{e}; not serving without it");
        return ExitCode::FAILURE;
    }
    tracing::info!(
        "container seccomp filter installed: {} rules (mvm-agent --print-seccomp)",
        mvm_seccomp::container::DENIED.len()
    );
    let listener = match bind_unix(path) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let agent = match Agent::new(policy, false, PowerAction::Container) {
        Ok(agent) => agent,
        Err(e) => {
            tracing::error!("cannot start the agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = container::spawn_stop_thread() {
        tracing::warn!("stop-signal thread: {e}; SIGTERM will not end the container");
    }
    tracing::info!("container agent listening on {path}");
    match agent.serve_forever(|| listener.accept().map(|(stream, _)| stream)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::process::id() == 1 && !args.iter().any(|a| a == CONTAINER) {
        run_init();
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version") {
        println!("{}", mvm_agent::agent::software());
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--print-seccomp") {
        print!("{}", mvm_seccomp::container::describe());
        return ExitCode::SUCCESS;
    }
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("mvm-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if options.container {
        if let Listen::Unix(path) = &options.listen {
            return run_container(path, options.policy, options.level);
        }
    }
    init_logging(options.level);
    let agent = match Agent::new(options.policy, false, PowerAction::ExitProcess) {
        Ok(agent) => agent,
        Err(e) => {
            tracing::error!("cannot start the agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match options.listen {
        Listen::Unix(path) => bind_unix(&path).and_then(|listener| {
            tracing::info!("listening on {path}");
            agent.serve_forever(|| listener.accept().map(|(stream, _)| stream))
        }),
        Listen::Vsock(port) => agent.serve_vsock(port, || {}),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        parse_args(&args)
    }

    #[test]
    fn container_mode_needs_a_unix_socket() {
        let options = parse(&["--container", "--listen-unix", "/run/mvm/agent.sock"]).unwrap();
        assert!(options.container);
        assert_eq!(options.listen, Listen::Unix("/run/mvm/agent.sock".into()));
        // The order does not matter; the policy options still apply.
        let options = parse(&[
            "--listen-unix",
            "/s",
            "--uid",
            "2000",
            "--container",
            "--log",
            "warn",
        ])
        .unwrap();
        assert!(options.container);
        assert_eq!(options.policy.default_uid, 2000);
        assert_eq!(options.level, Level::WARN);

        for refused in [
            &["--container"][..],
            &["--container", "--listen-vsock", "1024"],
            &["--listen-vsock", "1024", "--container"],
        ] {
            let e = parse(refused).unwrap_err();
            assert!(e.contains("--listen-unix"), "{refused:?}: {e}");
        }
    }

    #[test]
    fn limits_come_from_their_flags() {
        let options = parse(&["--listen-unix", "/s", "--nofile", "64", "--nproc", "32"]).unwrap();
        assert_eq!(options.policy.limits.nofile, 64);
        assert_eq!(options.policy.limits.nproc, 32);
        assert!(parse(&["--listen-unix", "/s", "--nofile", "many"]).is_err());
        assert!(parse(&["--listen-unix", "/s", "--nproc"]).is_err());
    }

    #[test]
    fn without_the_flag_nothing_changes() {
        let options = parse(&["--listen-vsock", "1024"]).unwrap();
        assert!(!options.container);
        assert_eq!(options.listen, Listen::Vsock(1024));
        let options = parse(&["--listen-unix", "/s"]).unwrap();
        assert!(!options.container);
        assert!(parse(&["--containers", "--listen-unix", "/s"]).is_err());
    }
}
