//! # vlm-lmdeploy
//!
//! The [LMDeploy](https://github.com/InternLM/lmdeploy) `api_server` client of ImageWorks VLM.
//!
//! - Health: `GET /health` on the server root. Since 0.14 it answers `{"status","message"}`:
//!   200 for `healthy` and also for `sleeping` (weights offloaded: not ready), 503 while
//!   `initializing` or `unhealthy`; 0.5–0.13 answer an empty 200 and older versions 404. Then
//!   `GET /v1/models` must list the configured model (with none configured, the only served
//!   model is adopted).
//! - Inference: OpenAI chat completions. LMDeploy requires `model` (an unknown one is a 404), so
//!   it is always sent, discovered first if need be. LMDeploy <= 0.15 reports engine errors as
//!   HTTP 200 with `finish_reason: "error"`: that is an error, never a success.
//!
//! ```no_run
//! use vlm_core::{ClientConfig, ImageInput, VlmBackend, VlmClient, VlmRequest};
//! use vlm_lmdeploy::LmDeployClient;
//!
//! # async fn run() -> Result<(), vlm_core::VlmError> {
//! let client = LmDeployClient::new(ClientConfig::default_for(VlmBackend::LmDeploy)?)?;
//! let report = client.health().await?; // adopts the served model
//! println!("{report}");
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
use vlm_core::text::{MAX_MESSAGE_BYTES, ServerText};
use vlm_core::{HealthReport, HealthState, VlmBackend, async_trait};

/// LMDeploy's OpenAI-compatible `api_server`: its health sequence and quirks.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct LmDeploy;

/// A client for LMDeploy: [`OpenAiCompatible`] with LMDeploy's health sequence; `model` is
/// always sent (discovered first if need be). Cheap to clone.
///
/// ```
/// use vlm_core::{ClientConfig, VlmBackend, VlmClient};
/// let config = ClientConfig::new(VlmBackend::LmDeploy, "http://gpu:23333/").unwrap();
/// let client = vlm_lmdeploy::LmDeployClient::new(config).unwrap();
/// assert_eq!(client.base_url().as_str(), "http://gpu:23333/v1/");
/// ```
pub type LmDeployClient = OpenAiCompatible<LmDeploy>;

/// What LMDeploy's `/health` body says (its text cleaned: key redacted, escaped, capped).
fn liveness_from_body(status: u16, body: &[u8], clean: &ServerText) -> Option<HealthState> {
    let state = clean.clean(&json_string_field(body, "status")?, 64);
    let message = clean.clean(
        &json_string_field(body, "message").unwrap_or_default(),
        MAX_MESSAGE_BYTES,
    );
    let said = if message.is_empty() {
        format!("status {state:?}")
    } else {
        format!("status {state:?}: {message}")
    };
    Some(match (status, state.as_str()) {
        (200, "healthy") => HealthState::Ready,
        (_, "sleeping") => HealthState::Unhealthy {
            reason: format!(
                "GET /health says {said}: the engine is asleep with its weights offloaded; wake \
                 it (POST /wakeup on the server) before sending requests"
            ),
        },
        (_, "initializing" | "initialising" | "starting") => HealthState::Starting {
            reason: format!("GET /health says {said}; the engine is still loading"),
        },
        _ => HealthState::Unhealthy {
            reason: format!("GET /health answered {status} with {said}; check the server's log"),
        },
    })
}

#[async_trait]
impl OpenAiServer for LmDeploy {
    const BACKEND: VlmBackend = VlmBackend::LmDeploy;
    // LMDeploy requires `model`; an unknown one is a 404.
    const REQUIRES_MODEL: bool = true;

    // Published by default since LMDeploy 0.11 (`--disable-metrics` turns it off; 0.9.2 to
    // 0.10 needed `--enable-metrics`); without it `/metrics` is a 404. Refreshed every 10 s.
    fn queue_metric(&self) -> Option<&'static str> {
        Some("lmdeploy:num_requests_waiting")
    }

    async fn liveness(
        &self,
        transport: &Transport,
        report: &mut HealthReport,
    ) -> Option<HealthState> {
        let resp = match transport.probe("health", &mut report.probes).await {
            Ok(resp) => resp,
            Err(err) => return Some(state_for_error(&err, "GET /health")),
        };
        let liveness = liveness_from_body(resp.status, &resp.body, transport.server_text());
        match (resp.status, liveness) {
            // >= 0.14: the body says what the engine is doing.
            (_, Some(HealthState::Ready)) => None,
            (_, Some(state)) => Some(state),
            // 0.5-0.13: an empty 200; < 0.5: no /health route at all.
            (200..=299 | 404, None) => None,
            (503, None) => Some(HealthState::Starting {
                reason: "GET /health answered 503; the engine is still loading".to_owned(),
            }),
            (status, None) => Some(HealthState::Unhealthy {
                reason: format!(
                    "GET /health answered {status}: {}; is {} an LMDeploy api_server?",
                    err_note(&transport.http_error(&resp)),
                    transport.root_endpoint("")
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_bodies_map_to_states() {
        let cases: [(u16, &str, Option<&str>); 6] = [
            (200, r#"{"status":"healthy","message":""}"#, Some("ready")),
            (
                200,
                r#"{"status":"sleeping","message":"level 1"}"#,
                Some("unhealthy"),
            ),
            (
                503,
                r#"{"status":"initializing","message":""}"#,
                Some("starting"),
            ),
            (
                503,
                r#"{"status":"unhealthy","message":"Engine health monitor is not initialized."}"#,
                Some("unhealthy"),
            ),
            (200, "", None),
            (404, r#"{"detail":"Not Found"}"#, None),
        ];
        for (status, body, want) in cases {
            let got = liveness_from_body(status, body.as_bytes(), &ServerText::default())
                .map(|s| s.label());
            assert_eq!(got, want, "{status} {body}");
        }
    }
}

/// The README's example, compiled as a doctest so that it cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
