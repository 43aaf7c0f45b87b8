//! Producer text repeated back in errors, kept short.
//!
//! Errors quote what the producer sent, and they travel on: into the reply,
//! the ledger and a dead letter's `x-opsgate-error` header. A header must fit
//! in one AMQP frame (128 KiB by default; RabbitMQ closes the whole
//! connection otherwise), while a body may be 256 KiB, so every error is
//! bounded here.

use std::borrow::Cow;

/// How many characters of a producer's value an error quotes.
pub const QUOTED_CHARS: usize = 100;
/// The longest error an outcome carries (reply, ledger row).
pub const MAX_ERROR_BYTES: usize = 2048;
/// The longest error in a dead letter's header.
pub const MAX_HEADER_BYTES: usize = 1024;

/// `value` quoted and escaped as `{:?}` does, cut after [`QUOTED_CHARS`]
/// characters: `"abc…"… (150000 bytes)`.
pub fn quoted(value: &str) -> String {
    match value.char_indices().nth(QUOTED_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// `text` cut to at most `max_bytes` bytes at a character boundary, with
/// `…` at the end when it was cut.
pub fn clipped(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes {
        return Cow::Borrowed(text);
    }
    let ellipsis = '…';
    let mut end = max_bytes.saturating_sub(ellipsis.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{ellipsis}", &text[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(quoted("G5"), "\"G5\"");
        assert_eq!(quoted("a\"b"), "\"a\\\"b\"");
    }

    #[test]
    fn long_values_are_cut_and_say_how_long_they_were() {
        let shown = quoted(&"é".repeat(150_000));
        assert!(
            shown.starts_with(&format!("\"{}", "é".repeat(QUOTED_CHARS))),
            "{shown}"
        );
        assert!(shown.ends_with("\"… (300000 bytes)"), "{shown}");
    }

    #[test]
    fn clipped_text_fits_and_ends_on_a_character() {
        let text = "ü".repeat(2000);
        let cut = clipped(&text, 1001);
        assert!(cut.len() <= 1001);
        assert!(cut.ends_with('…'));
        assert_eq!(clipped("short", 10), "short");
    }
}
