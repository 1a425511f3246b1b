//! The `vlm-emulator` command (also `vlm emulate`): one emulator served until killed.

use std::io::Write as _;

use vlm_core::VlmBackend;

use crate::server::{Emulator, EmulatorConfig, OpenAiFlavor, default_model};

/// The emulator command's arguments.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EmulatorArgs {
    /// `--backend vllm|lmdeploy|triton`
    pub backend: VlmBackend,
    /// `--port P` (0: any free port)
    pub port: u16,
    /// `--model M`
    pub model: Option<String>,
    /// `--api-key K`
    pub api_key: Option<String>,
    /// `--fast`: fixed answers, no decoding or recording (for benchmarks)
    pub fast: bool,
    /// `--flavor sglang|llama-cpp|trtllm-serve`: which server `--backend openai` is
    pub flavor: OpenAiFlavor,
    /// `--triton-model multimodal|vllm|text`: which model `--backend triton` serves
    pub triton_model: crate::TritonModel,
    /// `--capacity K [--token-rate R]`: decode K requests together at R tokens/s each (default
    /// 50); the rest queue, and a queue of 4 K is a 503
    pub capacity: Option<crate::Capacity>,
}

impl EmulatorArgs {
    /// Arguments for `backend` with every other option at its default.
    pub fn new(backend: VlmBackend) -> Self {
        EmulatorArgs {
            backend,
            port: 0,
            model: None,
            api_key: None,
            fast: false,
            flavor: OpenAiFlavor::default(),
            triton_model: crate::TritonModel::default(),
            capacity: None,
        }
    }
}

/// The usage text of `vlm-emulator`.
pub const USAGE: &str =
    "usage: vlm-emulator --backend vllm|lmdeploy|triton|ollama|openai [--port P] [--model M] [--api-key K]
                    [--flavor sglang|llama-cpp|trtllm-serve] [--triton-model multimodal|vllm|text]
                    [--fast] [--capacity K [--token-rate R]]

Serves an emulator of that server on 127.0.0.1 until killed (SIGINT/SIGTERM exit 0).
Prints one line on stdout: the value to give --vlm-base-url. Logs go to stderr.
Default models: vllm, lmdeploy and openai serve \"Qwen/Qwen2-VL-2B-Instruct\", triton serves
\"ensemble\", ollama serves \"qwen2.5vl:7b\". --flavor picks which OpenAI-compatible server
--backend openai emulates (default sglang); --triton-model which model --backend triton serves: a
TensorRT-LLM multimodal ensemble (default), a model on Triton's vLLM backend, or a text-only one.
--fast answers every chat request with one fixed completion, without parsing, decoding or
recording it (for benchmarks: the server's cost stays out of the client's numbers).
--capacity K makes it a loaded GPU: up to K chat requests decode together, each answer taking
(its tokens) / R seconds (--token-rate, default 50 tokens/s per request); past K, requests queue
(vllm:num_requests_waiting on GET /metrics) and latency grows; 4 K waiting is a 503.";

/// Parses `--backend B [--port P] [--model M] [--api-key K]` (also `--flag=value`).
pub fn parse_emulator_args(args: &[String]) -> Result<EmulatorArgs, String> {
    let mut backend = None;
    let mut port = 0u16;
    let mut model = None;
    let mut api_key = None;
    let mut fast = false;
    let mut flavor = OpenAiFlavor::default();
    let mut triton_model = crate::TritonModel::default();
    let (mut slots, mut token_rate) = (None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        if matches!(flag, "-h" | "--help") {
            return Err(USAGE.to_owned());
        }
        if flag == "--fast" {
            fast = true;
            continue;
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))
        };
        match flag {
            "--backend" => {
                backend = Some(value()?.parse::<VlmBackend>().map_err(|e| e.to_string())?)
            }
            "--port" => {
                let v = value()?;
                port = v
                    .parse()
                    .map_err(|_| format!("invalid --port {v:?}: expected 0-65535"))?;
            }
            "--model" => model = Some(value()?),
            "--api-key" => api_key = Some(value()?),
            "--flavor" => flavor = value()?.parse()?,
            "--triton-model" => triton_model = value()?.parse()?,
            "--capacity" => {
                let v = value()?;
                slots = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|k| (1..=100_000).contains(k))
                        .ok_or_else(|| format!("invalid --capacity {v:?}: expected 1 to 100000"))?,
                );
            }
            "--token-rate" => {
                let v = value()?;
                token_rate = Some(
                    v.parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or_else(|| {
                            format!("invalid --token-rate {v:?}: expected tokens/s > 0")
                        })?,
                );
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    let backend = backend.ok_or_else(|| format!("--backend is required\n\n{USAGE}"))?;
    let capacity = match (slots, token_rate) {
        (Some(k), rate) => Some(crate::Capacity::new(k, rate.unwrap_or(50.0))),
        (None, Some(_)) => return Err(format!("--token-rate needs --capacity K\n\n{USAGE}")),
        (None, None) => None,
    };
    Ok(EmulatorArgs {
        capacity,
        backend,
        port,
        model,
        api_key,
        fast,
        flavor,
        triton_model,
    })
}

/// Starts the emulator, prints its base URL on stdout, and serves until SIGINT or SIGTERM.
pub async fn run_emulator(args: EmulatorArgs) -> Result<(), String> {
    let mut config = EmulatorConfig::new(args.backend).with_port(args.port);
    config = config.with_model(
        args.model
            .unwrap_or_else(|| default_model(args.backend).to_owned()),
    );
    if let Some(key) = args.api_key {
        config = config.with_api_key(key);
    }
    config = config
        .with_fast(args.fast)
        .with_flavor(args.flavor)
        .with_triton_model(args.triton_model);
    if let Some(capacity) = args.capacity {
        config = config.with_capacity(capacity);
    }
    let emulator = Emulator::start(config).await.map_err(|e| e.to_string())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", emulator.base_url()).map_err(|e| e.to_string())?;
    stdout.flush().map_err(|e| e.to_string())?;
    drop(stdout);
    eprintln!(
        "vlm-emulator: emulating {} serving {:?} at {} (answers are computed from the image, not by a model); Ctrl-C stops it",
        emulator.backend(),
        emulator.model(),
        emulator.base_url()
    );
    wait_for_signal().await;
    match emulator.capacity_stats() {
        Some(stats) => eprintln!(
            "vlm-emulator: stopped; capacity model: {} served, {} refused with 503, queue peaked at {}",
            stats.served, stats.rejected, stats.peak_waiting
        ),
        None => eprintln!("vlm-emulator: stopped"),
    }
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn parses_every_flag_and_rejects_the_rest() {
        let parsed = parse_emulator_args(&args(&[
            "--backend",
            "lmdeploy",
            "--port=23333",
            "--model",
            "m",
            "--api-key",
            "k",
        ]))
        .unwrap();
        assert_eq!(parsed.backend, VlmBackend::LmDeploy);
        assert_eq!(
            (
                parsed.port,
                parsed.model.as_deref(),
                parsed.api_key.as_deref()
            ),
            (23333, Some("m"), Some("k"))
        );
        assert!(
            parse_emulator_args(&args(&[]))
                .unwrap_err()
                .contains("--backend is required")
        );
        assert!(
            parse_emulator_args(&args(&["--backend", "lmdepoy"]))
                .unwrap_err()
                .contains("did you mean \"lmdeploy\"")
        );
        assert!(
            parse_emulator_args(&args(&["--backend", "vllm", "--port", "x"]))
                .unwrap_err()
                .contains("invalid --port")
        );
        let loaded = parse_emulator_args(&args(&[
            "--backend",
            "vllm",
            "--capacity",
            "8",
            "--token-rate=200",
        ]))
        .unwrap();
        assert_eq!(loaded.capacity, Some(crate::Capacity::new(8, 200.0)));
        for bad in [
            &["--backend", "vllm", "--capacity", "0"][..],
            &["--backend", "vllm", "--capacity", "4", "--token-rate", "-1"],
            &["--backend", "vllm", "--token-rate", "5"],
        ] {
            assert!(parse_emulator_args(&args(bad)).is_err(), "{bad:?}");
        }
        assert!(
            parse_emulator_args(&args(&["--backend", "vllm", "--bogus"]))
                .unwrap_err()
                .contains("unknown argument")
        );
    }
}
