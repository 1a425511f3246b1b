//! Small text helpers shared by messages.

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
    }
}
