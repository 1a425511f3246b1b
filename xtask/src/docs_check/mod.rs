//! `cargo xtask docs-check [--bless]`: every command in README.md, docs/ and the crates'
//! READMEs is run against the emulators, or read, so the docs cannot drift.
//!
//! - `vlm` commands (and `cargo run -p vlm-cli -- ...`) run in a scratch folder that holds
//!   `photos/` (the sample images) and the files the docs use. Each server address they name
//!   (`http://gpu-box:23333`, or the backend's default URL when they name none) is served by a
//!   `vlm emulate` of that backend on 127.0.0.1, serving the model the docs start that server
//!   with. In a `sh` block a command must succeed; in a `console` block, its output must match
//!   the transcript (ports, durations and rates aside; `...` stands for any lines).
//! - `vlm emulate` / `vlm-emulator` commands must start and print their URL.
//! - `jq`, `cat` and Python blocks run too, in the same folder.
//! - Server start commands (`vllm serve`, `lmdeploy serve api_server`, `ollama pull`, ...)
//!   cannot run here: they are read, and every page must name the same model and port for a
//!   server.
//! - Inline `vlm` commands of four words or more, without placeholders (`URL`, `<model>`), run
//!   too and must not be usage errors.
//! - `<!-- docs-check: file NAME -->` before a block writes it to NAME in the scratch folder;
//!   `<!-- docs-check: skip REASON -->` leaves the next block unrun, with the reason reported;
//!   `<!-- docs-check: any order -->` compares the next transcript's lines in any order.
//!
//! `--bless` writes the real output into `console` transcripts that differ.

mod emulators;
mod fixtures;
mod markdown;
mod run;
mod servers;
mod shell;
mod transcript;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use markdown::Item;
use servers::ServerTable;

use crate::workspace_root;

/// file -> (first line index, old length, new lines)
type Edits = BTreeMap<PathBuf, Vec<(usize, usize, Vec<String>)>>;

/// What one run of docs-check found.
#[derive(Default)]
pub struct Report {
    ran: usize,
    compared: usize,
    servers: usize,
    not_run: BTreeMap<String, usize>,
    failures: Vec<String>,
    /// The transcripts `--bless` rewrites.
    edits: Edits,
}

impl Report {
    fn not_run(&mut self, reason: &str) {
        *self.not_run.entry(reason.to_owned()).or_default() += 1;
    }

    fn fail(&mut self, place: &str, what: String) {
        self.failures.push(format!("{place}: {what}"));
    }
}

/// Runs the check; `bless` rewrites differing transcripts instead of failing on them.
pub fn run(bless: bool) -> Result<(), String> {
    crate::cargo(&["build", "-p", "vlm-cli", "--bin", "vlm"], &[])?;
    crate::cargo(
        &["build", "-p", "vlm-testkit", "--bin", "vlm-emulator"],
        &[],
    )?;
    let bin = target_dir().join("debug");
    let root = workspace_root();
    let pages = pages(&root)?;
    let mut report = Report::default();
    let mut table = ServerTable::default();
    let mut parsed = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page)
            .map_err(|e| format!("cannot read {}: {e}", page.display()))?;
        let items = markdown::parse(&text);
        let name = relative(&root, page);
        read_servers(&name, &items, &mut table, &mut report);
        parsed.push((page.clone(), name, items));
    }
    for (path, name, items) in &parsed {
        let mut page = run::Page::new(&root, &bin, name, &table)?;
        page.check(path, items, bless, &mut report);
    }
    if bless {
        apply_edits(&report.edits)?;
    }
    summarise(&report, pages.len(), table.len())
}

fn summarise(report: &Report, pages: usize, servers: usize) -> Result<(), String> {
    eprintln!(
        "docs-check: {pages} pages; {} commands run ({} transcripts compared); {} server start commands read ({servers} servers, one model and port each)",
        report.ran, report.compared, report.servers
    );
    for (reason, count) in &report.not_run {
        eprintln!("  not run: {count} × {reason}");
    }
    if report.failures.is_empty() {
        Ok(())
    } else {
        for failure in &report.failures {
            eprintln!("\n✗ {failure}");
        }
        Err(format!(
            "docs-check: {} problem(s) in the docs (`cargo xtask docs-check --bless` rewrites transcripts that differ)",
            report.failures.len()
        ))
    }
}

/// Every server start command on a page goes into the table, which refuses a second model or
/// port for the same server.
fn read_servers(name: &str, items: &[Item], table: &mut ServerTable, report: &mut Report) {
    for item in items {
        let commands: Vec<(usize, String, bool)> = match item {
            Item::Fence {
                lang,
                lines,
                first_line,
                ..
            } if lang == "sh" => shell::sh_commands(lines)
                .into_iter()
                .map(|(i, c)| (first_line + i, c, false))
                .collect(),
            Item::Inline { text, line } => vec![(*line, text.clone(), true)],
            _ => continue,
        };
        for (line, text, inline) in commands {
            let Some(cmd) = shell::Command::parse(&text) else {
                continue;
            };
            let Some(start) = servers::parse_start(&cmd) else {
                continue;
            };
            // An inline `ollama pull x` is usually advice quoted from an error message.
            if inline && start.port.is_none() {
                continue;
            }
            report.servers += 1;
            if let Err(e) = table.add(&start, &format!("{name}:{line}")) {
                report.failures.push(e);
            }
        }
    }
}

fn pages(root: &Path) -> Result<Vec<PathBuf>, String> {
    let mut pages = vec![root.join("README.md")];
    for dir in ["docs", "docs/servers"] {
        pages.extend(markdown_in(&root.join(dir))?);
    }
    let crates = std::fs::read_dir(root.join("crates")).map_err(|e| e.to_string())?;
    let mut readmes: Vec<PathBuf> = crates
        .filter_map(Result::ok)
        .map(|e| e.path().join("README.md"))
        .filter(|p| p.exists())
        .collect();
    readmes.sort();
    pages.extend(readmes);
    Ok(pages)
}

fn markdown_in(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    Ok(files)
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn apply_edits(edits: &Edits) -> Result<(), String> {
    for (path, file_edits) in edits {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let mut sorted = file_edits.clone();
        sorted.sort_by_key(|edit| std::cmp::Reverse(edit.0));
        for (start, len, new) in sorted {
            lines.splice(start..start + len, new);
        }
        let mut out = lines.join("\n");
        out.push('\n');
        std::fs::write(path, out).map_err(|e| e.to_string())?;
        eprintln!("docs-check: rewrote transcripts in {}", path.display());
    }
    Ok(())
}
