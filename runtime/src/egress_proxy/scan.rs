//! A streaming search for several byte strings, across chunk boundaries, that can hold
//! back the bytes that might be the start of one: so that no prefix of a value is ever
//! released before it is known not to be the value.
//!
//! Each needle has a Knuth-Morris-Pratt matcher whose state is the length of the longest
//! suffix of the stream so far that is a prefix of the needle. With hold-back, the
//! scanner keeps exactly the longest such suffix over all needles: a needle can start at
//! no earlier byte, since one starting there would be either wholly seen (and found) or
//! still a prefix (and so inside the kept suffix).

use zeroize::Zeroizing;

/// A needle was found in the stream; nothing of the chunk that completed it was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Found {
    /// Its index in the list the scanner was made with.
    pub needle: usize,
}

/// One needle and how much of it the stream currently ends with.
struct Matcher {
    pattern: Zeroizing<Vec<u8>>,
    /// `borders[i]`: the longest proper prefix of `pattern[..=i]` that is also its suffix.
    borders: Vec<usize>,
    matched: usize,
}

impl Matcher {
    fn new(pattern: &[u8]) -> Self {
        let mut borders = vec![0; pattern.len()];
        let mut k = 0;
        for (i, &byte) in pattern.iter().enumerate().skip(1) {
            k = Self::advance(pattern, &borders, k, byte);
            if let Some(slot) = borders.get_mut(i) {
                *slot = k;
            }
        }
        Self {
            pattern: Zeroizing::new(pattern.to_vec()),
            borders,
            matched: 0,
        }
    }

    /// The matched length after `byte`, from matched length `k`.
    fn advance(pattern: &[u8], borders: &[usize], mut k: usize, byte: u8) -> usize {
        loop {
            if pattern.get(k) == Some(&byte) {
                return k + 1;
            }
            if k == 0 {
                return 0;
            }
            k = borders.get(k - 1).copied().unwrap_or(0);
        }
    }

    /// Feeds `input`: the end (exclusive) of the needle's first occurrence in the stream
    /// that ends inside `input`, else `None` with the state moved past `input`. A
    /// substring search over the chunk (`memchr::memmem`), with the matcher stepped
    /// only over the bytes a match begun earlier could end in and over the tail that
    /// decides the state: the same answers as [`Self::step`] byte by byte, at memory
    /// speed.
    fn scan(&mut self, input: &[u8]) -> Option<usize> {
        let n = self.pattern.len();
        if n == 0 {
            return None;
        }
        // A match begun before `input` ends within its first n - 1 bytes.
        let mut k = self.matched;
        if k > 0 {
            for (i, &byte) in input.iter().enumerate().take(n - 1) {
                k = Self::advance(&self.pattern, &self.borders, k, byte);
                if k == n {
                    return Some(i + 1);
                }
                if k == 0 {
                    break;
                }
            }
        }
        if let Some(at) = memchr::memmem::find(input, &self.pattern) {
            return Some(at + n);
        }
        // No match: the longest suffix that is a prefix of the needle is shorter than
        // it, so it lies in the last n - 1 bytes when `input` has that many.
        let start = input.len().checked_sub(n - 1);
        let (from, bytes) = match start {
            Some(start) => (0, input.get(start..).unwrap_or_default()),
            None => (self.matched, input),
        };
        self.matched = bytes.iter().fold(from, |k, &b| {
            Self::advance(&self.pattern, &self.borders, k, b)
        });
        None
    }

    /// Feeds one byte; whether the whole needle now ends the stream.
    #[cfg(test)]
    fn step(&mut self, byte: u8) -> bool {
        if self.pattern.is_empty() {
            return false;
        }
        self.matched = Self::advance(&self.pattern, &self.borders, self.matched, byte);
        self.matched == self.pattern.len()
    }
}

/// Scans a byte stream, chunk by chunk, for any of several needles.
pub(super) struct Scanner {
    matchers: Vec<Matcher>,
    hold_back: bool,
    held: Zeroizing<Vec<u8>>,
}

impl Scanner {
    /// A scanner for `needles` (empty ones never match). With `hold_back`, bytes that
    /// could be the start of a needle are kept until they are known not to be.
    pub fn new<'a>(needles: impl IntoIterator<Item = &'a [u8]>, hold_back: bool) -> Self {
        Self {
            matchers: needles.into_iter().map(Matcher::new).collect(),
            hold_back,
            held: Zeroizing::new(Vec::new()),
        }
    }

    /// Scans `input`, appending to `out` what may be passed on.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), Found> {
        // The needle whose occurrence ends first, as a byte-by-byte scan would report.
        let mut first: Option<(usize, usize)> = None;
        for (needle, matcher) in self.matchers.iter_mut().enumerate() {
            if let Some(end) = matcher.scan(input) {
                if first.is_none_or(|(e, _)| end < e) {
                    first = Some((end, needle));
                }
            }
        }
        if let Some((_, needle)) = first {
            return Err(Found { needle });
        }
        if !self.hold_back {
            out.extend_from_slice(input);
            return Ok(());
        }
        let keep = self.matchers.iter().map(|m| m.matched).max().unwrap_or(0);
        let mut all = Zeroizing::new(Vec::with_capacity(self.held.len() + input.len()));
        all.extend_from_slice(&self.held);
        all.extend_from_slice(input);
        let release = all.len().saturating_sub(keep);
        let (released, kept) = all.split_at_checked(release).unwrap_or((&[], &all));
        out.extend_from_slice(released);
        self.held = Zeroizing::new(kept.to_vec());
        Ok(())
    }

    /// The stream ended: what is held back was not a needle; appends it to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held);
        self.held.clear();
        for matcher in &mut self.matchers {
            matcher.matched = 0;
        }
    }

    /// How many bytes are held back.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to a hold-back scanner for `needles`; what it released after each
    /// chunk, and where it found one.
    fn run(needles: &[&[u8]], chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<(usize, Found)>) {
        let mut scanner = Scanner::new(needles.iter().copied(), true);
        let mut released = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut out = Vec::new();
            if let Err(found) = scanner.push(chunk, &mut out) {
                assert!(out.is_empty());
                return (released, Some((i, found)));
            }
            released.push(out);
        }
        let mut out = Vec::new();
        scanner.finish(&mut out);
        released.push(out);
        (released, None)
    }

    /// Whether `released` ends with a non-empty prefix of `value` (a value's start leaked).
    fn ends_with_prefix(released: &[u8], value: &[u8]) -> bool {
        (1..=value.len()).any(|k| released.ends_with(&value[..k]))
    }

    #[test]
    fn a_value_split_across_chunks_is_found_and_none_of_it_released() {
        let value: &[u8] = b"s3cr3t-VALUE";
        for parts in 2..=value.len() {
            // Split the value into `parts` pieces, with text before and after.
            let step = value.len().div_ceil(parts);
            let mut chunks: Vec<Vec<u8>> = vec![b"HTTP/1.1 200 OK\r\n\r\n{\"token\":\"".to_vec()];
            chunks.extend(value.chunks(step).map(<[u8]>::to_vec));
            chunks.push(b"\"}".to_vec());
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let (released, found) = run(&[b"other-needle", value], &refs);
            let (at, found) = found.expect("found");
            assert_eq!(found.needle, 1);
            assert_eq!(at, refs.len() - 2, "found when its last piece arrived");
            let all: Vec<u8> = released.concat();
            assert_eq!(all, b"HTTP/1.1 200 OK\r\n\r\n{\"token\":\"");
            assert!(!ends_with_prefix(&all, value));
        }
    }

    #[test]
    fn held_bytes_are_flushed_when_they_turn_out_not_to_be_a_value() {
        let (released, found) = run(&[b"secret"], &[b"abc sec", b"ond", b" se"]);
        assert!(found.is_none());
        assert_eq!(
            released,
            vec![
                b"abc ".to_vec(),
                b"second".to_vec(),
                b" ".to_vec(),
                b"se".to_vec()
            ]
        );
    }

    #[test]
    fn overlapping_partial_matches() {
        // "aab" in "aaab": the first 'a' is released only once "aab" cannot start there.
        let (released, found) = run(&[b"aab"], &[b"a", b"a", b"a", b"b"]);
        assert_eq!(found.map(|(i, f)| (i, f.needle)), Some((3, 0)));
        assert_eq!(released, vec![Vec::new(), Vec::new(), b"a".to_vec()]);
        let (_, found) = run(&[b"abab"], &[b"aba", b"bab"]);
        assert_eq!(found.map(|(i, _)| i), Some(1));
        let (released, found) = run(&[b"abac"], &[b"ababab", b"ab"]);
        assert!(found.is_none());
        assert_eq!(released.concat(), b"abababab");
        assert_eq!(released[0], b"abab");
    }

    #[test]
    fn several_needles_hold_the_longest_possible_start() {
        let mut scanner = Scanner::new([&b"xyz123"[..], b"23zz"], true);
        let mut out = Vec::new();
        scanner.push(b"..xyz123", &mut out).unwrap_err();
        let mut scanner = Scanner::new([&b"xyz123"[..], b"23zz"], true);
        scanner.push(b"..xyz12", &mut out).unwrap();
        assert_eq!(out, b"..");
        assert_eq!(scanner.held(), 5);
        out.clear();
        scanner.push(b"3", &mut out).unwrap_err();
    }

    #[test]
    fn without_hold_back_everything_passes_until_found() {
        let mut scanner = Scanner::new([&b"PLACEHOLDER"[..]], false);
        let mut out = Vec::new();
        scanner.push(b"body PLACE", &mut out).unwrap();
        assert_eq!(out, b"body PLACE");
        assert_eq!(scanner.push(b"HOLDER", &mut out), Err(Found { needle: 0 }));
        let mut scanner = Scanner::new([&b""[..]], true);
        out.clear();
        scanner.push(b"anything", &mut out).unwrap();
        assert_eq!(out, b"anything");
    }

    #[test]
    fn a_long_stream_never_ends_with_a_released_prefix() {
        let value: &[u8] = b"abcabd";
        let stream: Vec<u8> = b"abcab".iter().cycle().take(5000).copied().collect();
        let mut scanner = Scanner::new([value], true);
        let mut all = Vec::new();
        let mut seen = 0;
        for chunk in stream.chunks(7) {
            let mut out = Vec::new();
            scanner.push(chunk, &mut out).unwrap();
            all.extend_from_slice(&out);
            seen += chunk.len();
            assert_eq!(all.len() + scanner.held(), seen);
            // No released byte starts what could still become the value.
            for p in all.len().saturating_sub(value.len())..all.len() {
                assert!(
                    !value.starts_with(&stream[p..seen]),
                    "leaked a start at {p}"
                );
            }
        }
        scanner.finish(&mut all);
        assert_eq!(all, stream);
    }

    /// The byte-by-byte matcher over the same stream: where each needle is first found
    /// and the state at each chunk's end.
    fn oracle(needles: &[&[u8]], chunks: &[&[u8]]) -> Option<(usize, Found)> {
        let mut matchers: Vec<Matcher> = needles.iter().map(|n| Matcher::new(n)).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            for &byte in *chunk {
                for (needle, m) in matchers.iter_mut().enumerate() {
                    if m.step(byte) {
                        return Some((i, Found { needle }));
                    }
                }
            }
        }
        None
    }

    #[test]
    fn the_chunk_search_answers_as_the_byte_by_byte_matcher() {
        // xorshift: reproducible streams over a small alphabet, so prefixes recur.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let needles: [&[u8]; 3] = [b"abab", b"aab", b"babba"];
        for _ in 0..5000 {
            let len = (next() % 40) as usize;
            let stream: Vec<u8> = (0..len).map(|_| b"ab"[(next() % 2) as usize]).collect();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let take = 1 + (next() % 6) as usize;
                let (head, tail) = rest.split_at(take.min(rest.len()));
                chunks.push(head);
                rest = tail;
            }
            let count = 1 + (next() % 3) as usize;
            let want = oracle(&needles[..count], &chunks);
            let (released, got) = run(&needles[..count], &chunks);
            assert_eq!(got, want, "{stream:?} in {chunks:?}");
            if got.is_none() {
                assert_eq!(released.concat(), stream, "everything released at the end");
            }
        }
    }
}
