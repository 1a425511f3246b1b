//! # vlm-vllm
//!
//! The [vLLM](https://github.com/vllm-project/vllm) client of ImageWorks VLM.
//!
//! - Health: `GET /health` on the server root (200 with an empty body; 503 only when the engine
//!   died), `GET /version`, then `GET /v1/models` must list the configured model (a typo in the
//!   model name is the commonest mistake, and vLLM only answers 404 at inference). With no model
//!   configured, the only served model is adopted.
//! - Inference: OpenAI chat completions with images as `data:` URLs. vLLM makes `model`
//!   optional, so it is omitted while unknown and the answering model is adopted.
//!
//! ```no_run
//! use vlm_core::{ClientConfig, ImageInput, VlmBackend, VlmClient, VlmRequest};
//! use vlm_vllm::VllmClient;
//!
//! # async fn run() -> Result<(), vlm_core::VlmError> {
//! let config = ClientConfig::new(VlmBackend::Vllm, "http://localhost:8000/v1")?
//!     .with_model("Qwen/Qwen2-VL-2B-Instruct");
//! let client = VllmClient::new(config)?; // clones share one connection pool
//! println!("{}", client.health().await?);
//! let request = VlmRequest::builder("Describe this image.")
//!     .image(ImageInput::path("photo.jpg"))
//!     .build()?;
//! println!("{}", client.infer_single(&request).await?.text);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use vlm_core::openai::{OpenAiCompatible, OpenAiServer};
use vlm_core::support::{Transport, err_note, json_string_field, state_for_error};
use vlm_core::{HealthReport, HealthState, VlmBackend, async_trait};

/// vLLM's OpenAI-compatible server (`vllm serve <model>`): its health sequence and quirks.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct Vllm;

/// A client for vLLM: [`OpenAiCompatible`] with vLLM's health sequence. Cheap to clone.
///
/// ```
/// use vlm_core::{ClientConfig, VlmBackend, VlmClient};
/// let config = ClientConfig::new(VlmBackend::Vllm, "localhost:8000").unwrap();
/// let client = vlm_vllm::VllmClient::new(config).unwrap();
/// assert_eq!(client.base_url().as_str(), "http://localhost:8000/v1/");
/// assert_eq!(client.model(), None);
/// ```
pub type VllmClient = OpenAiCompatible<Vllm>;

#[async_trait]
impl OpenAiServer for Vllm {
    const BACKEND: VlmBackend = VlmBackend::Vllm;
    // vLLM's `model` is optional: while unknown, it is left out and the server uses its model.
    const REQUIRES_MODEL: bool = false;

    fn queue_metric(&self) -> Option<&'static str> {
        Some("vllm:num_requests_waiting")
    }

    // vLLM >= 0.12 reads structured-output constraints from `response_format` (or
    // `structured_outputs`) and drops the old `guided_*` fields without a word.
    fn ignored_fields(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (
                "guided_json",
                "`response_format` with a json_schema (VlmRequestBuilder::json_schema)",
            ),
            ("guided_regex", "`structured_outputs` {\"regex\": ...}"),
            ("guided_choice", "`structured_outputs` {\"choice\": [...]}"),
            ("guided_grammar", "`structured_outputs` {\"grammar\": ...}"),
        ]
    }

    async fn liveness(
        &self,
        transport: &Transport,
        report: &mut HealthReport,
    ) -> Option<HealthState> {
        match transport.probe("health", &mut report.probes).await {
            Err(err) => return Some(state_for_error(&err, "GET /health")),
            Ok(resp) if resp.is_success() => {}
            // vLLM answers 503 on /health only when the engine has died; it does not recover
            // by itself.
            Ok(resp) if resp.status == 503 => {
                return Some(HealthState::Unhealthy {
                    reason: "GET /health answered 503: the vLLM engine is dead; restart the \
                             server and check its log"
                        .to_owned(),
                });
            }
            Ok(resp) => {
                let err = transport.http_error(&resp);
                return Some(HealthState::Unhealthy {
                    reason: format!(
                        "GET /health answered {}: {}; is {} a vLLM server?",
                        resp.status,
                        err_note(&err),
                        transport.root_endpoint("")
                    ),
                });
            }
        }
        if let Ok(resp) = transport.probe("version", &mut report.probes).await
            && resp.is_success()
        {
            report.server_version = json_string_field(&resp.body, "version");
        }
        None
    }
}

/// The README's example, compiled as a doctest so that it cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
