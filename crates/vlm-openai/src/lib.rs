//! # vlm-openai
//!
//! The generic OpenAI-compatible client of ImageWorks VLM, for any server that speaks OpenAI
//! chat completions: [SGLang](https://github.com/sgl-project/sglang), llama.cpp's
//! `llama-server`, TensorRT-LLM's `trtllm-serve`, LM Studio, a gateway in front of any of them.
//!
//! - Nothing is assumed beyond the OpenAI API. Health is `GET <prefix>/health` where it answers
//!   (200 is live; 503 is starting: llama.cpp's `{"error":{"message":"Loading model",...}}`,
//!   SGLang's warm-up; a 404 or 405 means the server has no such route, which is fine), then
//!   `GET <base URL>/models` must list the configured model (with none configured, the only one
//!   served is adopted). For `https://gw/llama/v1` those are `https://gw/llama/health` and
//!   `https://gw/llama/v1/models`.
//! - `model` is always sent (the OpenAI API requires it; servers that ignore it do no harm).
//! - There is no default URL: a missing one is a configuration error naming
//!   `vlm_openai_base_url` and `--vlm-base-url`.
//!
//! ```no_run
//! use vlm_core::{ClientConfig, VlmBackend, VlmClient};
//! use vlm_openai::OpenAiClient;
//!
//! # async fn run() -> Result<(), vlm_core::VlmError> {
//! let config = ClientConfig::new(VlmBackend::OpenAi, "http://gpu-box:30000/v1")?;
//! let client = OpenAiClient::new(config)?;
//! println!("{}", client.health().await?);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use vlm_core::openai::{OpenAiCompatible, OpenAiServer};
use vlm_core::support::{Transport, err_note, state_for_error};
use vlm_core::{HealthReport, HealthState, VlmBackend, async_trait};

/// Any OpenAI-compatible server: no quirks assumed.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct OpenAi;

/// A client for any OpenAI-compatible server: [`OpenAiCompatible`] with the least server
/// knowledge. Cheap to clone.
///
/// ```
/// use vlm_core::{ClientConfig, VlmBackend, VlmClient};
/// let config = ClientConfig::new(VlmBackend::OpenAi, "https://gw/llama/v1").unwrap();
/// let client = vlm_openai::OpenAiClient::new(config).unwrap();
/// assert_eq!(client.base_url().as_str(), "https://gw/llama/v1/");
/// ```
pub type OpenAiClient = OpenAiCompatible<OpenAi>;

#[async_trait]
impl OpenAiServer for OpenAi {
    const BACKEND: VlmBackend = VlmBackend::OpenAi;
    const REQUIRES_MODEL: bool = true;

    async fn liveness(
        &self,
        transport: &Transport,
        report: &mut HealthReport,
    ) -> Option<HealthState> {
        let route = format!("GET {}", transport.root_endpoint("health").path());
        match transport.probe("health", &mut report.probes).await {
            Err(err) => Some(state_for_error(&err, &route)),
            Ok(resp) if resp.is_success() => None,
            // llama.cpp while it loads the model, SGLang while it warms up.
            Ok(resp) if resp.status == 503 => {
                let said = err_note(&transport.http_error(&resp));
                Some(HealthState::Starting {
                    reason: format!(
                        "{route} answered 503 ({said}); the server is not ready yet (a model \
                         still loading); if it stays so, check the server's log"
                    ),
                })
            }
            // No health route here (or not without the key, which probes never send): the model
            // list, asked with the key, is the whole check.
            Ok(resp) if (400..500).contains(&resp.status) => None,
            Ok(resp) => Some(HealthState::Unhealthy {
                reason: format!(
                    "{route} answered {}: {}; check the server's log",
                    resp.status,
                    err_note(&transport.http_error(&resp))
                ),
            }),
        }
    }
}

/// The README's example, compiled as a doctest so that it cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
