//! `vlm health`, `vlm backends`, `vlm config`, `vlm emulate`.

use std::time::Duration;

use clap::Args;
use vlm_core::{VlmBackend, VlmClient as _};
use vlm_factory::{build_client, is_compiled};

use crate::{Exit, Failure, GlobalOpts};

/// `vlm health` arguments.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Wait up to this many seconds for a server that is still starting
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse_seconds)]
    wait: Option<Duration>,
}

/// `vlm backends` arguments.
#[derive(Debug, Args)]
pub struct BackendsArgs {
    /// Also check the live health of each backend with a configured URL or model
    #[arg(long)]
    check: bool,
}

/// `vlm emulate` arguments (the same as `vlm-emulator`).
#[derive(Debug, Args)]
pub struct EmulateArgs {
    /// The server to emulate: vllm, lmdeploy, triton, ollama or openai
    #[arg(long, value_name = "BACKEND")]
    backend: String,
    /// Port on 127.0.0.1 (0: any free port)
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The model served (default: Qwen/Qwen2-VL-2B-Instruct; triton: ensemble; ollama:
    /// qwen2.5vl:7b)
    #[arg(long)]
    model: Option<String>,
    /// Require this API key where the real server would
    #[arg(long)]
    api_key: Option<String>,
    /// Answer every chat request with one fixed completion (for benchmarks)
    #[arg(long)]
    fast: bool,
    /// With --backend openai: which server, sglang (default), llama-cpp or trtllm-serve
    #[arg(long, value_name = "FLAVOR")]
    flavor: Option<String>,
    /// With --backend triton: which model, multimodal (a TensorRT-LLM multimodal ensemble,
    /// default), vllm (Triton's vLLM backend) or text (text-only)
    #[arg(long, value_name = "KIND")]
    triton_model: Option<String>,
    /// Behave like a loaded GPU: decode up to K chat requests together; past K they queue
    /// (published on vLLM's GET /metrics) and latency grows; 4 K waiting is a 503
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    capacity: Option<u32>,
    /// With --capacity: tokens per second each decoding request gets (an answer of N tokens
    /// takes N/R s)
    #[arg(long, value_name = "R", requires = "capacity", default_value_t = 50.0)]
    token_rate: f64,
    /// Fail the next chat calls, to rehearse failures (repeatable, in order): a status (503x2 =
    /// twice; 429 with Retry-After: 1; 502 as a proxy's HTML page), hang, drop (the body cut
    /// mid-way) or close (closed before any byte)
    #[arg(long, value_name = "FAULT")]
    fault: Vec<String>,
    /// Keep the port closed (connections refused) this long, as a server loading its model
    /// (10s, 500ms, 2m)
    #[arg(long, value_name = "DURATION")]
    start_after: Option<String>,
    /// Delay every chat answer this long (10s, 500ms)
    #[arg(long, value_name = "DURATION")]
    delay: Option<String>,
}

/// `vlm health`: prints the report, one block per endpoint when `vlm_base_url` lists several;
/// exit 0 when (at least one endpoint) is ready, 3 otherwise.
pub async fn health(global: &GlobalOpts, args: HealthArgs) -> Result<Exit, Failure> {
    let (settings, detected) = global.load_resolved(&[], args.wait).await?;
    let replicas = vlm_factory::build_replicas(&settings, vlm_factory::replica_options(&settings))?;
    let endpoints = settings.base_urls.len();
    let reports = if endpoints == 1 {
        vec![Ok(crate::check_health(&replicas, args.wait).await?)]
    } else {
        if let Some(wait) = args.wait {
            replicas.wait_ready(wait).await?;
        }
        replicas.health_all().await
    };
    let mut ready = 0;
    for (i, (client, report)) in replicas.clients().zip(&reports).enumerate() {
        if endpoints > 1 {
            if i > 0 {
                crate::outln!("");
            }
            crate::outln!("endpoint {} of {endpoints}: {}", i + 1, client.base_url());
        }
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                crate::outln!("error: {}", vlm_core::text::escape_controls(&e.to_string()));
                continue;
            }
        };
        ready += usize::from(report.is_ready());
        print_report(report, detected.as_ref().filter(|_| i == 0));
    }
    if ready > 0 {
        let of = if endpoints > 1 {
            format!(" ({ready} of {endpoints} endpoints ready)")
        } else {
            String::new()
        };
        tracing::info!(
            "🤖 VLM: {}/{}{of}",
            replicas.backend(),
            vlm_core::text::shown_model(replicas.model().unwrap_or("(unknown)"))
        );
        return Ok(Exit::Ok);
    }
    match reports.into_iter().next() {
        Some(Ok(report)) if endpoints == 1 => Err(crate::not_ready(&replicas, &report)),
        _ => Err(Failure {
            exit: Exit::Server,
            message: format!(
                "none of the {endpoints} endpoints is ready (each block above says why)"
            ),
        }),
    }
}

/// A health report: `backend: <name>` first, then how `auto` found it, then the rest.
fn print_report(report: &vlm_core::HealthReport, detected: Option<&vlm_core::Detection>) {
    let text = report.to_string();
    let mut lines = text.trim_end().lines();
    if let Some(first) = lines.next() {
        crate::outln!("{first}");
    }
    if let Some(found) = detected {
        crate::outln!("detected: {found}");
    }
    for line in lines {
        crate::outln!("{line}");
    }
}

/// `vlm backends`: one row per backend.
pub async fn backends(global: &GlobalOpts, args: BackendsArgs) -> Result<Exit, Failure> {
    let chosen = global.load_settings(&[])?;
    let header = format!(
        "{:<9} {:<9} {:<28} {:<34} {:<28}{}",
        "BACKEND",
        "COMPILED",
        "DEFAULT URL",
        "CONFIGURED URL",
        "CONFIGURED MODEL",
        if args.check { " HEALTH" } else { "" }
    );
    crate::outln!("{}", header.trim_end());
    for &backend in VlmBackend::ALL {
        // The same layers, with this backend chosen: its per-backend keys apply.
        let flags = [(
            "vlm_backend",
            Some(backend.as_str().to_owned()),
            "--vlm-backend",
        )];
        let mut scoped = global.clone();
        scoped.vlm_backend = None;
        let is_chosen = backend == chosen.backend && !chosen.is_auto();
        // `--vlm-base-url U` names the chosen backend's server: the other rows keep their own.
        let probe_given = global.vlm_base_url.is_some();
        if probe_given && !is_chosen {
            scoped.vlm_base_url = None;
        }
        let settings = match scoped.load_settings(&flags) {
            Ok(settings) => settings,
            // `openai` with no URL anywhere: nothing to show or check.
            Err(_) if backend.default_base_url().is_none() => {
                let line = format!(
                    "{:<9} {:<9} {:<28} {:<34} {:<28}{}",
                    backend.as_str(),
                    if is_compiled(backend) { "yes" } else { "no" },
                    "(none: configure one)",
                    "-",
                    "-",
                    if args.check { " -" } else { "" }
                );
                crate::outln!("{}", line.trim_end());
                continue;
            }
            Err(failure) => return Err(failure),
        };
        let configured = settings.source("vlm_base_url").is_some();
        let url = if configured {
            settings.base_url.to_string()
        } else {
            "-".to_owned()
        };
        let model = settings.model.clone().unwrap_or_else(|| "-".to_owned());
        let mark = if is_chosen { "*" } else { " " };
        let mut line = format!(
            "{:<9} {:<9} {:<28} {:<34} {:<28}",
            format!("{backend}{mark}"),
            if is_compiled(backend) { "yes" } else { "no" },
            backend
                .default_base_url()
                .unwrap_or("(none: configure one)"),
            url,
            model
        );
        if args.check {
            let status = if !(configured || settings.model.is_some() || backend == chosen.backend)
                || (probe_given && !is_chosen)
            {
                "-".to_owned()
            } else if !is_compiled(backend) {
                "not compiled".to_owned()
            } else {
                match build_client(&settings) {
                    Ok(client) => match client.health().await {
                        Ok(report) => report.state.label().to_owned(),
                        Err(e) => format!("error: {e}"),
                    },
                    Err(e) => format!("error: {e}"),
                }
            };
            line.push(' ');
            line.push_str(&status);
        }
        crate::outln!("{}", line.trim_end());
    }
    if chosen.is_auto() {
        let said = if args.check {
            match vlm_factory::resolve_backend(chosen.clone()).await {
                Ok((_, Some(found))) => format!("detected: {found}"),
                Ok((_, None)) => "nothing detected".to_owned(),
                Err(e) => format!("detection failed: {e}"),
            }
        } else {
            "the backend is detected when a command runs (--check detects it now)".to_owned()
        };
        crate::outln!("(vlm_backend = auto: {said})");
    } else {
        crate::outln!("(* the backend chosen by the current configuration)");
    }
    if let (Some(url), true) = (&global.vlm_base_url, args.check) {
        let whom = if chosen.is_auto() {
            "probed by auto detection".to_owned()
        } else {
            format!("checked with the chosen backend, {}, only", chosen.backend)
        };
        crate::outln!(
            "(--vlm-base-url {}: {whom}; the other rows show their own configured URLs, unchecked)",
            vlm_core::text::escape_controls(url)
        );
    }
    Ok(Exit::Ok)
}

/// `vlm config`: `key = value  # source`, keys redacted.
pub fn config(global: &GlobalOpts) -> Result<Exit, Failure> {
    let settings = global.load_settings(&[])?;
    match settings.pyproject() {
        Some(path) => crate::outln!("# settings file: {}", path.display()),
        None => crate::outln!(
            "# settings file: none found (no pyproject.toml with a [tool.imageworks] table in {} or its parents)",
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| ".".to_owned())
        ),
    }
    crate::outln!(
        "# tool: {} (reads [tool.imageworks.vlm], then [tool.imageworks.{}])",
        settings.tool,
        settings.tool
    );
    for (key, value, source) in settings.entries() {
        let bare = value.parse::<f64>().is_ok()
            || matches!(value.as_str(), "true" | "false" | "***")
            || value.starts_with('(');
        let shown = if bare { value } else { format!("{value:?}") };
        crate::outln!("{key} = {shown}  # {source}");
    }
    for warning in settings.warnings() {
        crate::outln!("# warning: {warning}");
    }
    Ok(Exit::Ok)
}

/// `vlm emulate` takes its own options: a global one it would ignore is refused, naming what
/// to use instead (only -v and -q apply).
fn refuse_ignored(global: &GlobalOpts) -> Result<(), Failure> {
    let given = [
        (global.vlm_backend.is_some(), "--vlm-backend", "--backend"),
        (global.vlm_model.is_some(), "--vlm-model", "--model"),
        (global.vlm_base_url.is_some(), "--vlm-base-url", "--port"),
        (global.vlm_timeout.is_some(), "--vlm-timeout", "--delay"),
        (
            global.vlm_connect_timeout.is_some(),
            "--vlm-connect-timeout",
            "--start-after",
        ),
        (
            global.vlm_health_timeout.is_some(),
            "--vlm-health-timeout",
            "--start-after",
        ),
        (
            global.vlm_max_retries.is_some(),
            "--vlm-max-retries",
            "--fault",
        ),
        (global.config.is_some(), "--config", "its own flags"),
        (global.tool != "color_narrator", "--tool", "its own flags"),
    ];
    let ignored: Vec<String> = given
        .iter()
        .filter(|(on, _, _)| *on)
        .map(|(_, flag, instead)| format!("{flag} (use {instead})"))
        .collect();
    if ignored.is_empty() {
        return Ok(());
    }
    Err(Failure::usage(format!(
        "vlm emulate does not read the client's settings, so it would ignore {}; see vlm emulate --help",
        ignored.join(", ")
    )))
}

/// `vlm emulate`: serves until killed.
pub async fn emulate(global: &GlobalOpts, args: EmulateArgs) -> Result<Exit, Failure> {
    refuse_ignored(global)?;
    crate::emulate::serve(crate::emulate::Serve {
        faults: args.fault,
        start_after: args.start_after,
        delay: args.delay,
        backend: args.backend,
        port: args.port,
        model: args.model,
        api_key: args.api_key,
        fast: args.fast,
        flavor: args.flavor,
        triton_model: args.triton_model,
        capacity: args.capacity.map(|k| (k as usize, args.token_rate)),
    })
    .await
}
