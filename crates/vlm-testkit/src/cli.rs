//! The `vlm-emulator` command (also `vlm emulate`): one emulator served until killed.

use std::io::Write as _;

use vlm_core::VlmBackend;

use crate::server::{Emulator, EmulatorConfig, OpenAiFlavor, default_model};

/// The emulator command's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
    }
}

/// The usage text of `vlm-emulator`.
pub const USAGE: &str =
    "usage: vlm-emulator --backend vllm|lmdeploy|triton|ollama|openai [--port P] [--model M] [--api-key K]
                    [--flavor sglang|llama-cpp|trtllm-serve] [--triton-model multimodal|vllm|text]
                    [--fast]

Serves an emulator of that server on 127.0.0.1 until killed (SIGINT/SIGTERM exit 0).
Prints one line on stdout: the value to give --vlm-base-url. Logs go to stderr.
Default models: vllm, lmdeploy and openai serve \"Qwen/Qwen2-VL-2B-Instruct\", triton serves
\"ensemble\", ollama serves \"qwen2.5vl:7b\". --flavor picks which OpenAI-compatible server
--backend openai emulates (default sglang); --triton-model which model --backend triton serves: a
TensorRT-LLM multimodal ensemble (default), a model on Triton's vLLM backend, or a text-only one.
--fast answers every chat request with one fixed completion, without parsing, decoding or
recording it (for benchmarks: the server's cost stays out of the client's numbers).";

/// Parses `--backend B [--port P] [--model M] [--api-key K]` (also `--flag=value`).
pub fn parse_emulator_args(args: &[String]) -> Result<EmulatorArgs, String> {
    let mut backend = None;
    let mut port = 0u16;
    let mut model = None;
    let mut api_key = None;
    let mut fast = false;
    let mut flavor = OpenAiFlavor::default();
    let mut triton_model = crate::TritonModel::default();
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
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    let backend = backend.ok_or_else(|| format!("--backend is required\n\n{USAGE}"))?;
    Ok(EmulatorArgs {
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
    eprintln!("vlm-emulator: stopped");
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
        assert!(
            parse_emulator_args(&args(&["--backend", "vllm", "--bogus"]))
                .unwrap_err()
                .contains("unknown argument")
        );
    }
}
