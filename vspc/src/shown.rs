//! Text a peer sent, made safe to show: in log lines (where a newline would
//! start a forged line of its own, and under journald a separate entry),
//! audit events and listings (where an escape sequence would reach an
//! operator's terminal).
//!
//! One rule everywhere: control characters (C0, DEL, C1) become escapes
//! (`\n`, `\r`, `\t`, `\x1b`, `\u{85}`) and a backslash is doubled, so the
//! escaped text can be told apart from text that merely looks escaped.
//! Everything else, non-ASCII letters included, is shown as it is.

use std::borrow::Cow;
use std::fmt;

/// Display `s` escaped (see the module documentation); for log fields:
/// `tracing::info!(user = %Shown(&user), ...)`.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if (c as u32) < 0x80 && c.is_control() => write!(f, "\\x{:02x}", c as u32)?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        Ok(())
    }
}

/// `s` escaped, borrowed when there is nothing to escape.
pub fn escaped(s: &str) -> Cow<'_, str> {
    if s.chars().any(|c| c == '\\' || c.is_control()) {
        Cow::Owned(Shown(s).to_string())
    } else {
        Cow::Borrowed(s)
    }
}

/// Text from a peer's bytes: invalid UTF-8 replaced, control characters
/// escaped, and cut to at most `max` bytes (at a character boundary).
/// Returns the text and whether anything was escaped or cut.
pub fn from_peer(raw: &[u8], max: usize) -> (String, bool) {
    let lossy = String::from_utf8_lossy(raw);
    let mut changed = matches!(lossy, Cow::Owned(_));
    let text = escaped(&lossy);
    changed |= matches!(text, Cow::Owned(_));
    let mut text = text.into_owned();
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        changed = true;
    }
    (text, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        let forged = "web-1\n2026-12-07T00:00:00Z INFO audit: console session started kind=ssh";
        let shown = Shown(forged).to_string();
        assert!(!shown.contains('\n'));
        assert!(shown.starts_with("web-1\\n2026"));
        assert_eq!(
            Shown("a\x1b[2Jb\r\t\u{85}\\").to_string(),
            "a\\x1b[2Jb\\r\\t\\u{85}\\\\"
        );
        assert_eq!(escaped("Zürich-db ✓"), "Zürich-db ✓");
        assert!(matches!(escaped("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn peer_text_is_bounded_at_a_character_boundary() {
        let (t, changed) = from_peer("ééé".as_bytes(), 5);
        assert_eq!((t.as_str(), changed), ("éé", true));
        let (t, changed) = from_peer(b"web-1", 256);
        assert_eq!((t.as_str(), changed), ("web-1", false));
        let (t, changed) = from_peer(b"bad\xffname\n", 256);
        assert_eq!(t, "bad\u{fffd}name\\n");
        assert!(changed);
        let long = vec![b'x'; 60_000];
        assert_eq!(from_peer(&long, 256).0.len(), 256);
    }
}
