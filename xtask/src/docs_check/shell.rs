//! Commands as the docs write them: shell words, `VAR=value` prefixes, comments,
//! continuation lines, and what kind of command each one is.

/// A command from the docs, as written (comments and continuations removed).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The whole command line, as bash will run it.
    pub text: String,
    /// Its shell words.
    pub words: Vec<String>,
    /// The `VAR=value` words before the program.
    pub env: Vec<(String, String)>,
    /// Index in `words` of the program.
    pub program: usize,
}

impl Command {
    /// Parses one command line; `None` for an empty one.
    pub fn parse(line: &str) -> Option<Self> {
        let text = strip_comment(line).trim().to_owned();
        let words = split_words(&text);
        let program = words.iter().position(|w| !is_assignment(w))?;
        let env = words[..program]
            .iter()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Self {
            text,
            words,
            env,
            program,
        })
    }

    /// The program and its arguments.
    pub fn argv(&self) -> &[String] {
        &self.words[self.program..]
    }

    /// The value of `--name VALUE` or `--name=VALUE`.
    pub fn option(&self, name: &str) -> Option<&str> {
        let args = self.argv();
        args.iter().enumerate().find_map(|(i, word)| {
            if word == name {
                args.get(i + 1).map(String::as_str)
            } else {
                word.strip_prefix(name)?.strip_prefix('=')
            }
        })
    }

    /// Whether the bare flag `--name` is present.
    pub fn flag(&self, name: &str) -> bool {
        self.argv().iter().any(|w| w == name)
    }

    /// The value of `VAR` in the command's own `VAR=value` prefix.
    pub fn env_value(&self, var: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == var)
            .map(|(_, v)| v.as_str())
    }
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    })
}

/// The lines of a `sh` block as commands: continuation lines joined, comment lines dropped.
pub fn sh_commands(lines: &[String]) -> Vec<(usize, String)> {
    let mut commands = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (index, line) in lines.iter().enumerate() {
        let code = strip_comment(line);
        if current.is_empty() {
            if code.trim().is_empty() {
                continue;
            }
            start = index;
        }
        match code.trim_end().strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(code);
                commands.push((start, std::mem::take(&mut current)));
            }
        }
    }
    if !current.trim().is_empty() {
        commands.push((start, current));
    }
    commands
}

/// The line up to a `#` comment that is outside quotes and starts a word.
pub fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if previous.is_whitespace() => return &line[..i],
            _ => {}
        }
        previous = c;
    }
    line
}

/// Splits a command line into words as a shell would (quotes removed; `$?` kept as is).
pub fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_quotes_comments_and_prefixes() {
        let cmd = Command::parse(
            "VLM_API_KEY=k vlm narrate photos/ --prompt-template '<|image|>{prompt}' -o out.jsonl  # note",
        )
        .unwrap_or_else(|| panic!("no command"));
        assert_eq!(cmd.env, vec![("VLM_API_KEY".to_owned(), "k".to_owned())]);
        assert_eq!(cmd.argv()[0], "vlm");
        assert_eq!(cmd.option("--prompt-template"), Some("<|image|>{prompt}"));
        assert_eq!(cmd.option("-o"), Some("out.jsonl"));
        assert!(!cmd.text.contains("note"));
        assert_eq!(cmd.env_value("VLM_API_KEY"), Some("k"));
    }

    #[test]
    fn continuation_lines_join_and_comment_lines_drop() {
        let lines: Vec<String> = [
            "# a comment",
            "vlm narrate a \\",
            "    -o b   # out",
            "",
            "vlm config",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let commands = sh_commands(&lines);
        assert_eq!(commands.len(), 2);
        assert_eq!(
            split_words(&commands[0].1),
            ["vlm", "narrate", "a", "-o", "b"]
        );
        assert_eq!(commands[0].0, 1);
        assert_eq!(commands[1].1.trim(), "vlm config");
    }
}
