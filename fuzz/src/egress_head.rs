//! `egress_head`: the egress proxy's first contact with a hostile guest. The guest's
//! decrypted stream is cut into its request head (`HeadBuffer`, fed in pieces) and the
//! head judged (`head::judge`): refused, or rewritten with each placeholder in a header
//! value replaced by its binding's value (`runtime/src/egress_proxy/`).
//!
//! Input: byte 0 chooses the TLS SNI (none, the bound host, the other bound host, an
//! unbound name, the bound host in capitals) and the destination (bit 3: the bound
//! address and port, else another port); byte 1 is the piece size the stream is fed in;
//! the rest is the stream.
//!
//! Invariants: feeding the stream whole or in pieces finds the same head; a forwarded
//! head ends the head, says `Connection: close`, parses again whole with one `Host`
//! whose name is the host judged (and the SNI's, when one was sent); no placeholder is
//! left in it; a value appears in it only for a binding reported as substituted, which
//! serves that host and destination, and only in header values (never in the request
//! line), unless the guest sent the value itself; a placeholder in the request target
//! is never forwarded.

use std::net::{Ipv4Addr, SocketAddrV4};

use mvm_runtime::egress_proxy::fuzzing::{judge, split_head};
use mvm_runtime::egress_proxy::Binding;
use mvm_runtime::secrets::SecretValue;

/// The bound hosts, their address and port.
pub const HOST: &str = "api.mvm.test";
pub const OTHER_HOST: &str = "upload.mvm.test";
const ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const PORT: u16 = 443;
/// What the guest sees, and the values.
pub const PLACEHOLDERS: [&str; 2] = ["MVM_PH_TOKEN_a1", "MVM_PH_UPLOAD_b2"];
const VALUES: [&str; 2] = ["sk-live-0123456789", "up-key-abcdef"];

fn bindings() -> Vec<Binding> {
    vec![
        Binding {
            secret: "TOKEN".into(),
            placeholder: PLACEHOLDERS[0].into(),
            value: SecretValue::new(VALUES[0].as_bytes().to_vec()),
            host: HOST.into(),
            addresses: vec![ADDRESS],
            port: PORT,
        },
        Binding {
            secret: "UPLOAD".into(),
            placeholder: PLACEHOLDERS[1].into(),
            value: SecretValue::new(VALUES[1].as_bytes().to_vec()),
            host: OTHER_HOST.into(),
            addresses: vec![ADDRESS],
            port: PORT,
        },
    ]
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (Some(&mode), Some(&piece)) = (data.first(), data.get(1)) else {
        return;
    };
    let stream = &data[2..];
    let sni = match mode & 7 {
        1 => Some(HOST.to_owned()),
        2 => Some(OTHER_HOST.to_owned()),
        3 => Some("evil.example".to_owned()),
        4 => Some(HOST.to_ascii_uppercase()),
        _ => None,
    };
    let destination = SocketAddrV4::new(ADDRESS, if mode & 8 == 0 { PORT } else { 8443 });

    let whole = split_head(&[stream]);
    let pieces: Vec<&[u8]> = stream.chunks(usize::from(piece.max(1))).collect();
    assert_eq!(
        split_head(&pieces),
        whole,
        "the head depends on how the stream was cut"
    );
    let Some((head, rest)) = whole else { return };
    assert!(head.ends_with(b"\r\n\r\n"));
    assert_eq!(head.len() + rest.len(), stream.len());

    let bindings = bindings();
    // The request line ends at its LF (httparse takes a bare LF as a line end too).
    let first_line_end = head.iter().position(|&b| b == b'\n').unwrap_or(0);
    let target_has_placeholder = PLACEHOLDERS
        .iter()
        .any(|p| contains(&head[..first_line_end], p));
    let Ok((out, host, substituted)) = judge(&head, sni.as_deref(), &bindings, destination) else {
        return;
    };
    assert!(
        !target_has_placeholder,
        "a placeholder in the target went out"
    );
    assert!(out.ends_with(b"\r\n\r\n"), "a forwarded head is not a head");
    assert!(contains(&out, "\r\nConnection: close\r\n"));
    if let Some(sni) = &sni {
        assert_eq!(
            sni.to_ascii_lowercase(),
            host,
            "forwarded for a host other than the SNI's"
        );
    }

    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(&out);
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(n)) if n == out.len()),
        "the forwarded head does not parse again: {:?}",
        String::from_utf8_lossy(&out)
    );
    let hosts: Vec<&[u8]> = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value)
        .collect();
    assert_eq!(hosts.len(), 1, "a forwarded head has one Host");

    for p in PLACEHOLDERS {
        assert!(!contains(&out, p), "a placeholder was forwarded");
    }
    let line_end = out.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
    for (i, (binding, value)) in bindings.iter().zip(VALUES).enumerate() {
        if contains(stream, value) {
            continue;
        }
        if substituted.contains(&i) {
            assert_eq!(binding.host, host, "a value went to another host");
            assert_eq!(destination.port(), binding.port);
            assert!(
                !contains(&out[..line_end], value),
                "a value in the request line"
            );
        } else {
            assert!(!contains(&out, value), "a value went out unreported");
        }
    }
}
