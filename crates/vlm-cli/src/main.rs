//! `vlm`: narrate images through any vision-language model server — vLLM, LMDeploy, Triton,
//! Ollama or any OpenAI-compatible one — chosen by configuration or `--vlm-backend`.

mod commands;
mod concurrency;
mod emulate;
mod files;
mod narrate;
mod output;
mod resize;
mod run;
mod shard;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vlm_core::VlmError;
use vlm_factory::VlmSettings;

/// The exit codes, fixed by the project's decisions (scripts rely on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every image succeeded, or there was nothing to do.
    Ok = 0,
    /// The run finished but at least one image failed.
    SomeFailed = 1,
    /// Usage or configuration error.
    Usage = 2,
    /// The server is unreachable or unhealthy at the pre-flight check, or went away mid-run
    /// for longer than `--wait`.
    Server = 3,
    /// Unsupported: the model cannot take images from this client.
    Unsupported = 4,
    /// A record could not be written (disk full, I/O error): the run stopped.
    Output = 5,
    /// Interrupted (Ctrl-C).
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// A failure that ends the command with an exit code and a message for stderr.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub exit: Exit,
    /// What to tell the user.
    pub message: String,
}

impl Failure {
    /// A usage or configuration failure (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
}

impl From<VlmError> for Failure {
    fn from(e: VlmError) -> Self {
        let exit = if e.is_config() {
            Exit::Usage
        } else if e.is_unsupported() {
            Exit::Unsupported
        } else {
            Exit::Server
        };
        Failure {
            exit,
            message: e.to_string(),
        }
    }
}

const EXIT_CODES: &str = "Exit codes:
  0    every image succeeded (or there was nothing to do)
  1    the run finished but at least one image failed
  2    usage or configuration error (unknown backend, backend not compiled in, bad --config,
       output exists without --resume/--overwrite, output in use by another run)
  3    server unreachable or unhealthy at the pre-flight check (with several endpoints: none
       ready), or gone mid-run for longer than --wait (60 s by default; --resume finishes)
  4    unsupported: the model cannot take images from this client (a Triton model that wants
       preprocessed pixels, a text-only one, Triton's OpenAI frontend); the health report and
       what to run instead are printed, before --output is opened
  5    the output could not be written (disk full, I/O error): the run stopped; the records
       written are whole lines, and --resume finishes the job once the cause is fixed
  130  interrupted (Ctrl-C)";

/// Narrate images through vLLM, LMDeploy, Triton, Ollama or any OpenAI-compatible server — one
/// interface, chosen by configuration.
///
/// Settings come from, later winning: defaults, pyproject.toml ([tool.imageworks.vlm], then
/// [tool.imageworks.TOOL]), --config FILE, VLM_* environment variables, then these flags.
#[derive(Debug, Parser)]
#[command(name = "vlm", version, after_help = EXIT_CODES, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

/// Parses `--wait SECONDS` (a number >= 0).
pub fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|w| w.is_finite() && *w >= 0.0 && *w <= 86_400.0 * 7.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds >= 0"))
}

/// For `vlm_backend = "auto"`: detects the backend, trying again with backoff while the server
/// is unreachable or still starting, up to `wait` when given (`--wait`).
pub async fn resolve_backend(
    settings: VlmSettings,
    wait: Option<std::time::Duration>,
) -> Result<(VlmSettings, Option<vlm_core::Detection>), Failure> {
    let started = std::time::Instant::now();
    let mut delay = std::time::Duration::from_millis(250);
    loop {
        match vlm_factory::resolve_backend(settings.clone()).await {
            Ok(resolved) => return Ok(resolved),
            Err(e) if e.is_retryable() && wait.is_some_and(|w| started.elapsed() + delay < w) => {
                tracing::debug!("vlm_backend = auto: nothing to detect yet ({e}); waiting");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
            Err(e) => {
                let mut failure = Failure::from(e);
                failure.message = format!(
                    "vlm_backend = auto could not detect the server at {}: {}{}",
                    settings.base_url,
                    failure.message,
                    if wait.is_none() && failure.exit == Exit::Server {
                        "; if it is still starting, give --wait SECONDS"
                    } else {
                        ""
                    }
                );
                return Err(failure);
            }
        }
    }
}

/// The pre-flight health check: polled up to `wait` when given, saying (at the default log
/// level) that it waits, why, and every 15 s how long is left.
pub async fn check_health(
    client: &dyn vlm_core::VlmClient,
    wait: Option<std::time::Duration>,
) -> Result<vlm_core::HealthReport, Failure> {
    use vlm_core::HealthState;
    let report = client.health().await?;
    let Some(wait) = wait else { return Ok(report) };
    if !matches!(
        report.state,
        HealthState::Starting { .. } | HealthState::Unreachable { .. }
    ) || wait.is_zero()
    {
        return Ok(report);
    }
    let started = std::time::Instant::now();
    tracing::info!(
        "the {} server at {} is {}; waiting up to {:.0} s for it (--wait)",
        client.backend(),
        report.base_url,
        report.state.label(),
        wait.as_secs_f64()
    );
    let polling = client.wait_ready(wait);
    let mut polling = std::pin::pin!(polling);
    let every = std::time::Duration::from_secs(15);
    loop {
        tokio::select! {
            report = &mut polling => return Ok(report?),
            () = tokio::time::sleep(every) => tracing::info!(
                "still waiting for the server: {:.0} s left of --wait",
                wait.saturating_sub(started.elapsed()).as_secs_f64()
            ),
        }
    }
}

/// How long requests wait for a server that went away mid-run (a restart, a model swap)
/// before the run stops with exit 3, unless `--wait` says otherwise.
pub const OUTAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The client `narrate` and `run` send through: one client per endpoint behind
/// [`vlm_core::Replicas`], checked (polled up to `wait`), refused with the health report when no
/// endpoint is ready or the model cannot take images from this client (a Triton model that
/// wants preprocessed pixels, a text-only one, Triton's OpenAI frontend), then named in the
/// `🤖 VLM:` log line. Call it before the output is opened.
pub async fn ready_client(
    settings: &VlmSettings,
    wait: Option<std::time::Duration>,
    options: vlm_core::ReplicaOptions,
) -> Result<vlm_core::Replicas, Failure> {
    use vlm_core::VlmClient as _;
    let client = vlm_factory::build_replicas(settings, options)?;
    let report = check_health(&client, wait).await?;
    if let Err(e) = client.image_support().await
        && e.is_unsupported()
    {
        eprint!("{report}");
        return Err(e.into());
    }
    let stats = client.stats();
    if !report.is_ready() {
        eprint!("{report}");
        let mut failure = not_ready(&client, &report);
        if stats.len() > 1 {
            failure.message = format!(
                "none of the {} endpoints is ready; {}",
                stats.len(),
                failure.message
            );
        }
        return Err(failure);
    }
    for out in stats.iter().filter(|s| !s.in_rotation) {
        tracing::warn!(
            "endpoint {} is not ready; requests go to the others until it is",
            out.base_url
        );
    }
    let endpoints = match stats.len() {
        1 => String::new(),
        n => format!(
            " ({} endpoints, {} ready)",
            n,
            stats.iter().filter(|s| s.in_rotation).count()
        ),
    };
    tracing::info!(
        "🤖 VLM: {}/{}{endpoints}",
        client.backend(),
        vlm_core::text::shown_model(client.model().unwrap_or("(unknown)"))
    );
    Ok(client)
}

/// The failure for a server that is not ready (exit 3), naming its state and why.
pub fn not_ready(client: &dyn vlm_core::VlmClient, report: &vlm_core::HealthReport) -> Failure {
    Failure {
        exit: Exit::Server,
        message: format!(
            "the {} server at {} is {}: {}",
            client.backend(),
            report.base_url,
            report.state.label(),
            report.state.reason().unwrap_or("not ready")
        ),
    }
}

/// Writes a line to stdout; a closed pipe (`vlm config | head -1`) ends the process quietly
/// instead of panicking.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*).and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// Backend: vllm (default), lmdeploy, triton, ollama, openai (any OpenAI-compatible server),
    /// or auto (probe --vlm-base-url and pick) [setting: vlm_backend]
    #[arg(long, global = true, value_name = "BACKEND")]
    pub vlm_backend: Option<String>,
    /// Base URL of the server, e.g. http://localhost:8000/v1 [setting: vlm_base_url]
    #[arg(long, global = true, value_name = "URL")]
    pub vlm_base_url: Option<String>,
    /// Model name; by default the only model the server serves [setting: vlm_model]
    #[arg(long, global = true, value_name = "MODEL")]
    pub vlm_model: Option<String>,
    /// Seconds to wait for one inference's whole answer, streamed or not [setting: vlm_timeout,
    /// default 120]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub vlm_timeout: Option<String>,
    /// Seconds to wait for a connection to the server [setting: vlm_connect_timeout, default 5]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub vlm_connect_timeout: Option<String>,
    /// Seconds to wait for each health probe [setting: vlm_health_timeout, default 10]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub vlm_health_timeout: Option<String>,
    /// Retries of a failed request (connection errors, 408, 429, 5xx gateway statuses)
    /// [setting: vlm_max_retries, default 2]
    #[arg(long, global = true, value_name = "N")]
    pub vlm_max_retries: Option<String>,
    /// A TOML file of vlm_* settings, read after pyproject.toml (it must exist)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The tool whose [tool.imageworks.TOOL] table is read
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        default_value = "color_narrator"
    )]
    pub tool: String,
    /// More logging (-v debug, -vv trace); RUST_LOG wins when set
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less logging (errors only)
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Narrate images (files or folders): one JSON line per image
    #[command(after_help = narrate::AFTER_HELP)]
    Narrate(narrate::NarrateArgs),
    /// Answer a file of requests in the OpenAI Batch format (one JSON line each), writing the
    /// Batch output format: one line per request, in completion order
    Run(run::RunArgs),
    /// Check the configured server and print why it is or is not ready (exit 3 if not)
    Health(commands::HealthArgs),
    /// List the backends: compiled in, default URL, configured URL/model, and with --check health
    Backends(commands::BackendsArgs),
    /// Print the resolved settings and where each came from (API keys as ***)
    Config,
    /// Serve a local emulator of vLLM, LMDeploy, Triton, Ollama or an OpenAI-compatible server
    /// until killed
    Emulate(commands::EmulateArgs),
}

impl GlobalOpts {
    /// Loads the settings, and for `vlm_backend = "auto"` detects the backend (logging what was
    /// found), so that the settings name a backend.
    pub async fn load_resolved(
        &self,
        extra: &[(&str, Option<String>, &str)],
        wait: Option<std::time::Duration>,
    ) -> Result<(VlmSettings, Option<vlm_core::Detection>), Failure> {
        let settings = self.load_settings(extra)?;
        resolve_backend(settings, wait).await
    }

    /// Loads the settings from every layer, with these flags (and `extra` ones) on top.
    pub fn load_settings(
        &self,
        extra: &[(&str, Option<String>, &str)],
    ) -> Result<VlmSettings, Failure> {
        let mut loader = VlmSettings::loader().tool(&self.tool).process_env();
        let cwd = std::env::current_dir()
            .map_err(|e| Failure::usage(format!("cannot read the current directory: {e}")))?;
        loader = loader.cwd(cwd);
        if let Some(path) = &self.config {
            loader = loader.config_file(path);
        }
        let flags = [
            ("vlm_backend", self.vlm_backend.clone(), "--vlm-backend"),
            ("vlm_base_url", self.vlm_base_url.clone(), "--vlm-base-url"),
            ("vlm_model", self.vlm_model.clone(), "--vlm-model"),
            ("vlm_timeout", self.vlm_timeout.clone(), "--vlm-timeout"),
            (
                "vlm_connect_timeout",
                self.vlm_connect_timeout.clone(),
                "--vlm-connect-timeout",
            ),
            (
                "vlm_health_timeout",
                self.vlm_health_timeout.clone(),
                "--vlm-health-timeout",
            ),
            (
                "vlm_max_retries",
                self.vlm_max_retries.clone(),
                "--vlm-max-retries",
            ),
        ];
        for (key, value, flag) in flags.iter().cloned().chain(extra.iter().cloned()) {
            if let Some(value) = value {
                loader = loader.set_override(key, value, flag);
            }
        }
        let settings = loader.load()?;
        match settings.pyproject() {
            Some(path) => tracing::debug!("settings from {}", path.display()),
            None => tracing::debug!(
                "no pyproject.toml with a [tool.imageworks] table here or in a parent folder; \
                 settings from defaults, --config, VLM_* variables and flags"
            ),
        }
        Ok(settings)
    }
}

fn init_tracing(global: &GlobalOpts) {
    let default = if global.quiet {
        "error"
    } else {
        match global.verbose {
            0 => "vlm=info,vlm_cli=info,warn",
            1 => {
                "vlm=debug,vlm_cli=debug,vlm_core=debug,vlm_factory=debug,vlm_vllm=debug,vlm_lmdeploy=debug,vlm_triton=debug,info"
            }
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_target(false)
        .without_time()
        .try_init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    init_tracing(&cli.global);
    // File reads go to the blocking pool; a small pool keeps threads (and their malloc arenas)
    // few, so memory stays flat however many images a run narrates.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Narrate(args) => narrate::run(&cli.global, args).await,
            Command::Run(args) => run::run(&cli.global, args).await,
            Command::Health(args) => commands::health(&cli.global, args).await,
            Command::Backends(args) => commands::backends(&cli.global, args).await,
            Command::Config => commands::config(&cli.global),
            Command::Emulate(args) => commands::emulate(&cli.global, args).await,
        }
    });
    // Do not wait for stray tasks (a hung request after a second Ctrl-C).
    runtime.shutdown_background();
    match result {
        Ok(exit) => exit.into(),
        Err(failure) => {
            eprintln!(
                "error: {}",
                vlm_core::text::escape_controls(&failure.message)
            );
            failure.exit.into()
        }
    }
}
