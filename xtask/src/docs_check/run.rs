//! Running one page's commands in its scratch folder, against its emulators.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use super::emulators::{self, Emulators, Spec};
use super::markdown::Item;
use super::servers::{self, ServerTable};
use super::shell::{self, Command};
use super::{Report, transcript};

/// The folder the docs' examples run in, as the docs write it.
const PROJECT_FOLDER: &str = "/home/me/imageworks";

/// How long one documented command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// One page being checked.
pub struct Page<'a> {
    name: String,
    scratch: PathBuf,
    bin: PathBuf,
    table: &'a ServerTable,
    emulators: Emulators,
}

/// A command ready to run: its text (addresses rewritten), extra environment, and how to map
/// the emulators' addresses back in its output.
struct Prepared {
    text: String,
    env: Vec<(String, String)>,
}

/// What a command is, for docs-check.
enum Kind {
    /// Run it (a `vlm` command, a tool such as `jq`).
    Run,
    /// A `vlm emulate` or `vlm-emulator`: it must start and print its URL.
    Emulate,
    /// A server start command (read into the server table).
    Server,
    /// Not run, for this reason.
    NotRun(&'static str),
    /// docs-check does not know it.
    Unknown,
}

impl<'a> Page<'a> {
    /// A fresh scratch folder for the page `name`.
    pub fn new(
        root: &Path,
        bin: &Path,
        name: &str,
        table: &'a ServerTable,
    ) -> Result<Self, String> {
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let scratch = std::env::temp_dir().join("vlm-docs-check").join(slug);
        let _ = std::fs::remove_dir_all(&scratch);
        super::fixtures::write(root, &scratch)?;
        Ok(Self {
            name: name.to_owned(),
            scratch,
            bin: bin.to_owned(),
            table,
            emulators: Emulators::new(&bin.join("vlm")),
        })
    }

    /// Checks every item of the page.
    pub fn check(&mut self, path: &Path, items: &[Item], bless: bool, report: &mut Report) {
        let mut directive: Option<String> = None;
        for item in items {
            match item {
                Item::Directive { text, .. } => directive = Some(text.clone()),
                Item::Fence {
                    lang,
                    lines,
                    first_line,
                    indent,
                } => {
                    let place = format!("{}:{first_line}", self.name);
                    let mut directive = directive.take();
                    // `any order`: the lines of the next transcript come in completion order.
                    let unordered = directive.as_deref() == Some("any order");
                    if unordered {
                        directive = None;
                    }
                    match directive {
                        Some(d) if d.starts_with("file ") => {
                            self.write_file(&d[5..], lines, &place, report)
                        }
                        Some(d) if d.starts_with("skip ") => report.not_run(d[5..].trim()),
                        Some(d) => report.fail(
                            &place,
                            format!(
                                "unknown directive `{d}` (file NAME, skip REASON or any order)"
                            ),
                        ),
                        None => match lang.as_str() {
                            "sh" => self.sh_block(lines, *first_line, report),
                            "console" => {
                                let block = Block {
                                    path,
                                    lines,
                                    first_line: *first_line,
                                    indent: *indent,
                                    unordered,
                                };
                                self.console_block(&block, bless, report);
                            }
                            "python" => self.python_block(lines, &place, report),
                            _ => {}
                        },
                    }
                }
                Item::Inline { text, line } => self.inline(text, *line, report),
            }
        }
    }

    fn write_file(&self, name: &str, lines: &[String], place: &str, report: &mut Report) {
        let path = self.scratch.join(name.trim());
        let mut text = lines.join("\n");
        text.push('\n');
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, text));
        if let Err(e) = written {
            report.fail(place, format!("cannot write {}: {e}", path.display()));
        }
    }

    fn sh_block(&mut self, lines: &[String], first_line: usize, report: &mut Report) {
        for (offset, text) in shell::sh_commands(lines) {
            let place = format!("{}:{}", self.name, first_line + offset);
            let Some(cmd) = Command::parse(&text) else {
                continue;
            };
            self.fresh_output(&cmd);
            match self.outcome(&cmd, report) {
                Ok(Some((code, output))) if code != 0 => report.fail(
                    &place,
                    format!("`{}` exited {code}:\n{}", cmd.text, indent(&output)),
                ),
                Ok(_) => {}
                Err(e) => report.fail(&place, format!("`{}`: {e}", cmd.text)),
            }
        }
    }

    /// An example stands alone: the output it names starts empty unless it resumes.
    fn fresh_output(&self, cmd: &Command) {
        if cmd.flag("--resume") {
            return;
        }
        if let Some(output) = scratch_output(cmd) {
            let _ = std::fs::remove_file(self.scratch.join(output));
        }
    }

    fn inline(&mut self, text: &str, line: usize, report: &mut Report) {
        let Some(cmd) = Command::parse(text) else {
            return;
        };
        let program = cmd.argv()[0].as_str();
        let is_command = matches!(program, "vlm" | "vlm-emulator")
            && cmd.argv().len() >= 4
            && !cmd.argv().iter().any(|w| is_placeholder(w));
        if !is_command {
            return;
        }
        let place = format!("{}:{line}", self.name);
        self.fresh_output(&cmd);
        match self.outcome(&cmd, report) {
            Ok(Some((code, output))) if code == 2 && is_usage_error(&output) => report.fail(
                &place,
                format!(
                    "`{}` is not a valid command:\n{}",
                    cmd.text,
                    indent(&output)
                ),
            ),
            Ok(_) => {}
            Err(e) => report.fail(&place, format!("`{}`: {e}", cmd.text)),
        }
    }

    fn console_block(&mut self, block: &Block<'_>, bless: bool, report: &mut Report) {
        let mut last_code = 0;
        for step in console_steps(block.lines) {
            let place = format!("{}:{}", self.name, block.first_line + step.line);
            let Some(cmd) = Command::parse(&step.command) else {
                continue;
            };
            let actual = if cmd.text == "echo $?" {
                report.ran += 1;
                vec![last_code.to_string()]
            } else {
                match self.outcome(&cmd, report) {
                    Ok(Some((code, output))) => {
                        last_code = code;
                        output.lines().map(str::to_owned).collect()
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        report.fail(&place, format!("`{}`: {e}", cmd.text));
                        continue;
                    }
                }
            };
            report.compared += 1;
            let expected = &block.lines[step.output.clone()];
            let same = if block.unordered {
                transcript::matches_in_any_order(expected, &actual)
            } else {
                transcript::matches(expected, &actual)
            };
            if same {
                continue;
            }
            if bless {
                let pad = " ".repeat(block.indent);
                let new = actual
                    .iter()
                    .map(|l| format!("{pad}{l}").trim_end().to_owned())
                    .collect();
                let start = block.first_line - 1 + step.output.start;
                report
                    .edits
                    .entry(block.path.to_owned())
                    .or_default()
                    .push((start, step.output.len(), new));
            } else {
                report.fail(
                    &place,
                    format!(
                        "the output of `{}` differs from the page's.\n  page:\n{}\n  real:\n{}",
                        cmd.text,
                        indent(&expected.join("\n")),
                        indent(&actual.join("\n"))
                    ),
                );
            }
        }
    }

    fn python_block(&mut self, lines: &[String], place: &str, report: &mut Report) {
        let code = lines.join("\n");
        report.ran += 1;
        match self.execute("python3 -", &[], Some(&code)) {
            Ok((0, _)) => {}
            Ok((status, output)) => report.fail(
                place,
                format!("the Python block exited {status}:\n{}", indent(&output)),
            ),
            Err(e) => report.fail(place, format!("the Python block: {e}")),
        }
    }

    /// Runs (or reads) one command: `Some((exit code, output))` when it ran.
    fn outcome(
        &mut self,
        cmd: &Command,
        report: &mut Report,
    ) -> Result<Option<(i32, String)>, String> {
        match classify(cmd) {
            Kind::Run => {
                report.ran += 1;
                let prepared = self.prepare(cmd)?;
                let (code, output) = self.execute(&prepared.text, &prepared.env, None)?;
                Ok(Some((code, self.map_back(&output))))
            }
            Kind::Emulate => {
                report.ran += 1;
                self.emulate(cmd)?;
                Ok(None)
            }
            Kind::Server => Ok(None),
            Kind::NotRun(reason) => {
                report.not_run(reason);
                Ok(None)
            }
            Kind::Unknown => Err(format!(
                "docs-check does not know how to check `{}`: teach xtask/src/docs_check/run.rs, or mark the block `<!-- docs-check: skip REASON -->`",
                cmd.argv()[0]
            )),
        }
    }

    fn emulate(&self, cmd: &Command) -> Result<(), String> {
        // `vlm emulate ...` or `vlm-emulator ...`: the program is one of the built binaries.
        let argv = cmd.argv();
        let binary = self.bin.join(&argv[0]);
        let mut args = argv[1..].to_vec();
        // A documented fixed port becomes a free one: tests bind port 0.
        if let Some(i) = args.iter().position(|a| a == "--port")
            && let Some(port) = args.get_mut(i + 1)
        {
            *port = "0".to_owned();
        }
        let (mut child, _url) = emulators::start(&binary, &args)?;
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// Rewrites the server addresses of a `vlm` command to emulators of the right backend.
    fn prepare(&mut self, cmd: &Command) -> Result<Prepared, String> {
        let mut text = cmd.text.clone();
        if let Some(rest) = cargo_run_vlm(cmd) {
            text = rest;
        }
        let mut env = Vec::new();
        if !needs_server(cmd) {
            return Ok(Prepared { text, env });
        }
        let origins: Vec<String> = emulators::origins_in(&cmd.text)
            .into_iter()
            .filter(|o| emulators::port_of(o).is_some_and(|p| p >= 1024))
            .collect();
        if origins.is_empty() && !has_unreachable_url(&cmd.text) {
            let backend = backend_of(cmd, None, self.table);
            if let Some(origin) = default_origin(&backend, self.table) {
                let spec = self.spec(cmd, &backend, &origin)?;
                let (_, base) = self.emulators.origin_for(&origin, &spec)?;
                env.push((
                    format!("VLM_{}_BASE_URL", backend.to_ascii_uppercase()),
                    base,
                ));
            }
        }
        for origin in origins {
            let backend = backend_of(cmd, emulators::port_of(&origin), self.table);
            let spec = self.spec(cmd, &backend, &origin)?;
            let (emulated, _) = self.emulators.origin_for(&origin, &spec)?;
            text = text.replace(&origin, &emulated);
        }
        Ok(Prepared { text, env })
    }

    /// The emulator standing for the server at `origin` that `cmd` talks to as `backend`.
    fn spec(&self, cmd: &Command, backend: &str, origin: &str) -> Result<Spec, String> {
        let port = emulators::port_of(origin).unwrap_or_default();
        let kind = self
            .table
            .kind_at(backend, port)
            .or(default_kind(backend, port));
        let documented_host = !origin.starts_with("http://127.0.0.1:");
        let checked = matches!(backend, "vllm" | "lmdeploy" | "ollama") && documented_host;
        if let Some(kind) = kind.filter(|_| checked)
            && let Some(documented) = self.table.port(kind)
            && documented != port
        {
            return Err(format!(
                "{origin} is not where the docs start {kind} (port {documented})"
            ));
        }
        let upper = backend.to_ascii_uppercase();
        let asked = cmd
            .option("--vlm-model")
            .or(cmd.env_value(&format!("VLM_{upper}_MODEL")))
            .or(cmd.env_value("VLM_MODEL"))
            .map(str::to_owned);
        let model = kind
            .and_then(|k| self.table.model(k))
            .map(str::to_owned)
            .or(asked.clone());
        let variant = match (backend, kind) {
            ("triton", _) if asked.as_deref() == Some("vllm_model") => Some("vllm".to_owned()),
            ("openai", Some(flavor @ ("sglang" | "llama-cpp" | "trtllm-serve" | "lm-studio"))) => {
                Some(flavor.to_owned())
            }
            _ => None,
        };
        let api_key = cmd
            .env_value(&format!("VLM_{upper}_API_KEY"))
            .or(cmd.env_value("VLM_API_KEY"))
            .map(str::to_owned);
        Ok(Spec {
            backend: backend.to_owned(),
            variant,
            model,
            api_key,
        })
    }

    fn map_back(&self, output: &str) -> String {
        let mut out = output.replace(&self.scratch.display().to_string(), PROJECT_FOLDER);
        for (emulated, documented) in self.emulators.back_map() {
            out = replace_in_columns(&out, &emulated, &documented);
        }
        out
    }

    /// Runs `text` with bash in the scratch folder: (exit code, stdout and stderr together).
    fn execute(
        &self,
        text: &str,
        env: &[(String, String)],
        stdin: Option<&str>,
    ) -> Result<(i32, String), String> {
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut process = Process::new("bash");
        process
            .arg("-c")
            .arg(format!("exec 2>&1\n{text}"))
            .current_dir(&self.scratch)
            .env("PATH", path)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("VLM_") || key.starts_with("SLURM_") || key == "JOB_COMPLETION_INDEX"
            {
                process.env_remove(key);
            }
        }
        process.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = process
            .spawn()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        if let (Some(code), Some(mut input)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            input
                .write_all(code.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let mut stdout = child.stdout.take().ok_or("no stdout")?;
        let reader = std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = stdout.read_to_string(&mut buf);
            buf
        });
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if started.elapsed() > COMMAND_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "still running after {} s",
                    COMMAND_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = reader.join().unwrap_or_default();
        Ok((status.code().unwrap_or(-1), output))
    }
}

/// A console block being compared.
struct Block<'b> {
    path: &'b Path,
    lines: &'b [String],
    first_line: usize,
    indent: usize,
    /// Compare the lines as a set (`<!-- docs-check: any order -->`).
    unordered: bool,
}

/// One `$ command` of a console block and the range of its output lines.
struct Step {
    command: String,
    line: usize,
    output: std::ops::Range<usize>,
}

fn console_steps(lines: &[String]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(command) = line.strip_prefix("$ ") {
            steps.push(Step {
                command: command.to_owned(),
                line: i,
                output: i + 1..i + 1,
            });
        } else if let Some(step) = steps.last_mut() {
            step.output.end = i + 1;
        }
    }
    steps
}

fn classify(cmd: &Command) -> Kind {
    let argv = cmd.argv();
    let word = |i: usize| argv.get(i).map(String::as_str).unwrap_or_default();
    if servers::parse_start(cmd).is_some() {
        return Kind::Server;
    }
    match word(0) {
        "vlm" if word(1) == "emulate" => Kind::Emulate,
        "vlm-emulator" => Kind::Emulate,
        "vlm" => Kind::Run,
        "cargo" if cargo_run_vlm(cmd).is_some() => Kind::Run,
        "cargo" if word(1) == "xtask" => {
            Kind::NotRun("`cargo xtask`: the project's own automation, run by CI itself")
        }
        "cargo" if word(1) == "install" => {
            Kind::NotRun("`cargo install`: builds the `vlm` that docs-check runs")
        }
        "jq" | "cat" | "echo" | "head" | "wc" | "cd" | "mkdir" | "python3" | "python" => Kind::Run,
        "kubectl" | "sbatch" => Kind::NotRun("a cluster scheduler's command (Kubernetes, Slurm)"),
        "docker" | "pip" | "huggingface-cli" => Kind::NotRun("installs or starts server software"),
        "lms" if word(1) == "get" => Kind::NotRun("downloads a model (LM Studio)"),
        _ => Kind::Unknown,
    }
}

/// Replaces `from` with `to` in every line, keeping a table's columns where they were: a
/// replacement followed by a run of spaces (a column gap) gets that run lengthened or
/// shortened by the difference, keeping at least one space.
fn replace_in_columns(text: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(from) {
        out.push_str(&rest[..at]);
        out.push_str(to);
        rest = &rest[at + from.len()..];
        let tail = rest.trim_start_matches(|c: char| c != ' ' && c != '\n');
        let word_end = rest.len() - tail.len();
        let spaces = tail.len() - tail.trim_start_matches(' ').len();
        if spaces >= 2 {
            out.push_str(&rest[..word_end]);
            let wanted = (spaces + from.len()).saturating_sub(to.len()).max(1);
            out.push_str(&" ".repeat(wanted));
            rest = &tail[spaces..];
        }
    }
    out.push_str(rest);
    out
}

/// The output file a command names, when it lies inside the scratch folder: never an absolute
/// path (`-o /dev/full` is the device, not a file to remove) nor one that climbs out with `..`.
fn scratch_output(cmd: &Command) -> Option<&Path> {
    let output = Path::new(cmd.option("-o").or(cmd.option("--output"))?);
    let inside = output.is_relative()
        && !output
            .components()
            .any(|c| c == std::path::Component::ParentDir);
    inside.then_some(output)
}

/// `cargo run -p vlm-cli -- ARGS` as `vlm ARGS` (the binary docs-check built).
fn cargo_run_vlm(cmd: &Command) -> Option<String> {
    let argv = cmd.argv();
    let is_run = argv.first().map(String::as_str) == Some("cargo")
        && argv.get(1).map(String::as_str) == Some("run")
        && argv.windows(2).any(|w| w[0] == "-p" && w[1] == "vlm-cli");
    if !is_run {
        return None;
    }
    let (_, args) = cmd.text.split_once(" -- ")?;
    Some(format!("vlm {args}"))
}

fn subcommand(cmd: &Command) -> Option<&str> {
    cmd.argv().iter().map(String::as_str).find(|w| {
        matches!(
            *w,
            "narrate" | "run" | "health" | "backends" | "config" | "emulate"
        )
    })
}

fn needs_server(cmd: &Command) -> bool {
    match subcommand(cmd) {
        Some("narrate" | "run" | "health") => !cmd.flag("--emulate"),
        Some("backends") => cmd.flag("--check"),
        _ => false,
    }
}

/// A URL on a port below 1024 is there to be refused (no server runs there).
fn has_unreachable_url(text: &str) -> bool {
    emulators::origins_in(text)
        .iter()
        .any(|o| emulators::port_of(o).is_some_and(|p| p < 1024))
}

/// The backend a command talks to at `port`: `--vlm-backend`, `VLM_BACKEND`, else vllm; for
/// `auto`, the server the docs start on that port.
fn backend_of(cmd: &Command, port: Option<u16>, table: &ServerTable) -> String {
    // `VLM_LMDEPLOY_BASE_URL=http://gpu-box:23333/v1 vlm ...`: that address is LMDeploy's.
    let by_variable = cmd.env.iter().find_map(|(name, value)| {
        let backend = name.strip_prefix("VLM_")?.strip_suffix("_BASE_URL")?;
        let here = port.is_some_and(|p| value.contains(&format!(":{p}")));
        (here && !backend.is_empty()).then(|| backend.to_ascii_lowercase())
    });
    if let Some(backend) = by_variable {
        return backend;
    }
    let named = cmd
        .option("--vlm-backend")
        .or(cmd.env_value("VLM_BACKEND"))
        .unwrap_or("vllm");
    if named != "auto" {
        return named.to_owned();
    }
    let port = port.unwrap_or(8000);
    ["triton", "ollama", "vllm", "lmdeploy", "openai"]
        .into_iter()
        .find(|b| table.kind_at(b, port).is_some())
        .unwrap_or("vllm")
        .to_owned()
}

/// Where a backend listens when the docs name no URL.
fn default_origin(backend: &str, table: &ServerTable) -> Option<String> {
    let port = match backend {
        "vllm" => table.port("vllm").unwrap_or(8000),
        "lmdeploy" => table.port("lmdeploy").unwrap_or(23333),
        "triton" => table.port("triton").unwrap_or(8000),
        "ollama" => table.port("ollama").unwrap_or(11434),
        _ => return None,
    };
    Some(format!("http://localhost:{port}"))
}

/// The server a backend most likely is at a port no start command in the docs names.
fn default_kind(backend: &str, port: u16) -> Option<&'static str> {
    Some(match (backend, port) {
        ("vllm", _) => "vllm",
        ("lmdeploy", _) => "lmdeploy",
        ("triton", _) => "triton",
        ("ollama", _) => "ollama",
        ("openai", 8080) => "llama-cpp",
        ("openai", _) => "sglang",
        _ => return None,
    })
}

/// clap's answer to a misspelt command (a missing path is only a shortened example).
fn is_usage_error(output: &str) -> bool {
    output.contains("Usage:") && !output.contains("required arguments were not provided")
}

/// `URL`, `K`, `FILE`, `<model>`: a word that stands for something.
fn is_placeholder(word: &str) -> bool {
    (word.contains('<') && word.contains('>') && !word.contains('|'))
        || word.contains("...")
        || (word.len() <= 6
            && word.chars().any(|c| c.is_ascii_uppercase())
            && word
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &str) -> Command {
        Command::parse(line).unwrap_or_else(|| panic!("no command in {line}"))
    }

    #[test]
    fn commands_are_told_apart() {
        assert!(matches!(
            classify(&cmd("vlm narrate photos/ -o out.jsonl")),
            Kind::Run
        ));
        assert!(matches!(
            classify(&cmd("vlm emulate --backend vllm")),
            Kind::Emulate
        ));
        assert!(matches!(
            classify(&cmd("vllm serve M --port 8000")),
            Kind::Server
        ));
        assert!(matches!(classify(&cmd("cargo xtask ci")), Kind::NotRun(_)));
        assert!(matches!(classify(&cmd("rm -rf /")), Kind::Unknown));
        assert_eq!(
            cargo_run_vlm(&cmd(
                "cargo run -p vlm-cli -- narrate --emulate assets/samples"
            ))
            .as_deref(),
            Some("vlm narrate --emulate assets/samples")
        );
    }

    #[test]
    fn addresses_mapped_back_keep_a_tables_columns() {
        let emulated = "http://127.0.0.1:40111";
        let row = format!("lmdeploy  {emulated}/v1/    model  ready");
        let back = replace_in_columns(&row, emulated, "http://gpu-box:23333");
        assert_eq!(back, "lmdeploy  http://gpu-box:23333/v1/      model  ready");
        assert_eq!(back.find("model"), row.find("model"));
        // Prose has no column gap: a plain replacement.
        assert_eq!(
            replace_in_columns("at http://127.0.0.1:40111/v1; ok", emulated, "http://h:1"),
            "at http://h:1/v1; ok"
        );
    }

    #[test]
    fn only_outputs_inside_the_scratch_folder_are_cleared() {
        let out = |line: &str| scratch_output(&cmd(line)).map(|p| p.display().to_string());
        assert_eq!(
            out("vlm narrate p -o out.jsonl").as_deref(),
            Some("out.jsonl")
        );
        assert_eq!(
            out("vlm narrate p --output results/a.jsonl").as_deref(),
            Some("results/a.jsonl")
        );
        assert_eq!(out("vlm narrate p -o /dev/full"), None);
        assert_eq!(out("vlm narrate p -o ../x.jsonl"), None);
        assert_eq!(out("vlm narrate p -o a/../../x.jsonl"), None);
    }

    #[test]
    fn which_commands_need_a_server() {
        assert!(needs_server(&cmd("vlm narrate photos/ -o x")));
        assert!(!needs_server(&cmd("vlm narrate --emulate photos/")));
        assert!(needs_server(&cmd("vlm --tool t -q health")));
        assert!(!needs_server(&cmd("vlm config --vlm-backend lmdeploy")));
        assert!(needs_server(&cmd("vlm backends --check")));
        assert!(
            is_placeholder("URL")
                && is_placeholder("<model>")
                && !is_placeholder("'<|image|>{prompt}'")
        );
    }

    #[test]
    fn console_steps_own_their_output_lines() {
        let lines: Vec<String> = ["$ vlm health", "state: ready", "model: m", "$ echo $?", "0"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let steps = console_steps(&lines);
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].output, 1..3);
        assert_eq!(steps[1].command, "echo $?");
        assert_eq!(steps[1].output, 4..5);
    }
}
