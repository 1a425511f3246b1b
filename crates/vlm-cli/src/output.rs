//! The JSONL record, the output file, and resuming it.
//!
//! The output is opened once, before anything is sent, and held under an exclusive advisory
//! lock (`flock`), so a second run on the same file is refused instead of writing duplicates or
//! truncating it under the first; the kernel releases the lock when the process ends, however it
//! ends. Each record is one `write_all` of a whole line; a write that fails part-way (a full
//! disk) is cut back to the last whole line where the file system allows it.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use vlm_core::Usage;

use crate::Failure;

/// The longest line `--resume` reads as a record (64 MiB); a longer one is left in place and
/// counted as not a record.
const MAX_LINE_BYTES: u64 = 64 * 1024 * 1024;

/// The UTF-8 byte-order mark some Windows editors put at the start of a text file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One line of the output: always exactly these keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The path as discovered (the argument joined with the walked entry).
    pub path: String,
    /// 64 lowercase hex digits of the image file's bytes; null if unreadable.
    pub sha256: Option<String>,
    /// 64 lowercase hex digits fingerprinting what was asked: prompt, system prompt, model,
    /// max_tokens, temperature, JSON schema and image-size setting.
    pub request_sha256: String,
    /// The backend.
    pub backend: String,
    /// The model.
    pub model: String,
    /// The narration; null on error.
    pub text: Option<String>,
    /// Why generation stopped; null on error.
    pub finish_reason: Option<String>,
    /// Token counts; null on error or when the server gave none (or none that were counts).
    pub usage: Option<Usage>,
    /// Milliseconds for the request, retries included.
    pub latency_ms: u64,
    /// Null on success, the error message otherwise.
    pub error: Option<String>,
    /// The answer's JSON, valid for `--json-schema`; null without a schema or on error.
    pub json: Option<serde_json::Value>,
}

impl Record {
    /// The record as one line, newline included.
    pub fn to_line(&self) -> std::io::Result<Vec<u8>> {
        let mut line = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        line.push(b'\n');
        Ok(line)
    }
}

/// Where records go.
pub enum Sink {
    /// Standard output (no `--output`).
    Stdout,
    /// The locked, append-mode output file.
    File {
        /// The open file (holding the lock).
        file: File,
        /// Its path, for messages.
        path: PathBuf,
        /// The length of its whole lines: where the next record starts.
        end: u64,
    },
}

impl Sink {
    /// Writes one whole line with one `write_all`. When that fails part-way, what reached the
    /// file is cut back so the output still ends with a whole line (where the file system
    /// allows it; otherwise `--resume` cuts the torn line).
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        self.write_line(&record.to_line()?)
    }

    /// Writes one line (newline included) as [`write`](Self::write) does.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line)?;
                out.flush()
            }
            Sink::File { file, end, .. } => match file.write_all(line) {
                Ok(()) => {
                    *end += line.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    let _ = file.set_len(*end);
                    Err(e)
                }
            },
        }
    }

    /// The output's name for messages: its path, or `stdout`.
    pub fn name(&self) -> String {
        match self {
            Sink::File { path, .. } => path.display().to_string(),
            Sink::Stdout => "stdout".to_owned(),
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

/// A successful previous record, as resume needs it.
#[derive(Debug, Clone, Copy)]
struct Done {
    sha256: [u8; 32],
    /// Cut off by max_tokens (`finish_reason: "length"`).
    truncated: bool,
    request: Option<[u8; 32]>,
}

/// What an existing output already holds.
#[derive(Debug, Default)]
pub struct Previous {
    /// Normalised path → its last record when that record is a success.
    done: HashMap<String, Option<Done>>,
    /// `--redo-truncated`: an answer cut off by max_tokens does not count as done.
    pub redo_truncated: bool,
    /// The fingerprint of what this run asks (`request_sha256`): a success asked differently
    /// does not count as done. Records without one (older versions) count as asked the same.
    pub request: Option<[u8; 32]>,
    /// The previous successes by file identity (device, inode), built at the first path that
    /// does not match as spelled: `/home/me/photos/a.jpg` then `photos/a.jpg` is one file.
    by_identity: std::sync::OnceLock<HashMap<(u64, u64), String>>,
    /// The backend/model pairs seen.
    pub runs: BTreeSet<(String, String)>,
    /// Lines that were not records (reported, left in place).
    pub bad_lines: usize,
    /// Bytes of a torn last line that were cut.
    pub torn_bytes: u64,
    /// Whether the file started with a UTF-8 byte-order mark (now overwritten with spaces).
    pub had_bom: bool,
}

/// The fields of a previous record that resuming needs; the text is only checked for null.
#[derive(Deserialize)]
struct Seen<'a> {
    #[serde(borrow)]
    path: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    sha256: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    backend: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    model: std::borrow::Cow<'a, str>,
    #[serde(default)]
    text: Option<IgnoredAny>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(default, borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    request_sha256: Option<std::borrow::Cow<'a, str>>,
}

fn sha_bytes(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// What resuming reads from an existing output, line by line.
pub trait Resumable: Default {
    /// Takes one whole line (newline removed) into account.
    fn add_line(&mut self, line: &[u8]);
    /// Counts a line far too long to be a record (left in place).
    fn add_bad_line(&mut self);
    /// The bytes of a torn last line that were cut, and whether a byte-order mark was found.
    fn ended(&mut self, torn_bytes: u64, had_bom: bool);
}

impl Resumable for Previous {
    fn add_line(&mut self, line: &[u8]) {
        Previous::add_line(self, line);
    }

    fn add_bad_line(&mut self) {
        self.bad_lines += 1;
    }

    fn ended(&mut self, torn_bytes: u64, had_bom: bool) {
        self.torn_bytes = torn_bytes;
        self.had_bom = had_bom;
    }
}

impl Previous {
    /// Whether `path` with these bytes already has a successful record.
    /// Under `--redo-truncated`, an answer cut off by max_tokens is not done.
    /// A success asked differently (another `request_sha256`) is not done.
    /// A path spelled differently from the record's (absolute vs relative, `./`) matches by the
    /// file's identity.
    pub fn is_done(&self, path: &str, sha256: &str) -> bool {
        let key = normalise(path);
        let last = match self.done.get(&key) {
            Some(last) => Some(last),
            None => self.same_file(path).and_then(|k| self.done.get(k)),
        };
        matches!(
            (last, sha_bytes(sha256)),
            (Some(Some(done)), Some(now))
                if done.sha256 == now
                    && !(done.truncated && self.redo_truncated)
                    && !self.asked_differently(done)
        )
    }

    /// The key of a previous success that is the same file as `path`, by device and inode.
    fn same_file(&self, path: &str) -> Option<&String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let identity = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
            let known = self.by_identity.get_or_init(|| {
                self.done
                    .iter()
                    .filter(|(_, done)| done.is_some())
                    .filter_map(|(key, _)| Some((identity(key)?, key.clone())))
                    .collect()
            });
            if known.is_empty() {
                return None; // nothing to match: spare the stat (every image asks this)
            }
            known.get(&identity(path)?)
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            None
        }
    }

    fn asked_differently(&self, done: &Done) -> bool {
        matches!((done.request, self.request), (Some(then), Some(now)) if then != now)
    }

    /// How many images' last record is a success cut off by max_tokens.
    pub fn truncated(&self) -> usize {
        self.done.values().flatten().filter(|d| d.truncated).count()
    }

    /// How many images' last record is a success asked differently (another prompt, model or
    /// setting) from this run.
    pub fn changed(&self) -> usize {
        self.done
            .values()
            .flatten()
            .filter(|d| self.asked_differently(d))
            .count()
    }

    /// Takes one line of the previous output into account.
    fn add_line(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let Ok(seen) = serde_json::from_slice::<Seen<'_>>(line) else {
            self.bad_lines += 1;
            return;
        };
        let success = seen.error.is_none() && seen.text.is_some();
        let run = (seen.backend.into_owned(), seen.model.into_owned());
        if !self.runs.contains(&run) {
            self.runs.insert(run);
        }
        let truncated = seen.finish_reason.as_deref() == Some("length");
        let request = seen.request_sha256.as_deref().and_then(sha_bytes);
        let sha = if success {
            seen.sha256
                .as_deref()
                .and_then(sha_bytes)
                .map(|sha256| Done {
                    sha256,
                    truncated,
                    request,
                })
        } else {
            None
        };
        self.done.insert(normalise(&seen.path), sha);
    }
}

/// Refuses what cannot be the output before anything is sent: a folder, a file another run is
/// writing (it holds the lock), or an existing non-empty file without `--resume` or
/// `--overwrite` to say what to do with it.
pub fn refuse_existing(path: &Path, resume: bool, overwrite: bool) -> Result<(), Failure> {
    // A probe of the lock (released at once): told first, since --resume or --overwrite would
    // not help. Not used under our own lock: a second open file would conflict with it.
    // Only a regular file is opened for it: opening a FIFO to read would wait for a writer.
    if std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && let Ok(file) = File::open(path)
        && let Err(TryLockError::WouldBlock) = file.try_lock()
    {
        return Err(in_use(path));
    }
    refuse_contents(path, resume, overwrite)
}

fn in_use(path: &Path) -> Failure {
    Failure::usage(format!(
        "output {} is being written by another vlm run (it holds the file's lock); wait for \
         that run to finish, or give this one another --output",
        path.display()
    ))
}

/// A folder, or a non-empty file without `--resume` or `--overwrite`.
fn refuse_contents(path: &Path, resume: bool, overwrite: bool) -> Result<(), Failure> {
    let meta = std::fs::metadata(path).ok();
    if meta.as_ref().is_some_and(std::fs::Metadata::is_dir) {
        return Err(Failure::usage(format!(
            "output {} is a folder; give --output a file, e.g. {}",
            path.display(),
            path.join("narrations.jsonl").display()
        )));
    }
    let existing = meta
        .filter(std::fs::Metadata::is_file)
        .map_or(0, |m| m.len());
    if existing > 0 && !resume && !overwrite {
        return Err(Failure::usage(format!(
            "output {} already exists and is not empty; pass --resume to continue it (what is \
             finished is skipped) or --overwrite to replace it",
            path.display()
        )));
    }
    Ok(())
}

/// Opens the output as `--resume` / `--overwrite` say, holding an exclusive lock on it for the
/// rest of the run: a second run on the same output is refused (exit 2) whatever its flags.
pub fn open<P: Resumable>(
    path: &Path,
    resume: bool,
    overwrite: bool,
) -> Result<(Sink, P), Failure> {
    let io = |what: &str, e: std::io::Error| {
        Failure::usage(format!("cannot {what} {}: {e}", path.display()))
    };
    refuse_existing(path, resume, overwrite)?;
    // Append mode: every record is one whole line added at the end. Nothing is truncated
    // before the lock is held.
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| io("open", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(in_use(path)),
        Err(TryLockError::Error(e)) => return Err(io("lock", e)),
    }
    // Checked again under the lock: another run may have written to it meanwhile.
    refuse_contents(path, resume, overwrite)?;
    // Only a regular file can be emptied (`/dev/null` and the like have nothing to replace).
    if overwrite && file.metadata().is_ok_and(|m| m.is_file()) {
        file.set_len(0).map_err(|e| io("truncate", e))?;
    }
    let previous = if resume {
        read_previous(&mut file, path).map_err(|e| io("read", e))?
    } else {
        P::default()
    };
    let end = file.seek(SeekFrom::End(0)).map_err(|e| io("read", e))?;
    let sink = Sink::File {
        file,
        path: path.to_owned(),
        end,
    };
    Ok((sink, previous))
}

/// Reads the records line by line (memory stays flat however long the file), cutting a torn
/// last line (one with no newline) back to the last newline, and overwriting a leading UTF-8
/// byte-order mark with spaces (JSON allows leading white space).
fn read_previous<P: Resumable>(file: &mut File, path: &Path) -> std::io::Result<P> {
    file.seek(SeekFrom::Start(0))?;
    let mut previous = P::default();
    let mut reader = BufReader::with_capacity(64 * 1024, &*file);
    let mut line = Vec::new();
    let mut whole = 0u64; // bytes of whole lines read
    let mut first = true;
    let (mut torn_bytes, mut had_bom) = (0u64, false);
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line)? as u64;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            if n < MAX_LINE_BYTES {
                torn_bytes = n;
                break;
            }
            // Far too long for a record: skip the rest of it, left in place.
            let rest = skip_line(&mut reader)?;
            if rest.1 {
                whole += n + rest.0;
                previous.add_bad_line();
                continue;
            }
            torn_bytes = n + rest.0;
            break;
        }
        whole += n;
        let mut content = &line[..line.len() - 1];
        if first && let Some(rest) = content.strip_prefix(BOM) {
            had_bom = true;
            content = rest;
        }
        first = false;
        previous.add_line(content);
    }
    drop(reader);
    if torn_bytes > 0 {
        file.set_len(whole)?;
    }
    if had_bom {
        // The file is opened for appending (writes at an offset would append): another handle
        // writes the three spaces in place.
        let mut writer = OpenOptions::new().write(true).open(path)?;
        writer.write_all(b"   ")?;
    }
    previous.ended(torn_bytes, had_bom);
    Ok(previous)
}

/// Consumes up to and including the next newline; returns the bytes consumed and whether a
/// newline ended them.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<(u64, bool)> {
    let mut consumed = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok((consumed, false));
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok((consumed + i as u64 + 1, true));
            }
            None => {
                let len = buf.len();
                reader.consume(len);
                consumed += len as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const SHA_C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn record(path: &str, sha: &str, error: Option<&str>) -> Record {
        Record {
            path: path.into(),
            sha256: Some(sha.into()),
            request_sha256: SHA_C.into(),
            backend: "vllm".into(),
            model: "m".into(),
            text: error.is_none().then(|| "ok".into()),
            finish_reason: error.is_none().then(|| "stop".into()),
            usage: None,
            latency_ms: 1,
            error: error.map(Into::into),
            json: None,
        }
    }

    fn line(r: &Record) -> String {
        String::from_utf8(r.to_line().unwrap()).unwrap()
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vlm-cli-out-{}-{name}.jsonl", std::process::id()))
    }

    #[test]
    fn the_record_has_exactly_the_decided_keys_in_order() {
        let line = line(&record("a.jpg", "ab", None));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        let mut want = [
            "path",
            "sha256",
            "request_sha256",
            "backend",
            "model",
            "text",
            "finish_reason",
            "usage",
            "latency_ms",
            "error",
            "json",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert!(
            line.starts_with(r#"{"path":"a.jpg","sha256":"ab","request_sha256":"#),
            "{line}"
        );
        assert!(line.ends_with("\"error\":null,\"json\":null}\n"));
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
        let path = temp("torn");
        let mut content = String::new();
        content += &line(&record("./a.jpg", SHA_A, Some("boom")));
        content += &line(&record("a.jpg", SHA_A, None));
        content += &line(&record("b.jpg", SHA_B, None));
        content += &line(&record("b.jpg", SHA_B, Some("later failure")));
        content += "not json\n";
        content += r#"{"path":"c.jpg","sha2"#;
        std::fs::write(&path, &content).unwrap();

        assert_eq!(
            open::<Previous>(&path, false, false).err().unwrap().exit,
            crate::Exit::Usage
        );
        let (sink, previous): (_, Previous) = open(&path, true, false).unwrap();
        assert!(previous.is_done("a.jpg", SHA_A));
        assert!(!previous.is_done("a.jpg", SHA_C));
        assert!(
            !previous.is_done("b.jpg", SHA_B),
            "the last record, a failure, wins"
        );
        assert!(!previous.is_done("c.jpg", SHA_C));
        assert_eq!((previous.bad_lines, previous.torn_bytes), (1, 21));
        drop(sink);
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(
            after.ends_with("not json\n"),
            "the torn line is cut: {after:?}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_leading_byte_order_mark_is_accepted_and_leaves_the_file() {
        let path = temp("bom");
        let mut content = BOM.to_vec();
        content.extend_from_slice(line(&record("a.jpg", SHA_A, None)).as_bytes());
        content.extend_from_slice(line(&record("b.jpg", SHA_B, None)).as_bytes());
        std::fs::write(&path, &content).unwrap();
        let (sink, previous): (_, Previous) = open(&path, true, false).unwrap();
        drop(sink);
        assert!(previous.had_bom);
        assert_eq!(previous.bad_lines, 0);
        assert!(previous.is_done("a.jpg", SHA_A), "the first record counts");
        assert!(previous.is_done("b.jpg", SHA_B));
        let after = std::fs::read(&path).unwrap();
        assert!(!after.starts_with(BOM) && after.starts_with(b"   {"));
        // Every line is still JSON.
        for l in String::from_utf8(after).unwrap().lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_second_opener_is_refused_while_the_first_holds_the_lock() {
        let path = temp("lock");
        let _ = std::fs::remove_file(&path);
        let (first, _) = open::<Previous>(&path, false, false).unwrap();
        for (resume, overwrite) in [(false, false), (true, false), (false, true)] {
            let err = open::<Previous>(&path, resume, overwrite).err().unwrap();
            assert_eq!(err.exit, crate::Exit::Usage);
            assert!(
                err.message.contains("another vlm run") && err.message.contains("lock"),
                "{}",
                err.message
            );
        }
        drop(first);
        assert!(
            open::<Previous>(&path, true, false).is_ok(),
            "free again once closed"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_folder_is_not_an_output_even_when_empty() {
        let dir = std::env::temp_dir().join(format!("vlm-cli-out-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = refuse_existing(&dir, false, false).err().unwrap();
        assert!(err.message.contains("is a folder"), "{}", err.message);
        assert!(!err.message.contains("not empty"), "{}", err.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
