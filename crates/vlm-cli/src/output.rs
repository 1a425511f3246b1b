//! The JSONL record, the output file, and resuming it.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vlm_core::Usage;

use crate::Failure;

/// One line of the output: always exactly these keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The path as discovered (the argument joined with the walked entry).
    pub path: String,
    /// 64 lowercase hex digits of the exact bytes sent; null if unreadable.
    pub sha256: Option<String>,
    /// The backend.
    pub backend: String,
    /// The model.
    pub model: String,
    /// The narration; null on error.
    pub text: Option<String>,
    /// Why generation stopped; null on error.
    pub finish_reason: Option<String>,
    /// Token counts; null on error or when the server gave none.
    pub usage: Option<Usage>,
    /// Milliseconds for the request, retries included.
    pub latency_ms: u64,
    /// Null on success, the error message otherwise.
    pub error: Option<String>,
}

impl Record {
    /// The record as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            // Serialising plain strings and numbers cannot fail; keep the line valid regardless.
            format!(
                r#"{{"path":{:?},"error":"cannot serialise the record: {e}"}}"#,
                self.path
            )
        });
        line.push('\n');
        line
    }
}

/// Where records go.
pub enum Sink {
    /// Standard output (no `--output`).
    Stdout,
    /// An append-mode file.
    File {
        /// The open file.
        file: File,
        /// Its path, for messages.
        path: PathBuf,
    },
}

impl Sink {
    /// Writes one whole line with one `write_all`, then flushes.
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        let line = record.to_line();
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
            Sink::File { file, .. } => {
                file.write_all(line.as_bytes())?;
                file.flush()
            }
        }
    }
}

/// `./a/b/` → `a/b`: how paths are compared on resume.
pub fn normalise(path: &str) -> String {
    let mut p = path;
    while let Some(rest) = p.strip_prefix("./") {
        p = rest.trim_start_matches('/');
    }
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        p.to_owned()
    } else {
        trimmed.replace("/./", "/")
    }
}

/// What an existing output already holds.
#[derive(Debug, Default)]
pub struct Previous {
    /// Normalised path → the sha256 of its last record when that record is a success.
    pub done: HashMap<String, Option<String>>,
    /// The backend/model pairs seen.
    pub runs: BTreeSet<(String, String)>,
    /// Lines that were not records (reported, left in place).
    pub bad_lines: usize,
    /// Bytes of a torn last line that were cut.
    pub torn_bytes: u64,
}

impl Previous {
    /// Whether `path` with these bytes already has a successful record.
    pub fn is_done(&self, path: &str, sha256: &str) -> bool {
        matches!(self.done.get(&normalise(path)), Some(Some(sha)) if sha == sha256)
    }
}

/// Refuses an existing non-empty output unless `--resume` or `--overwrite` says what to do with
/// it; checked before anything is sent.
pub fn refuse_existing(path: &Path, resume: bool, overwrite: bool) -> Result<(), Failure> {
    let existing = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if existing > 0 && !resume && !overwrite {
        return Err(Failure::usage(format!(
            "output {} already exists and is not empty; pass --resume to continue it (finished \
             images are skipped) or --overwrite to replace it",
            path.display()
        )));
    }
    Ok(())
}

/// Opens the output as `--resume` / `--overwrite` say.
pub fn open(path: &Path, resume: bool, overwrite: bool) -> Result<(Sink, Previous), Failure> {
    let io = |what: &str, e: std::io::Error| {
        Failure::usage(format!("cannot {what} {}: {e}", path.display()))
    };
    refuse_existing(path, resume, overwrite)?;
    let existing = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut previous = Previous::default();
    if overwrite {
        File::create(path).map_err(|e| io("truncate", e))?;
    }
    // Append mode either way: every record is one whole line added at the end.
    let file = {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io("open", e))?;
        if resume && existing > 0 {
            previous = read_previous(&mut file).map_err(|e| io("read", e))?;
        }
        file
    };
    Ok((
        Sink::File {
            file,
            path: path.to_owned(),
        },
        previous,
    ))
}

/// Reads the records, cutting a torn last line (one with no newline) back to the last newline.
fn read_previous(file: &mut File) -> std::io::Result<Previous> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    let mut previous = Previous::default();
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        previous.torn_bytes = (bytes.len() - keep) as u64;
        file.set_len(keep as u64)?;
        bytes.truncate(keep);
    }
    for line in bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
    {
        match serde_json::from_slice::<Record>(line) {
            Ok(record) => {
                let success = record.error.is_none() && record.text.is_some();
                previous
                    .runs
                    .insert((record.backend.clone(), record.model.clone()));
                previous.done.insert(
                    normalise(&record.path),
                    if success { record.sha256 } else { None },
                );
            }
            Err(_) => previous.bad_lines += 1,
        }
    }
    Ok(previous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str, sha: &str, error: Option<&str>) -> Record {
        Record {
            path: path.into(),
            sha256: Some(sha.into()),
            backend: "vllm".into(),
            model: "m".into(),
            text: error.is_none().then(|| "ok".into()),
            finish_reason: error.is_none().then(|| "stop".into()),
            usage: None,
            latency_ms: 1,
            error: error.map(Into::into),
        }
    }

    #[test]
    fn the_record_has_exactly_the_decided_keys_in_order() {
        let line = record("a.jpg", "ab", None).to_line();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        let mut want = [
            "path",
            "sha256",
            "backend",
            "model",
            "text",
            "finish_reason",
            "usage",
            "latency_ms",
            "error",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert!(
            line.starts_with(r#"{"path":"a.jpg","sha256":"ab","backend":"vllm""#),
            "{line}"
        );
        assert!(line.ends_with("\"error\":null}\n"));
    }

    #[test]
    fn paths_normalise_for_matching() {
        for (input, want) in [
            ("./a/b.jpg", "a/b.jpg"),
            ("a/./b.jpg", "a/b.jpg"),
            ("dir/", "dir"),
            ("././x", "x"),
            ("/abs/x", "/abs/x"),
        ] {
            assert_eq!(normalise(input), want, "{input}");
        }
    }

    #[test]
    fn resume_cuts_a_torn_line_and_the_last_record_per_path_wins() {
        let path = std::env::temp_dir().join(format!("vlm-cli-out-{}.jsonl", std::process::id()));
        let mut content = String::new();
        content += &record("./a.jpg", "aa", Some("boom")).to_line();
        content += &record("a.jpg", "aa", None).to_line();
        content += &record("b.jpg", "bb", None).to_line();
        content += &record("b.jpg", "bb", Some("later failure")).to_line();
        content += "not json\n";
        content += r#"{"path":"c.jpg","sha2"#;
        std::fs::write(&path, &content).unwrap();

        assert_eq!(
            open(&path, false, false).err().unwrap().exit,
            crate::Exit::Usage
        );
        let (_, previous) = open(&path, true, false).unwrap();
        assert!(previous.is_done("a.jpg", "aa"));
        assert!(!previous.is_done("a.jpg", "changed"));
        assert!(
            !previous.is_done("b.jpg", "bb"),
            "the last record, a failure, wins"
        );
        assert!(!previous.is_done("c.jpg", "cc"));
        assert_eq!((previous.bad_lines, previous.torn_bytes), (1, 21));
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(
            after.ends_with("not json\n"),
            "the torn line is cut: {after:?}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
