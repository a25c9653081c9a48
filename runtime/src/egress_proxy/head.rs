//! The guest's request head: found in the decrypted stream, parsed, and judged (refused,
//! or rewritten with values substituted) before any byte goes upstream. Pure functions:
//! the surface a hostile guest reaches first.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddrV4};

use zeroize::Zeroizing;

use super::{Binding, Refusal};

/// The most bytes a request head may have, its final CRLF CRLF included.
pub(super) const MAX_HEAD_BYTES: usize = 64 << 10;

/// The most header fields a request head may have.
pub(super) const MAX_HEADERS: usize = 100;

/// The most bytes a head may have once values are in it.
pub(super) const MAX_REWRITTEN_HEAD_BYTES: usize = 1 << 20;

/// What ends a head.
const HEAD_END: &[u8] = b"\r\n\r\n";

/// Hop-by-hop headers dropped from every request (one `Connection: close` replaces them).
const CONNECTION_HEADERS: [&str; 3] = ["connection", "keep-alive", "proxy-connection"];

/// Collects the decrypted stream until a whole head is in.
#[derive(Default)]
pub(super) struct HeadBuffer {
    buf: Vec<u8>,
}

/// What [`HeadBuffer::push`] has so far.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeadProgress {
    /// No end yet.
    Incomplete,
    /// A whole head, and the bytes that followed it (the start of a body, or more).
    Complete {
        /// The head, its final CRLF CRLF included.
        head: Vec<u8>,
        /// What came after it.
        rest: Vec<u8>,
    },
    /// More than [`MAX_HEAD_BYTES`] without an end.
    TooLarge,
}

impl HeadBuffer {
    /// Adds what was read.
    pub fn push(&mut self, bytes: &[u8]) -> HeadProgress {
        let searched = self.buf.len();
        self.buf.extend_from_slice(bytes);
        match head_end(&self.buf, searched) {
            Some(end) if end <= MAX_HEAD_BYTES => {
                let rest = self.buf.split_off(end);
                HeadProgress::Complete {
                    head: std::mem::take(&mut self.buf),
                    rest,
                }
            }
            Some(_) => HeadProgress::TooLarge,
            None if self.buf.len() >= MAX_HEAD_BYTES => HeadProgress::TooLarge,
            None => HeadProgress::Incomplete,
        }
    }

    /// Whether nothing was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Where the head ends in `buf` (the index after its CRLF CRLF), the first `searched`
/// bytes having been searched before.
fn head_end(buf: &[u8], searched: usize) -> Option<usize> {
    let from = searched.saturating_sub(HEAD_END.len() - 1);
    let found = buf
        .get(from..)?
        .windows(HEAD_END.len())
        .position(|w| w == HEAD_END)?;
    Some(from + found + HEAD_END.len())
}

/// A request to forward.
pub(super) struct Forward {
    /// The head to send upstream: values in, connection headers replaced.
    pub head: Zeroizing<Vec<u8>>,
    /// The host the request is for (lowercase, no port): the upstream's TLS name.
    pub host: String,
    /// The bindings whose values went into `head`, each once.
    pub substituted: Vec<usize>,
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("head", &"<redacted>")
            .field("host", &self.host)
            .field("substituted", &self.substituted)
            .finish()
    }
}

/// A refused request: why, which secret it concerns, which host it was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refused {
    /// Why.
    pub reason: Refusal,
    /// The secret concerned, if one is.
    pub secret: Option<String>,
    /// The host asked for (Host header, else SNI), if known.
    pub host: Option<String>,
}

/// Judges one request head (`head`, as [`HeadBuffer`] returned it) sent over a TLS
/// connection with SNI `sni` to `destination`: refuses it, or rewrites it with each
/// placeholder in a header value replaced by its binding's value.
pub(super) fn judge(
    head: &[u8],
    sni: Option<&str>,
    bindings: &[Binding],
    destination: SocketAddrV4,
) -> Result<Forward, Refused> {
    let sni = sni.map(str::to_ascii_lowercase);
    let refuse = |reason, secret: Option<&Binding>, host: Option<&str>| Refused {
        reason,
        secret: secret.map(|b| b.secret.clone()),
        host: host.map(str::to_owned).or_else(|| sni.clone()),
    };
    let mut header_storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut header_storage);
    match request.parse(head) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        _ => return Err(refuse(Refusal::BadRequest, None, None)),
    }
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(refuse(Refusal::BadRequest, None, None));
    };
    let headers = request.headers;
    let mut hosts = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host_value = match (hosts.next(), hosts.next()) {
        (None, _) => return Err(refuse(Refusal::NoHost, None, None)),
        (Some(_), Some(_)) => return Err(refuse(Refusal::DuplicateHost, None, None)),
        (Some(h), None) => h.value,
    };
    let host = host_name(host_value);
    let host_ref = host.as_deref();
    let placeholders = Placeholders::new(bindings);

    if let Some(b) = placeholders
        .any_in(target.as_bytes())
        .or(placeholders.any_in(method.as_bytes()))
        .or(placeholders.any_in(host_value))
    {
        return Err(refuse(Refusal::PlaceholderInTarget, Some(b), host_ref));
    }
    if let Some(b) = headers
        .iter()
        .find_map(|h| placeholders.any_in(h.name.as_bytes()))
    {
        return Err(refuse(Refusal::PlaceholderInHeaderName, Some(b), host_ref));
    }
    // Origin form ("/path?query") or "*": what clients send to an origin server. The
    // absolute form would name a host of its own, beside the Host header.
    if !(target.starts_with('/') || target == "*") {
        return Err(refuse(Refusal::BadRequest, None, host_ref));
    }
    let Some(host) = host else {
        return Err(refuse(Refusal::BadRequest, None, None));
    };
    if sni.as_ref().is_some_and(|sni| *sni != host) {
        return Err(refuse(Refusal::HostMismatch, None, Some(&host)));
    }

    let mut kept: Vec<(&str, Zeroizing<Vec<u8>>)> = Vec::with_capacity(headers.len());
    let mut substituted: Vec<usize> = Vec::new();
    for header in headers.iter() {
        let mut used = Vec::new();
        let value = placeholders.substitute(header.value, |candidates| {
            let Some(&index) = candidates.iter().find(|&&i| {
                bindings
                    .get(i)
                    .is_some_and(|b| b.host == host && b.serves(destination))
            }) else {
                let named = candidates.first().and_then(|&i| bindings.get(i));
                return Err(refuse(Refusal::NotBound, named, Some(&host)));
            };
            let binding = bindings
                .get(index)
                .ok_or_else(|| refuse(Refusal::NotBound, None, None))?;
            if !header_safe(binding.value.expose()) {
                return Err(refuse(Refusal::UnsafeValue, Some(binding), Some(&host)));
            }
            used.push(index);
            Ok(binding.value.expose())
        })?;
        let lower = header.name.to_ascii_lowercase();
        if CONNECTION_HEADERS.contains(&lower.as_str()) {
            continue;
        }
        for index in used {
            if !substituted.contains(&index) {
                substituted.push(index);
            }
        }
        kept.push((header.name, value));
    }

    let mut out = Zeroizing::new(Vec::with_capacity(head.len().saturating_add(64)));
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(if version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for (name, value) in &kept {
        if !substituted.is_empty() && name.eq_ignore_ascii_case("accept-encoding") {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n");
    if !substituted.is_empty() {
        // Plain bytes, so the response can be scanned for reflected values.
        out.extend_from_slice(b"Accept-Encoding: identity\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if out.len() > MAX_REWRITTEN_HEAD_BYTES {
        return Err(refuse(Refusal::BadRequest, None, Some(&host)));
    }
    Ok(Forward {
        head: out,
        host,
        substituted,
    })
}

/// The host part of a Host header's value, lowercase, without its port; `None` if it is
/// not a DNS name, an IPv4 address or a bracketed IPv6 address with an optional port.
fn host_name(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?;
    let (host, port) = match value.strip_prefix('[') {
        Some(bracketed) => {
            let (inner, after) = bracketed.split_once(']')?;
            inner.parse::<Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':')?),
            };
            (inner, port)
        }
        None => match value.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        },
    };
    let port_ok = port.is_none_or(|p| (1..=5).contains(&p.len()) && p.parse::<u16>().is_ok());
    let name_ok = !host.is_empty()
        && (value.starts_with('[')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
    (port_ok && name_ok).then(|| host.to_ascii_lowercase())
}

/// Whether `value` can stand in a header value: visible ASCII, with spaces and tabs only
/// inside; never empty.
pub fn header_safe(value: &[u8]) -> bool {
    let visible = |b: &u8| (0x21..=0x7e).contains(b);
    value.first().is_some_and(visible)
        && value.last().is_some_and(visible)
        && value
            .iter()
            .all(|b| visible(b) || *b == b' ' || *b == b'\t')
}

/// Every binding's placeholder, longest first, each with the bindings that use it.
struct Placeholders<'a> {
    entries: Vec<(&'a [u8], Vec<usize>)>,
    bindings: &'a [Binding],
}

impl<'a> Placeholders<'a> {
    fn new(bindings: &'a [Binding]) -> Self {
        let mut entries: Vec<(&'a [u8], Vec<usize>)> = Vec::new();
        for (index, binding) in bindings.iter().enumerate() {
            let placeholder = binding.placeholder.as_bytes();
            if placeholder.is_empty() {
                continue;
            }
            match entries.iter_mut().find(|(p, _)| *p == placeholder) {
                Some((_, users)) => users.push(index),
                None => entries.push((placeholder, vec![index])),
            }
        }
        entries.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self { entries, bindings }
    }

    /// A binding whose placeholder occurs anywhere in `haystack`.
    fn any_in(&self, haystack: &[u8]) -> Option<&'a Binding> {
        self.entries
            .iter()
            .find(|(p, _)| haystack.windows(p.len()).any(|w| w == *p))
            .and_then(|(_, users)| users.first())
            .and_then(|&i| self.bindings.get(i))
    }

    /// `haystack` with every placeholder (the longest at each position, left to right)
    /// replaced by what `value_for` gives for the bindings that use it.
    fn substitute<'v, E>(
        &self,
        haystack: &[u8],
        mut value_for: impl FnMut(&[usize]) -> Result<&'v [u8], E>,
    ) -> Result<Zeroizing<Vec<u8>>, E> {
        let mut out = Zeroizing::new(Vec::with_capacity(haystack.len()));
        let mut rest = haystack;
        while let Some((&byte, after)) = rest.split_first() {
            match self.entries.iter().find(|(p, _)| rest.starts_with(p)) {
                Some((placeholder, users)) => {
                    out.extend_from_slice(value_for(users)?);
                    rest = rest.get(placeholder.len()..).unwrap_or_default();
                }
                None => {
                    out.push(byte);
                    rest = after;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::SecretValue;
    use std::net::Ipv4Addr;

    const PH: &str = "MVM_PLACEHOLDER_API_TOKEN_1f2e";
    const VALUE: &[u8] = b"s3cr3t-value/xyz";

    fn binding(secret: &str, placeholder: &str, value: &[u8], host: &str) -> Binding {
        Binding {
            secret: secret.to_owned(),
            placeholder: placeholder.to_owned(),
            value: SecretValue::new(value.to_vec()),
            host: host.to_owned(),
            addresses: vec![Ipv4Addr::new(10, 1, 2, 3)],
            port: 443,
        }
    }

    fn bindings() -> Vec<Binding> {
        vec![
            binding("API_TOKEN", PH, VALUE, "api.mvm.test"),
            binding(
                "OTHER",
                "MVM_PLACEHOLDER_OTHER_9a9a",
                b"other-value",
                "other.mvm.test",
            ),
        ]
    }

    fn dest() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 443)
    }

    fn judge_str(head: &str, sni: Option<&str>) -> Result<Forward, Refused> {
        judge(head.as_bytes(), sni, &bindings(), dest())
    }

    fn refusal(head: &str, sni: Option<&str>) -> (Refusal, Option<String>) {
        let refused = judge_str(head, sni).unwrap_err();
        (refused.reason, refused.secret)
    }

    #[test]
    fn substitutes_in_header_values_exactly() {
        let head = format!(
            "POST /v1/x?y=1 HTTP/1.1\r\nHost: api.mvm.test\r\nAuthorization: Bearer {PH}\r\n\
             Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nAccept-Encoding: gzip\r\n\
             X-Two: {PH},{PH}\r\nContent-Length: 0\r\n\r\n"
        );
        let forward = judge_str(&head, Some("api.mvm.test")).unwrap();
        let expected = "POST /v1/x?y=1 HTTP/1.1\r\nHost: api.mvm.test\r\n\
             Authorization: Bearer s3cr3t-value/xyz\r\n\
             X-Two: s3cr3t-value/xyz,s3cr3t-value/xyz\r\nContent-Length: 0\r\n\
             Connection: close\r\nAccept-Encoding: identity\r\n\r\n";
        assert_eq!(std::str::from_utf8(&forward.head).unwrap(), expected);
        assert_eq!(forward.host, "api.mvm.test");
        assert_eq!(forward.substituted, vec![0]);
        assert!(!format!("{forward:?}").contains("s3cr3t"));
    }

    #[test]
    fn passes_a_request_without_placeholders_with_connection_close() {
        let head = "GET / HTTP/1.0\r\nHost: api.mvm.test:443\r\nProxy-Connection: x\r\n\
                    Accept-Encoding: br\r\n\r\n";
        let forward = judge_str(head, None).unwrap();
        assert_eq!(
            std::str::from_utf8(&forward.head).unwrap(),
            "GET / HTTP/1.0\r\nHost: api.mvm.test:443\r\nAccept-Encoding: br\r\n\
             Connection: close\r\n\r\n"
        );
        assert!(forward.substituted.is_empty());
    }

    #[test]
    fn host_with_port_and_case_matches_the_binding() {
        let head = format!("GET / HTTP/1.1\r\nHost: API.mvm.TEST:8443\r\nX-K: {PH}\r\n\r\n");
        let forward = judge_str(&head, Some("api.mvm.test")).unwrap();
        assert_eq!(forward.host, "api.mvm.test");
        assert_eq!(forward.substituted, vec![0]);
    }

    #[test]
    fn placeholder_in_path_query_host_or_header_name_is_refused() {
        let api = Some("API_TOKEN".to_owned());
        for head in [
            format!("GET /{PH} HTTP/1.1\r\nHost: api.mvm.test\r\n\r\n"),
            format!("GET /a?token={PH}&b=1 HTTP/1.1\r\nHost: api.mvm.test\r\n\r\n"),
            format!("GET / HTTP/1.1\r\nHost: {PH}.mvm.test\r\n\r\n"),
            // The method is a token, and a placeholder is one (found by the fuzz target).
            format!("{PH} / HTTP/1.1\r\nHost: api.mvm.test\r\n\r\n"),
        ] {
            assert_eq!(
                refusal(&head, None),
                (Refusal::PlaceholderInTarget, api.clone())
            );
        }
        let head = format!("GET / HTTP/1.1\r\nHost: api.mvm.test\r\nX-{PH}: 1\r\n\r\n");
        assert_eq!(
            refusal(&head, None),
            (Refusal::PlaceholderInHeaderName, api)
        );
    }

    #[test]
    fn placeholder_for_another_host_or_address_is_not_bound() {
        let head = format!("GET / HTTP/1.1\r\nHost: other.mvm.test\r\nAuthorization: {PH}\r\n\r\n");
        assert_eq!(
            refusal(&head, Some("other.mvm.test")),
            (Refusal::NotBound, Some("API_TOKEN".to_owned()))
        );
        // OTHER is bound to other.mvm.test, but at another address than this connection's.
        let head =
            "GET / HTTP/1.1\r\nHost: other.mvm.test\r\nX: MVM_PLACEHOLDER_OTHER_9a9a\r\n\r\n";
        let mut bs = bindings();
        bs[1].addresses = vec![Ipv4Addr::new(10, 9, 9, 9)];
        let refused = judge(head.as_bytes(), None, &bs, dest()).unwrap_err();
        assert_eq!(refused.reason, Refusal::NotBound);
        assert_eq!(refused.secret.as_deref(), Some("OTHER"));
        assert_eq!(refused.host.as_deref(), Some("other.mvm.test"));
        // And to the wrong port.
        let head = format!("GET / HTTP/1.1\r\nHost: api.mvm.test\r\nX: {PH}\r\n\r\n");
        let other_port = SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 8443);
        let refused = judge(head.as_bytes(), None, &bindings(), other_port).unwrap_err();
        assert_eq!(refused.reason, Refusal::NotBound);
    }

    #[test]
    fn host_header_rules() {
        assert_eq!(
            refusal("GET / HTTP/1.1\r\nX: 1\r\n\r\n", None).0,
            Refusal::NoHost
        );
        assert_eq!(
            refusal(
                "GET / HTTP/1.1\r\nHost: api.mvm.test\r\nhost: api.mvm.test\r\n\r\n",
                None
            )
            .0,
            Refusal::DuplicateHost
        );
        assert_eq!(
            refusal(
                "GET / HTTP/1.1\r\nHost: other.mvm.test\r\n\r\n",
                Some("api.mvm.test")
            )
            .0,
            Refusal::HostMismatch
        );
        for bad in [
            "a b",
            "api.mvm.test:",
            "api.mvm.test:99999",
            "x@api.mvm.test",
            "[::1",
            "",
        ] {
            let head = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_eq!(refusal(&head, None).0, Refusal::BadRequest, "{bad:?}");
        }
        assert_eq!(host_name(b"[::1]:443").as_deref(), Some("::1"));
        assert_eq!(host_name(b"10.1.2.3").as_deref(), Some("10.1.2.3"));
    }

    #[test]
    fn unsafe_values_are_refused() {
        for value in [
            &b"a\r\nX-Injected: 1"[..],
            b"a\0b",
            b" lead",
            b"trail\t",
            b"",
            b"caf\xc3\xa9",
        ] {
            let bs = vec![binding("API_TOKEN", PH, value, "api.mvm.test")];
            let head = format!("GET / HTTP/1.1\r\nHost: api.mvm.test\r\nA: {PH}\r\n\r\n");
            let refused = judge(head.as_bytes(), None, &bs, dest()).unwrap_err();
            assert_eq!(refused.reason, Refusal::UnsafeValue);
        }
        assert!(header_safe(b"Basic a b\tc"));
    }

    #[test]
    fn malformed_heads_are_bad_requests() {
        let too_many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        for head in [
            "GET / HTTP/1.1\r\nHost api.mvm.test\r\n\r\n".to_owned(),
            "GET https://api.mvm.test/ HTTP/1.1\r\nHost: api.mvm.test\r\n\r\n".to_owned(),
            "GET / HTTP/2.0\r\nHost: api.mvm.test\r\n\r\n".to_owned(),
            format!("GET / HTTP/1.1\r\nHost: api.mvm.test\r\n{too_many}\r\n"),
            // Ends early at the bare LFs: the rest would be a second head upstream.
            format!("GET / HTTP/1.1\nHost: api.mvm.test\n\nX: {PH}\r\n\r\n"),
            "GET / HTTP/1.1\r\nHost: api.mvm.test\r\nX: a\x01b\r\n\r\n".to_owned(),
        ] {
            assert_eq!(refusal(&head, None).0, Refusal::BadRequest, "{head:?}");
        }
    }

    #[test]
    fn a_head_that_grows_too_large_with_values_is_refused() {
        let bs = vec![binding("API_TOKEN", PH, &[b'v'; 1000], "api.mvm.test")];
        let many = PH.repeat(2000);
        let head = format!("GET / HTTP/1.1\r\nHost: api.mvm.test\r\nX: {many}\r\n\r\n");
        assert!(head.len() < MAX_HEAD_BYTES);
        let refused = judge(head.as_bytes(), None, &bs, dest()).unwrap_err();
        assert_eq!(refused.reason, Refusal::BadRequest);
    }

    #[test]
    fn longest_placeholder_wins() {
        let mut bs = bindings();
        bs.push(binding(
            "LONG",
            &format!("{PH}_LONG"),
            b"long-value",
            "api.mvm.test",
        ));
        let head = format!("GET / HTTP/1.1\r\nHost: api.mvm.test\r\nA: {PH}_LONG {PH}\r\n\r\n");
        let forward = judge(head.as_bytes(), None, &bs, dest()).unwrap();
        let text = std::str::from_utf8(&forward.head).unwrap();
        assert!(
            text.contains("A: long-value s3cr3t-value/xyz\r\n"),
            "{text}"
        );
        assert_eq!(forward.substituted, vec![2, 0]);
    }

    #[test]
    fn head_buffer_across_many_small_reads() {
        let head = format!("GET / HTTP/1.1\r\nHost: api.mvm.test\r\nA: {PH}\r\n\r\n");
        let mut buffer = HeadBuffer::default();
        let mut progress = HeadProgress::Incomplete;
        for byte in head.as_bytes() {
            assert_eq!(progress, HeadProgress::Incomplete);
            progress = buffer.push(std::slice::from_ref(byte));
        }
        assert_eq!(
            progress,
            HeadProgress::Complete {
                head: head.into_bytes(),
                rest: Vec::new()
            }
        );
        let mut buffer = HeadBuffer::default();
        assert_eq!(
            buffer.push(b"GET / HTTP/1.1\r\nHost: a\r\n\r"),
            HeadProgress::Incomplete
        );
        assert_eq!(
            buffer.push(b"\nBODY"),
            HeadProgress::Complete {
                head: b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                rest: b"BODY".to_vec()
            }
        );
    }

    #[test]
    fn huge_heads_are_too_large() {
        let mut buffer = HeadBuffer::default();
        let line = format!("X-Filler: {}\r\n", "f".repeat(1000));
        let mut progress = buffer.push(b"GET / HTTP/1.1\r\n");
        while progress == HeadProgress::Incomplete {
            progress = buffer.push(line.as_bytes());
        }
        assert_eq!(progress, HeadProgress::TooLarge);
        // An end found past the limit is no better.
        let mut buffer = HeadBuffer::default();
        let mut big = vec![b'a'; MAX_HEAD_BYTES];
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(buffer.push(&big), HeadProgress::TooLarge);
    }
}
