//! Text helpers: short snippets of bodies, and the cleaning of text a server chose before it
//! reaches a message, a log line or a record.
//!
//! A server (or a proxy in front of it) decides what its error messages and model names say. It
//! may send megabytes, echo the `Authorization` header back, or put CR/LF and terminal escapes
//! into a message to forge log lines. [`ServerText::clean`] redacts the configured API key,
//! escapes control characters and caps the length, in that order (so a key cut in half by the
//! cap is never shown).

use std::borrow::Cow;

use crate::key::ApiKey;

/// The longest server-supplied message kept in an error (2 KiB); longer ones are cut with a
/// marker.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// The longest model name shown in a record, a report or a log line (512 bytes); longer ones are
/// cut with a marker. Requests always carry the full name.
pub const MAX_MODEL_NAME_BYTES: usize = 512;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` cut to at most `max` bytes (on a character boundary), followed by a marker saying how
/// long it was; `s` itself when it fits.
///
/// ```
/// use vlm_core::text::clip;
/// assert_eq!(clip("Qwen2-VL", 64), "Qwen2-VL");
/// assert_eq!(clip(&"x".repeat(100), 10), "xxxxxxxxxx…[cut: 100 bytes]");
/// ```
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("{}…[cut: {} bytes]", truncate(s, max), s.len()))
    }
}

/// `s` with control characters written as escapes (`\n`, `\r`, `\t`, `\u{1b}`, ...), so that
/// text from elsewhere stays on one line and cannot drive the terminal.
///
/// ```
/// use vlm_core::text::escape_controls;
/// assert_eq!(escape_controls("ok\r\nERROR forged"), "ok\\r\\nERROR forged");
/// assert_eq!(escape_controls("\u{1b}[31mred"), "\\u{1b}[31mred");
/// ```
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A model name as shown in records, reports and log lines: control characters escaped, cut at
/// [`MAX_MODEL_NAME_BYTES`] with a marker. Requests always carry the full name.
///
/// ```
/// use vlm_core::text::shown_model;
/// assert_eq!(shown_model("Qwen/Qwen2-VL-2B-Instruct"), "Qwen/Qwen2-VL-2B-Instruct");
/// assert!(shown_model(&"m".repeat(10_000_000)).ends_with("…[cut: 10000000 bytes]"));
/// ```
pub fn shown_model(name: &str) -> String {
    clip(&escape_controls(name), MAX_MODEL_NAME_BYTES).into_owned()
}

/// Cleans text chosen by a server: knows the configured API key, so it can be redacted.
#[derive(Clone, Default)]
pub struct ServerText {
    key: Option<ApiKey>,
}

impl std::fmt::Debug for ServerText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerText")
            .field("key", &self.key)
            .finish()
    }
}

impl ServerText {
    /// A cleaner that redacts `key` (when one is configured).
    pub fn new(key: Option<ApiKey>) -> Self {
        ServerText {
            key: key.filter(|k| !k.expose().is_empty()),
        }
    }

    /// `s` with every occurrence of the API key replaced by `***`.
    ///
    /// ```
    /// use vlm_core::ApiKey;
    /// use vlm_core::text::ServerText;
    /// let clean = ServerText::new(Some(ApiKey::new("sk-123")));
    /// assert_eq!(clean.redact("bad token: Bearer sk-123"), "bad token: Bearer ***");
    /// ```
    pub fn redact<'a>(&self, s: &'a str) -> Cow<'a, str> {
        match &self.key {
            Some(key) if s.contains(key.expose()) => Cow::Owned(s.replace(key.expose(), "***")),
            _ => Cow::Borrowed(s),
        }
    }

    /// `body` with every occurrence of the API key replaced by `***` (as lossy UTF-8 when the
    /// key is found); borrowed when there is nothing to redact.
    pub fn redact_bytes<'a>(&self, body: &'a [u8]) -> Cow<'a, [u8]> {
        let Some(key) = &self.key else {
            return Cow::Borrowed(body);
        };
        let text = String::from_utf8_lossy(body);
        if text.contains(key.expose()) {
            Cow::Owned(text.replace(key.expose(), "***").into_bytes())
        } else {
            Cow::Borrowed(body)
        }
    }

    /// The first `max` bytes of a body as one readable line: the key redacted before the cut
    /// (never half a key), whitespace collapsed, control characters escaped.
    pub fn snippet(&self, body: &[u8], max: usize) -> String {
        let window = self
            .key
            .as_ref()
            .map_or(0, |k| k.expose().len())
            .saturating_add(max * 2);
        let head = &body[..body.len().min(window)];
        let redacted = self.redact_bytes(head);
        let mut snippet = body_snippet(&redacted, max);
        if body.len() > head.len() && !snippet.ends_with('…') {
            snippet.push('…');
        }
        escape_controls(&snippet).into_owned()
    }

    /// Redacts the key, escapes control characters, then caps the length at `max` bytes: what a
    /// server's message or name may show in an error, a log line or a record.
    ///
    /// ```
    /// use vlm_core::ApiKey;
    /// use vlm_core::text::ServerText;
    /// let clean = ServerText::new(Some(ApiKey::new("sk-123")));
    /// assert_eq!(clean.clean("echo: sk-123\nINFO forged", 100), "echo: ***\\nINFO forged");
    /// ```
    pub fn clean(&self, s: &str, max: usize) -> String {
        let redacted = self.redact(s);
        let escaped = escape_controls(&redacted);
        clip(&escaped, max).into_owned()
    }
}

/// The first `max` bytes of a body as readable text (lossy UTF-8, whitespace collapsed).
pub(crate) fn body_snippet(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(max * 2)]);
    let collapsed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut = truncate(&collapsed, max);
    if cut.len() < collapsed.len() || body.len() > max * 2 {
        format!("{cut}…")
    } else {
        cut.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(
            body_snippet(b"<html>\n  <b>502</b>\n</html>", 100),
            "<html> <b>502</b> </html>"
        );
        assert_eq!(body_snippet(b"aaaaaaaaaa", 4), "aaaa…");
        assert_eq!(clip("ééé", 3), "é…[cut: 6 bytes]");
    }

    #[test]
    fn the_key_is_redacted_before_the_cap_so_half_a_key_never_shows() {
        let clean = ServerText::new(Some(ApiKey::new("sk-abcdefgh")));
        let msg = format!("{}sk-abcdefgh", "x".repeat(10));
        // A cap that would fall inside the key: the key is gone first.
        let shown = clean.clean(&msg, 14);
        assert!(!shown.contains("sk-abc"), "{shown}");
        assert!(shown.starts_with("xxxxxxxxxx***"), "{shown}");
        assert_eq!(ServerText::new(None).clean("plain", 10), "plain");
    }
}
