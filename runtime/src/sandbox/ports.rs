//! A sandbox's port forwards on the host: `127.0.0.1:HOST` accepted by its
//! supervisor, each connection carried to `127.0.0.1:GUEST` in the guest as a
//! client of the sandbox's own control socket (the multiplexer checks the port
//! against the plan's forwards and records the connection). No guest network
//! device is involved: the bytes travel over vsock through the guest agent.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use mvm_agent::Client;

use super::state::socket_path;
use super::SandboxError;

/// Parses `HOST:GUEST` (`-p 8080:80`), both ports 1..=65535.
pub fn parse_forward(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{text:?} is not HOST_PORT:GUEST_PORT (e.g. 8080:80)");
    let (host, guest) = text.split_once(':').ok_or_else(bad)?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    Ok((port(host).ok_or_else(bad)?, port(guest).ok_or_else(bad)?))
}

/// The host side of each forward, bound before the sandbox boots so that a
/// port in use fails `create` at once.
pub struct Listeners {
    bound: Vec<(TcpListener, u16)>,
}

impl Listeners {
    /// Binds `127.0.0.1:host` for each `(host, guest)`.
    pub fn bind(forwards: &[(u16, u16)]) -> Result<Self, SandboxError> {
        let mut bound = Vec::new();
        for &(host, guest) in forwards {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, host))
                .map_err(|e| SandboxError::io(format!("-p {host}:{guest}: 127.0.0.1:{host}"), e))?;
            bound.push((listener, guest));
        }
        Ok(Self { bound })
    }

    /// Accepts on every listener, on threads of their own, for the life of
    /// this process: each connection goes to its guest port through `socket`.
    pub fn serve(self, socket: &Path) {
        for (listener, guest) in self.bound {
            let socket = socket.to_owned();
            let spawned = std::thread::Builder::new()
                .name(format!("forward-{guest}"))
                .spawn(move || {
                    for tcp in listener.incoming().flatten() {
                        let socket = socket.clone();
                        let _ = std::thread::Builder::new()
                            .name(format!("forward-{guest}-conn"))
                            .spawn(move || {
                                if let Err(e) = carry(tcp, &socket, guest) {
                                    tracing::info!("forward to guest port {guest}: {e}");
                                }
                            });
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start the forward to guest port {guest}: {e}");
            }
        }
    }
}

/// Carries one TCP connection to guest port `guest`, both ways, until both
/// sides are done.
fn carry(tcp: TcpStream, socket: &Path, guest: u16) -> Result<(), SandboxError> {
    let (_dir, path) =
        socket_path(socket).map_err(|e| SandboxError::io("the sandbox's control socket", e))?;
    let stream =
        UnixStream::connect(path).map_err(|e| SandboxError::io("connecting to the sandbox", e))?;
    let client = Client::connect_with_timeout(stream, Some(Duration::from_secs(10)))?;
    let mut tunnel = match client.connect_port(guest) {
        Ok(tunnel) => tunnel,
        Err(e) => {
            let _ = tcp.shutdown(Shutdown::Both);
            return Err(e.into());
        }
    };
    let writer = tunnel.writer();
    let mut from_host = tcp
        .try_clone()
        .map_err(|e| SandboxError::io("the forwarded connection", e))?;
    std::thread::Builder::new()
        .name(format!("forward-{guest}-up"))
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from_host.read(&mut buf) {
                    Ok(0) => {
                        let _ = writer.close();
                        return;
                    }
                    Ok(n) => {
                        let Some(data) = buf.get(..n) else { return };
                        if writer.write(data).is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = writer.cancel();
                        return;
                    }
                }
            }
        })
        .map_err(|e| SandboxError::io("starting a forward thread", e))?;
    let mut to_host = tcp;
    loop {
        match tunnel.read() {
            Ok(Some(data)) => {
                if to_host.write_all(&data).is_err() {
                    // Dropping the tunnel cancels it in the guest.
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = to_host.shutdown(Shutdown::Both);
                return Err(e.into());
            }
        }
    }
    let _ = to_host.shutdown(Shutdown::Write);
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_as_host_colon_guest() {
        assert_eq!(parse_forward("8080:80").unwrap(), (8080, 80));
        for bad in ["8080", "0:80", "80:0", "a:b", "70000:80", ":80", "80:"] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_port_in_use_is_refused_at_bind() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = Listeners::bind(&[(port, 80)]).err().unwrap();
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }
}
