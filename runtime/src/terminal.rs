//! Text from a guest or a VM log, made safe to print on the user's terminal.
//!
//! A VM log holds whatever the firmware, the guest kernel or the VMM wrote to
//! the console: SeaBIOS starts with `ESC c` (reset) and `ESC [2J` (clear), and a
//! hostile guest can write any escape sequence it likes (retitle the window,
//! remap keys, hide text). Every diagnostic `mvm` prints that carries such text
//! goes through [`escape_controls`]. The workload's own stdout and stderr are
//! its data, passed on byte for byte, and never go through here.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` is shown escaped: C0 controls except newline and tab, DEL, C1
/// controls (a terminal may read U+009B as CSI), and the Unicode bidirectional
/// overrides and isolates, which reorder what the reader sees.
fn needs_escape(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' => true,
        c => c.is_control(),
    }
}

/// `text` with every control character (but `\n` and `\t`) written as a
/// visible escape: `\r`, `\x1b`, `\u{9b}`, `\u{202e}`. Printable text,
/// including any non-ASCII UTF-8, is kept as it is.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().saturating_add(16));
    for c in text.chars() {
        if !needs_escape(c) {
            out.push(c);
            continue;
        }
        // Writing to a String cannot fail.
        let _ = match u32::from(c) {
            0x0d => write!(out, "\\r"),
            n @ 0..=0x7f => write!(out, "\\x{n:02x}"),
            n => write!(out, "\\u{{{n:x}}}"),
        };
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seabios_resets_are_shown_not_obeyed() {
        let log = "\u{1b}c\u{1b}[2J\u{1b}[0;25rSeaBIOS (version 1.16)\r\nBooting from ROM..\n";
        let shown = escape_controls(log);
        assert_eq!(
            shown,
            "\\x1bc\\x1b[2J\\x1b[0;25rSeaBIOS (version 1.16)\\r\nBooting from ROM..\n"
        );
        assert!(!shown.contains('\u{1b}'));
    }

    #[test]
    fn newlines_tabs_and_printable_utf8_are_kept() {
        let text = "kernel: ok\tvirtio\nrésumé 日本 ✓\n";
        assert!(matches!(escape_controls(text), Cow::Borrowed(t) if t == text));
    }

    #[test]
    fn every_other_control_is_escaped() {
        assert_eq!(escape_controls("a\0b\u{7}c\u{7f}"), "a\\x00b\\x07c\\x7f");
        // C1: CSI as one character, and NEL.
        assert_eq!(escape_controls("\u{9b}31m\u{85}"), "\\u{9b}31m\\u{85}");
        // A bidi override would show "exit 0" reversed around the rest.
        assert_eq!(
            escape_controls("x\u{202e}y\u{2066}"),
            "x\\u{202e}y\\u{2066}"
        );
        for c in (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let shown = escape_controls(&c.to_string()).into_owned();
            let kept = c == '\n' || c == '\t';
            assert_eq!(
                shown.chars().any(char::is_control),
                kept,
                "{c:?} -> {shown:?}"
            );
        }
    }
}
