//! Comparing a command's real output with the transcript a page shows: ports, durations and
//! rates vary from run to run and are compared as placeholders; a `...` line stands for any
//! number of lines.

/// The text with what varies between runs replaced: `127.0.0.1:<port>`, durations
/// (`0.1 s`, `68 ms`, `"latency_ms":68`) and rates (`54.20 images/s`).
pub fn normalise(line: &str) -> String {
    let line = replace_number_after(line, "127.0.0.1:", "PORT");
    let line = replace_number_after(&line, "\"latency_ms\":", "N");
    let line = replace_number_before(&line, &[" s", " ms", " images/s", " req/s"]);
    line.trim_end().to_owned()
}

fn replace_number_after(line: &str, prefix: &str, placeholder: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(prefix) {
        out.push_str(&rest[..at + prefix.len()]);
        rest = &rest[at + prefix.len()..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            out.push_str(placeholder);
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// Replaces a number (digits, at most one `.`) directly followed by one of `units` (then a
/// non-alphanumeric character or the end).
fn replace_number_before(line: &str, units: &[&str]) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        let starts_number = chars[i].is_ascii_digit()
            && (i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '.'));
        if starts_number {
            let mut j = i;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
                j += 1;
            }
            let after: String = chars[j..].iter().collect();
            let unit = units.iter().find(|u| {
                after.starts_with(**u)
                    && after[u.len()..]
                        .chars()
                        .next()
                        .is_none_or(|c| !c.is_alphanumeric())
            });
            if unit.is_some() {
                out.push('N');
            } else {
                out.extend(&chars[i..j]);
            }
            i = j;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// Whether `actual` matches `expected`, line by line after normalising both; an expected line
/// `...` matches any number of actual lines.
pub fn matches(expected: &[String], actual: &[String]) -> bool {
    let expected: Vec<String> = expected.iter().map(|l| normalise(l)).collect();
    let actual: Vec<String> = actual.iter().map(|l| normalise(l)).collect();
    match_from(&expected, &actual)
}

/// Whether `actual` holds the same lines as `expected`, in any order (after normalising).
pub fn matches_in_any_order(expected: &[String], actual: &[String]) -> bool {
    let sorted = |lines: &[String]| {
        let mut v: Vec<String> = lines.iter().map(|l| normalise(l)).collect();
        v.sort();
        v
    };
    sorted(expected) == sorted(actual)
}

fn match_from(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "..." => {
            (0..=actual.len()).any(|skip| match_from(rest, &actual[skip..]))
        }
        Some((first, rest)) => {
            actual.first().is_some_and(|line| line == first) && match_from(rest, &actual[1..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn ports_durations_and_rates_are_placeholders() {
        assert_eq!(
            normalise("at http://127.0.0.1:45181/v1; 0.1 s, 54.20 images/s, 68 ms "),
            "at http://127.0.0.1:PORT/v1; N s, N images/s, N ms"
        );
        assert_eq!(
            normalise("{\"latency_ms\":104,\"v\":\"0.12.6\"} hue 37°, 5 record(s)"),
            "{\"latency_ms\":N,\"v\":\"0.12.6\"} hue 37°, 5 record(s)"
        );
    }

    #[test]
    fn an_ellipsis_stands_for_any_lines_and_nothing_else_differs() {
        let actual = lines("a\nb\nc\nd");
        assert!(matches(&lines("a\n...\nd"), &actual));
        assert!(matches(&lines("a\nb\nc\nd\n..."), &actual));
        assert!(!matches(&lines("a\nb\nc"), &actual));
        assert!(!matches(&lines("a\nx\n...\nd"), &actual));
        assert!(matches_in_any_order(&lines("d\nc\nb\na"), &actual));
        assert!(!matches_in_any_order(&lines("d\nc\nb"), &actual));
    }
}
