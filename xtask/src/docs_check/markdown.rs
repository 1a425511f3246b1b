//! What docs-check reads in a Markdown page: fenced blocks, inline code spans and
//! `<!-- docs-check: ... -->` directives, each with its line number.

/// One thing on a page that docs-check looks at.
#[derive(Debug, Clone)]
pub enum Item {
    /// `<!-- docs-check: TEXT -->`
    Directive { text: String },
    /// A fenced block: its language tag, its lines (fence indentation removed), the line number
    /// of its first content line, and the fence's indentation.
    Fence {
        lang: String,
        lines: Vec<String>,
        first_line: usize,
        indent: usize,
    },
    /// An inline code span outside fences (`\|`, a table's escaped bar, read as `|`).
    Inline { text: String, line: usize },
}

/// Parses a page into its items, in order. Line numbers start at 1.
pub fn parse(text: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            let indent = line.len() - trimmed.len();
            let mut body = Vec::new();
            for (_, inner) in lines.by_ref() {
                if inner.trim() == "```" {
                    break;
                }
                body.push(strip_indent(inner, indent).to_owned());
            }
            items.push(Item::Fence {
                lang: lang.trim().to_owned(),
                lines: body,
                first_line: index + 2,
                indent,
            });
        } else if let Some(directive) = directive(trimmed) {
            items.push(Item::Directive { text: directive });
        } else {
            items.extend(inline_spans(line).into_iter().map(|text| Item::Inline {
                text,
                line: index + 1,
            }));
        }
    }
    items
}

fn strip_indent(line: &str, indent: usize) -> &str {
    let spaces = line.len() - line.trim_start_matches(' ').len();
    &line[spaces.min(indent)..]
}

fn directive(line: &str) -> Option<String> {
    let rest = line.strip_prefix("<!-- docs-check:")?;
    let inner = rest.trim_end().strip_suffix("-->")?;
    Some(inner.trim().to_owned())
}

/// The single-backtick code spans of one line.
fn inline_spans(line: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        let after = &rest[start + 1..];
        if let Some(inner) = after.strip_prefix('`') {
            // A double-backtick span: skip to its closing pair.
            match inner.find("``") {
                Some(end) => rest = &inner[end + 2..],
                None => break,
            }
            continue;
        }
        match after.find('`') {
            Some(end) => {
                spans.push(after[..end].replace("\\|", "|"));
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_directives_and_spans_are_found_with_their_lines() {
        let page = "intro `vlm health --vlm-backend ollama` and `a\\|b`\n\
                    <!-- docs-check: file cast.json -->\n\
                    - item:\n\n  ```sh\n  vlm config\n  ```\n";
        let items = parse(page);
        assert!(
            matches!(&items[0], Item::Inline { text, line: 1 } if text == "vlm health --vlm-backend ollama")
        );
        assert!(matches!(&items[1], Item::Inline { text, .. } if text == "a|b"));
        assert!(matches!(&items[2], Item::Directive { text } if text == "file cast.json"));
        match &items[3] {
            Item::Fence {
                lang,
                lines,
                first_line,
                indent,
            } => {
                assert_eq!(lang, "sh");
                assert_eq!(lines, &vec!["vlm config".to_owned()]);
                assert_eq!((*first_line, *indent), (6, 2));
            }
            other => panic!("not a fence: {other:?}"),
        }
    }
}
