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

use vlm_core::openai::{OpenAiChat, err_note, json_string_field, state_for_error};
use vlm_core::text::{MAX_MESSAGE_BYTES, ServerText};
use vlm_core::transport::Transport;
use vlm_core::{
    ClientConfig, HealthReport, HealthState, ModelSlot, Url, VlmBackend, VlmClient, VlmError,
    VlmRequest, VlmResponse, VlmStream, async_trait,
};

/// A client for LMDeploy's OpenAI-compatible `api_server`.
#[derive(Debug)]
pub struct LmDeployClient {
    chat: OpenAiChat,
    model: ModelSlot,
}

impl LmDeployClient {
    /// Builds the client (and its connection pool). Nothing is sent until the first call.
    ///
    /// ```
    /// use vlm_core::{ClientConfig, VlmBackend, VlmClient};
    /// let config = ClientConfig::new(VlmBackend::LmDeploy, "http://gpu:23333/").unwrap();
    /// let client = vlm_lmdeploy::LmDeployClient::new(config).unwrap();
    /// assert_eq!(client.base_url().as_str(), "http://gpu:23333/v1/");
    /// ```
    pub fn new(config: ClientConfig) -> Result<Self, VlmError> {
        let mut config = config;
        config.base_url =
            vlm_core::normalize_base_url(VlmBackend::LmDeploy, config.base_url.as_str())?;
        config.backend = VlmBackend::LmDeploy;
        Ok(LmDeployClient {
            chat: OpenAiChat {
                transport: Transport::new(&config)?,
                max_image_bytes: config.max_image_bytes,
            },
            model: ModelSlot::new(config.model),
        })
    }

    /// The model to send: configured, adopted, or discovered now from `/v1/models`.
    async fn resolve_model(&self) -> Result<String, VlmError> {
        if self.model.is_known() {
            return Ok(self.model.get().to_owned());
        }
        let transport = &self.chat.transport;
        let mut report = HealthReport::new(
            VlmBackend::LmDeploy,
            transport.base_url().clone(),
            HealthState::Ready,
        );
        let models = self.chat.list_models(&mut report.probes).await?;
        report.served_models = models.into_iter().map(|m| m.id).collect();
        vlm_core::openai::resolve_model(&mut report, &self.model)?;
        match report.model {
            Some(model) => Ok(model),
            None => Err(VlmError::config(format!(
                "no model is configured and the LMDeploy server at {} serves none; start it with \
                 a model (`{}`)",
                transport.base_url(),
                VlmBackend::LmDeploy.start_command(transport.port())
            ))),
        }
    }
}

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
impl VlmClient for LmDeployClient {
    fn backend(&self) -> VlmBackend {
        VlmBackend::LmDeploy
    }

    fn model(&self) -> &str {
        self.model.get()
    }

    fn base_url(&self) -> &Url {
        self.chat.transport.base_url()
    }

    async fn health(&self) -> Result<HealthReport, VlmError> {
        let transport = &self.chat.transport;
        let mut report = HealthReport::new(
            VlmBackend::LmDeploy,
            transport.base_url().clone(),
            HealthState::Ready,
        );
        report.model = self.model.configured().map(str::to_owned);
        let resp = match transport.probe("health", &mut report.probes).await {
            Ok(resp) => resp,
            Err(err) => {
                report.state = state_for_error(&err, "GET /health");
                return Ok(report);
            }
        };
        let liveness = liveness_from_body(resp.status, &resp.body, transport.server_text());
        match (resp.status, liveness) {
            // >= 0.14: the body says what the engine is doing.
            (_, Some(HealthState::Ready)) => {}
            (_, Some(state)) => {
                report.state = state;
                return Ok(report);
            }
            // 0.5-0.13: an empty 200; < 0.5: no /health route at all.
            (200..=299 | 404, None) => {}
            (503, None) => {
                report.state = HealthState::Starting {
                    reason: "GET /health answered 503; the engine is still loading".to_owned(),
                };
                return Ok(report);
            }
            (status, None) => {
                report.state = HealthState::Unhealthy {
                    reason: format!(
                        "GET /health answered {status}: {}; is {} an LMDeploy api_server?",
                        err_note(&transport.http_error(&resp)),
                        transport.root_endpoint("")
                    ),
                };
                return Ok(report);
            }
        }
        self.chat.check_models(&mut report, &self.model).await?;
        Ok(report)
    }

    async fn infer_single(&self, request: &VlmRequest) -> Result<VlmResponse, VlmError> {
        // LMDeploy requires `model`; an unknown one is a 404.
        let model = self.resolve_model().await?;
        self.chat.chat(request, Some(&model)).await
    }

    async fn infer_stream(&self, request: &VlmRequest) -> Result<VlmStream, VlmError> {
        let model = self.resolve_model().await?;
        self.chat.chat_stream(request, Some(&model)).await
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
