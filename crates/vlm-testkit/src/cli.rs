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
    /// `--flavor sglang|llama-cpp|trtllm-serve|lm-studio`: which server `--backend openai` is
    pub flavor: OpenAiFlavor,
    /// `--triton-model multimodal|vllm|text`: which model `--backend triton` serves
    pub triton_model: crate::TritonModel,
    /// `--capacity K [--token-rate R]`: decode K requests together at R tokens/s each (default
    /// 50); the rest queue, and a queue of 4 K is a 503
    pub capacity: Option<crate::Capacity>,
    /// `--fault F` (repeatable): faults for the next chat calls, in order, each with its count
    pub faults: Vec<(crate::Fault, usize)>,
    /// `--start-after D`: the port stays closed (connections refused) for D, as a server
    /// loading its model
    pub start_after: std::time::Duration,
    /// `--delay D`: every chat answer waits D
    pub delay: std::time::Duration,
}

/// Parses `--fault`: `503`, `503x2` (a status, optionally times N: 429 comes with
/// `Retry-After: 1`, 502 as a proxy's HTML page, others in the server's JSON shape), or `hang`,
/// `drop` (the body cut mid-way), `close` (closed before any byte), each optionally `xN`.
pub fn parse_fault(value: &str) -> Result<(crate::Fault, usize), String> {
    use crate::Fault;
    let value = value.trim().to_ascii_lowercase();
    let (what, times) = match value.rsplit_once('x') {
        Some((what, n)) if !what.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
            (what, n.parse::<usize>().map_err(|e| e.to_string())?)
        }
        _ => (value.as_str(), 1),
    };
    let fault = match what {
        "hang" => Fault::Hang,
        "drop" => Fault::DropMidBody,
        "close" => Fault::CloseWithoutResponse,
        "429" => Fault::rate_limited(1),
        "502" => Fault::html_bad_gateway(),
        "503" => Fault::unavailable(),
        status => match status.parse::<u16>() {
            Ok(code @ 400..=599) => Fault::Status {
                status: code,
                content_type: "application/json".into(),
                body: format!(
                    r#"{{"error":{{"message":"emulated fault {code}","type":"EmulatedFault","param":null,"code":{code}}}}}"#
                ),
                headers: Vec::new(),
            },
            _ => {
                return Err(format!(
                    "invalid --fault {value:?}: expected a status 400-599 or hang, drop, close, \
                     optionally times N (503x2)"
                ));
            }
        },
    };
    if times == 0 {
        return Err(format!(
            "invalid --fault {value:?}: times 0 injects nothing"
        ));
    }
    Ok((fault, times))
}

/// Parses a duration: `10s`, `500ms`, `2m`, or a number of seconds.
pub fn parse_duration(value: &str) -> Result<std::time::Duration, String> {
    let v = value.trim();
    let (number, unit) = match v.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => v.split_at(i),
        None => (v, "s"),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {value:?}: expected e.g. 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => {
            return Err(format!(
                "invalid duration {value:?}: the unit is ms, s or m"
            ));
        }
    };
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= std::time::Duration::from_secs(86_400))
        .ok_or_else(|| format!("invalid duration {value:?}: expected 0 to 24 hours"))
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
            faults: Vec::new(),
            start_after: std::time::Duration::ZERO,
            delay: std::time::Duration::ZERO,
        }
    }
}

/// The usage text of `vlm-emulator`.
pub const USAGE: &str =
    "usage: vlm-emulator --backend vllm|lmdeploy|triton|ollama|openai [--port P] [--model M] [--api-key K]
                    [--flavor sglang|llama-cpp|trtllm-serve|lm-studio] [--triton-model multimodal|vllm|text]
                    [--fast] [--capacity K [--token-rate R]]
                    [--fault 503x2|429|502|hang|drop|close ...] [--start-after 10s] [--delay 2s]

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
(published on GET /metrics as vLLM does, and as SGLang does with --enable-metrics for the sglang
flavour) and latency grows; 4 K waiting is a 503.
To rehearse failures: --fault (repeatable, in order) makes the next chat calls fail: a status
(503x2 = twice; 429 with Retry-After: 1; 502 as a proxy's HTML page), hang, drop (the body cut
mid-way) or close (closed before any byte); --start-after keeps the port closed for a while, as a
server loading its model; --delay slows every chat answer.";

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
    let mut faults = Vec::new();
    let (mut start_after, mut delay) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
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
            "--fault" => faults.push(parse_fault(&value()?)?),
            "--start-after" => start_after = parse_duration(&value()?)?,
            "--delay" => delay = parse_duration(&value()?)?,
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
        faults,
        start_after,
        delay,
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
    let emulator = if args.start_after.is_zero() {
        Emulator::start(config).await
    } else {
        Emulator::start_after(config, args.start_after).await
    }
    .map_err(|e| e.to_string())?;
    for (fault, times) in args.faults {
        emulator.fail_next(times, fault);
    }
    emulator.set_delay(args.delay);
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
        let rehearsal = parse_emulator_args(&args(&[
            "--backend",
            "vllm",
            "--fault",
            "503x2",
            "--fault=hang",
            "--start-after",
            "1.5s",
            "--delay=250ms",
        ]))
        .unwrap();
        assert_eq!(
            rehearsal.faults,
            [(crate::Fault::unavailable(), 2), (crate::Fault::Hang, 1)]
        );
        assert_eq!(
            rehearsal.start_after,
            std::time::Duration::from_millis(1500)
        );
        assert_eq!(rehearsal.delay, std::time::Duration::from_millis(250));
        for bad in ["200", "503x0", "teapot", "x2"] {
            assert!(parse_fault(bad).is_err(), "{bad}");
        }
        for bad in ["10h", "-1s", "soon", "2d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_duration("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        assert!(
            parse_emulator_args(&args(&["--backend", "vllm", "--bogus"]))
                .unwrap_err()
                .contains("unknown argument")
        );
    }
}
