//! The backend enum: which server hosts the model.

use std::fmt;
use std::str::FromStr;

/// The servers ImageWorks VLM can talk to.
///
/// This enum always knows every backend, whichever cargo features are enabled: only the clients
/// are feature-gated (in `vlm-factory`), so a configuration naming a backend that is not compiled
/// in gets a precise error instead of "unknown backend".
///
/// ```
/// use vlm_core::VlmBackend;
///
/// assert_eq!("vllm".parse::<VlmBackend>().unwrap(), VlmBackend::Vllm);
/// assert_eq!("LMDeploy".parse::<VlmBackend>().unwrap(), VlmBackend::LmDeploy);
/// let err = "lmdepoy".parse::<VlmBackend>().unwrap_err();
/// assert!(err.to_string().contains("did you mean \"lmdeploy\""));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[non_exhaustive]
pub enum VlmBackend {
    /// vLLM's OpenAI-compatible server (`vllm serve`).
    #[default]
    Vllm,
    /// LMDeploy's `api_server` (OpenAI-compatible).
    LmDeploy,
    /// Triton Inference Server (KServe v2 protocol), e.g. with TensorRT-LLM.
    Triton,
    /// Ollama (`ollama serve`), through its OpenAI-compatible API.
    Ollama,
    /// Any other server that speaks OpenAI chat completions: SGLang, llama.cpp's
    /// `llama-server`, `trtllm-serve`, LM Studio, a gateway. It has no default URL.
    OpenAi,
}

impl VlmBackend {
    /// Every backend, in the order they are documented. A slice, so that adding a backend does
    /// not change a public type.
    pub const ALL: &'static [VlmBackend] = &[
        VlmBackend::Vllm,
        VlmBackend::LmDeploy,
        VlmBackend::Triton,
        VlmBackend::Ollama,
        VlmBackend::OpenAi,
    ];

    /// The name used in configuration (`vllm`, `lmdeploy`, `triton`).
    pub const fn as_str(self) -> &'static str {
        match self {
            VlmBackend::Vllm => "vllm",
            VlmBackend::LmDeploy => "lmdeploy",
            VlmBackend::Triton => "triton",
            VlmBackend::Ollama => "ollama",
            VlmBackend::OpenAi => "openai",
        }
    }

    /// The cargo feature of `vlm-factory` (and `vlm-cli`) that compiles this backend's client in.
    pub const fn cargo_feature(self) -> &'static str {
        self.as_str()
    }

    /// The URL the server listens on when started with its defaults; `None` for
    /// [`OpenAi`](Self::OpenAi), which has no standard port (its URL must be configured).
    pub const fn default_base_url(self) -> Option<&'static str> {
        match self {
            VlmBackend::Vllm => Some("http://localhost:8000/v1"),
            VlmBackend::LmDeploy => Some("http://localhost:23333/v1"),
            VlmBackend::Triton => Some("http://localhost:8000"),
            VlmBackend::Ollama => Some("http://localhost:11434/v1"),
            VlmBackend::OpenAi => None,
        }
    }

    /// Whether the backend speaks OpenAI chat completions under a `/v1` base URL.
    pub const fn is_openai_compatible(self) -> bool {
        !matches!(self, VlmBackend::Triton)
    }

    /// The command that starts this server on `port`, for error messages and docs.
    pub fn start_command(self, port: u16) -> String {
        match self {
            VlmBackend::Vllm => format!("vllm serve <model> --port {port}"),
            VlmBackend::LmDeploy => {
                format!("lmdeploy serve api_server <model> --server-port {port}")
            }
            VlmBackend::Triton => {
                format!("tritonserver --model-repository <dir> --http-port {port}")
            }
            VlmBackend::Ollama => {
                format!("OLLAMA_HOST=0.0.0.0:{port} ollama serve` then `ollama pull <model>")
            }
            VlmBackend::OpenAi => format!(
                "python -m sglang.launch_server --model-path <model> --port {port}`, \
                 `llama-server -m <model.gguf> --mmproj <mmproj.gguf> --port {port}` or \
                 `trtllm-serve <model> --port {port}"
            ),
        }
    }

    /// The valid names, comma separated, for messages.
    pub fn valid_names() -> String {
        Self::ALL
            .iter()
            .map(|b| b.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The closest valid name to `input`, if it is close enough to be a likely typo.
    pub fn closest(input: &str) -> Option<VlmBackend> {
        let input = input.trim().to_ascii_lowercase();
        Self::ALL
            .iter()
            .map(|&b| (edit_distance(&input, b.as_str()), b))
            .filter(|(d, b)| *d <= 1.max(b.as_str().len() / 3))
            .min_by_key(|(d, _)| *d)
            .map(|(_, b)| b)
    }
}

impl fmt::Display for VlmBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a backend (nor an alias of one): what `"x".parse::<VlmBackend>()` returns.
/// It converts into [`VlmError`](crate::VlmError) (a configuration error).
///
/// ```
/// use vlm_core::{ParseBackendError, VlmBackend};
/// let err: ParseBackendError = "lmdepoy".parse::<VlmBackend>().unwrap_err();
/// assert_eq!(err.suggestion(), Some(VlmBackend::LmDeploy));
/// assert_eq!(err.value(), "lmdepoy");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseBackendError {
    value: String,
}

impl ParseBackendError {
    /// The name that was given.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The closest backend name, when the value looks like a typo of it.
    pub fn suggestion(&self) -> Option<VlmBackend> {
        VlmBackend::closest(&self.value)
    }

    /// The message, saying where the value came from (`VLM_BACKEND`, `--vlm-backend`, ...).
    pub fn message(&self, source: Option<&str>) -> String {
        let from = source.map(|s| format!(" (from {s})")).unwrap_or_default();
        let suggestion = self
            .suggestion()
            .map(|b| format!("; did you mean \"{b}\"?"))
            .unwrap_or_else(|| ";".to_owned());
        format!(
            "unknown vlm_backend {:?}{from}{suggestion} valid: {}",
            self.value,
            VlmBackend::valid_names()
        )
    }
}

impl fmt::Display for ParseBackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message(None))
    }
}

impl std::error::Error for ParseBackendError {}

impl FromStr for VlmBackend {
    type Err = ParseBackendError;

    /// Parses a backend name, case-insensitively. Aliases: `vllm`, `lmdeploy`/`lm-deploy`/
    /// `lm_deploy`, `triton`/`tritonserver`/`trtllm`/`tensorrt-llm`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase();
        match norm.as_str() {
            "vllm" => Ok(VlmBackend::Vllm),
            "lmdeploy" | "lm-deploy" | "lm_deploy" => Ok(VlmBackend::LmDeploy),
            "triton" | "tritonserver" | "trtllm" | "tensorrt-llm" | "tensorrt_llm" => {
                Ok(VlmBackend::Triton)
            }
            "ollama" => Ok(VlmBackend::Ollama),
            "openai" | "openai-compatible" | "openai_compatible" => Ok(VlmBackend::OpenAi),
            _ => Err(ParseBackendError {
                value: s.to_owned(),
            }),
        }
    }
}

/// Levenshtein distance between two strings, for "did you mean" suggestions.
///
/// ```
/// assert_eq!(vlm_core::support::edit_distance("lmdepoy", "lmdeploy"), 1);
/// ```
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j + 1] + 1).min(cur[j] + 1).min(prev[j] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_aliases_case_insensitively() {
        let cases = [
            ("vllm", VlmBackend::Vllm),
            ("VLLM", VlmBackend::Vllm),
            (" lmdeploy ", VlmBackend::LmDeploy),
            ("LmDeploy", VlmBackend::LmDeploy),
            ("lm-deploy", VlmBackend::LmDeploy),
            ("triton", VlmBackend::Triton),
            ("TensorRT-LLM", VlmBackend::Triton),
            ("Ollama", VlmBackend::Ollama),
            ("openai", VlmBackend::OpenAi),
            ("openai-compatible", VlmBackend::OpenAi),
        ];
        for (input, want) in cases {
            assert_eq!(
                input.parse::<VlmBackend>().ok(),
                Some(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for &b in VlmBackend::ALL {
            assert_eq!(b.to_string().parse::<VlmBackend>().ok(), Some(b));
        }
    }

    #[test]
    fn unknown_names_suggest_the_closest_and_list_all() {
        let cases = [
            ("lmdepoy", Some("lmdeploy")),
            ("vlm", Some("vllm")),
            ("triten", Some("triton")),
            ("olama", Some("ollama")),
            ("sglang", None),
            ("", None),
        ];
        for (input, suggestion) in cases {
            let msg = input.parse::<VlmBackend>().unwrap_err().to_string();
            assert!(msg.contains(&format!("{input:?}")), "{msg}");
            assert!(
                msg.contains("vllm, lmdeploy, triton, ollama, openai"),
                "{msg}"
            );
            match suggestion {
                Some(s) => assert!(msg.contains(&format!("did you mean \"{s}\"")), "{msg}"),
                None => assert!(!msg.contains("did you mean"), "{msg}"),
            }
        }
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("vllm", "vllm"), 0);
    }
}
