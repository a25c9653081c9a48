//! An interactive command on a pseudo-terminal in the guest, for `mvm sandbox
//! shell` and `mvm run -it`: this terminal in raw mode (keys, Ctrl-C included,
//! go to the guest's terminal as bytes), its size sent at start and on every
//! SIGWINCH, the guest's output written as it comes, the terminal restored on
//! the way out whatever happens. With stdin not a terminal (a script piped in)
//! nothing is put in raw mode and the bytes go through as they are.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mvm_agent::protocol::{ExecRequest, TtySize};
use mvm_agent::{ClientError, ExecEvent, Stdin};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::{self, SetArg, Termios};

use crate::sandbox::{SandboxClient, SandboxError};

/// How often the loop looks for a resize while waiting for output.
const POLL: Duration = Duration::from_millis(50);
/// The size used when this process has no terminal to ask.
const DEFAULT_SIZE: TtySize = TtySize { rows: 24, cols: 80 };

/// Set by SIGWINCH.
static RESIZED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    RESIZED.store(true, Ordering::SeqCst);
}

/// This process's terminal size (stdout's, else stdin's).
fn terminal_size() -> Option<TtySize> {
    [libc::STDOUT_FILENO, libc::STDIN_FILENO]
        .into_iter()
        .find_map(|fd| {
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes a winsize into `ws`, which outlives the call.
            let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
            (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(TtySize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            })
        })
}

/// Stdin in raw mode until dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Raw mode on stdin, if it is a terminal.
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSAFLUSH, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSAFLUSH, &self.saved);
    }
}

/// What to run on the terminal.
pub struct Interactive {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment (`TERM` is this terminal's unless given).
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest.
    pub workdir: Option<String>,
}

/// Runs `what` on a new terminal in the sandbox, wired to this one; returns the
/// shell-style exit status.
pub fn run(client: &SandboxClient, what: Interactive) -> Result<i32, SandboxError> {
    let mut env = what.env;
    env.entry("TERM".to_owned())
        .or_insert_with(|| std::env::var("TERM").unwrap_or_else(|_| "xterm".to_owned()));
    let request = ExecRequest {
        argv: what.argv,
        env,
        cwd: what.workdir,
        tty: Some(terminal_size().unwrap_or(DEFAULT_SIZE)),
        ..ExecRequest::default()
    };
    let action = SigAction::new(
        SigHandler::Handler(on_winch),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    if let Err(e) = unsafe { sigaction(Signal::SIGWINCH, &action) } {
        tracing::warn!("no SIGWINCH handler, so no resizes: {e}");
    }
    let mut exec = client.exec(&request, Stdin::Stream)?;
    let raw = RawMode::enter();
    let writer = exec.stdin();
    crate::backend::stdin_pump::spawn("tty-stdin", Box::new(std::io::stdin()), 4096, move |data| {
        if data.is_empty() {
            let _ = writer.close();
            return false;
        }
        writer.write(data).is_ok()
    })
    .map_err(|e| SandboxError::io("starting the stdin thread", e))?;
    let result = loop {
        if RESIZED.swap(false, Ordering::SeqCst) {
            if let Some(size) = terminal_size() {
                let _ = exec.resize(size.rows, size.cols);
            }
        }
        match exec.next_event_timeout(POLL) {
            Ok(Some(ExecEvent::Stdout(data) | ExecEvent::Stderr(data))) => {
                let mut out = std::io::stdout().lock();
                if let Err(e) = out.write_all(&data).and_then(|()| out.flush()) {
                    break Err(SandboxError::io("writing to the terminal", e));
                }
            }
            Ok(Some(ExecEvent::Exit(status))) => break Ok(status.shell_code()),
            Ok(None) => {
                break Err(SandboxError::Agent(ClientError::Unexpected(
                    "the terminal ended without a status".into(),
                )))
            }
            Err(ClientError::Timeout(_)) => {}
            Err(e) => break Err(e.into()),
        }
    };
    drop(raw);
    result
}
