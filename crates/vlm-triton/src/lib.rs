//! # vlm-triton
//!
//! The [Triton Inference Server](https://github.com/triton-inference-server/server) client of
//! ImageWorks VLM, speaking the KServe v2 HTTP protocol.
//!
//! - Health is real: `GET /v2/health/live`, `GET /v2` (version), `GET /v2/health/ready`, then
//!   `GET /v2/models/{model}/ready` (200 ready; 400 "Model version not ready"; 404 unknown
//!   model; 503 "Server not ready"), each mapped into the [`HealthReport`]. A base URL given in
//!   the OpenAI form (`http://host:8000/v1`) is stripped to the server root. A server that answers
//!   `/v2/...` with FastAPI's `{"detail":"Not Found"}` is Triton's OpenAI frontend (port 9000),
//!   not KServe, and the report says so.
//! - Inference is not implemented yet: [`TritonClient::infer_single`] returns
//!   [`VlmError::Unsupported`] naming what works today (see [`INFERENCE_GUIDANCE`]).
//!
//! ```no_run
//! use vlm_core::{ClientConfig, VlmBackend, VlmClient};
//! use vlm_triton::TritonClient;
//!
//! # async fn run() -> Result<(), vlm_core::VlmError> {
//! let config = ClientConfig::new(VlmBackend::Triton, "http://localhost:8000")?.with_model("ensemble");
//! let client = TritonClient::new(config)?;
//! println!("{}", client.health().await?);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use serde_json::Value;
use std::sync::Arc;

use vlm_core::support::{
    Auth, Budget, ModelSlot, RawResponse, Transport, err_note, json_string_field, state_for_error,
};
use vlm_core::text::shown_model;
use vlm_core::{
    ClientConfig, HealthProbe, HealthReport, HealthState, Url, VlmBackend, VlmClient, VlmError,
    VlmRequest, VlmResponse, VlmStream, async_trait,
};

/// What to do instead of Triton inference today; the message of the `Unsupported` error.
pub const INFERENCE_GUIDANCE: &str = "inference through Triton is not implemented yet (this \
client checks Triton's health only). For images today: run `trtllm-serve <model>` (TensorRT-LLM's \
OpenAI-compatible server, port 8000) and use `--vlm-backend openai --vlm-base-url \
http://<host>:8000/v1`. Triton's own OpenAI frontend (port 9000) is text-only and rejects image \
parts. TensorRT-LLM multimodal ensembles take `image_url_input` through Triton's generate \
extension (`POST /v2/models/ensemble/generate`); support for that is a planned follow-up";

/// A client for Triton Inference Server (KServe v2 HTTP/REST protocol).
/// Cheap to clone: clones share one connection pool and one adopted model.
#[derive(Debug, Clone)]
pub struct TritonClient {
    transport: Transport,
    model: Arc<ModelSlot>,
}

impl TritonClient {
    /// Builds the client. Nothing is sent until the first call; inference answers
    /// [`VlmError::Unsupported`] with [`INFERENCE_GUIDANCE`].
    ///
    /// ```
    /// use vlm_core::{ClientConfig, VlmBackend, VlmClient};
    /// let config = ClientConfig::new(VlmBackend::Triton, "http://localhost:8000/v1").unwrap();
    /// let client = vlm_triton::TritonClient::new(config).unwrap();
    /// assert_eq!(client.base_url().as_str(), "http://localhost:8000/");
    /// ```
    pub fn new(config: ClientConfig) -> Result<Self, VlmError> {
        let mut config = config;
        config.base_url =
            vlm_core::normalize_base_url(VlmBackend::Triton, config.base_url.as_str())?;
        config.backend = VlmBackend::Triton;
        Ok(TritonClient {
            transport: Transport::new(&config)?,
            model: Arc::new(ModelSlot::new(config.model)),
        })
    }

    /// `{root}/v2/models/{model}[/{suffix}]`, the model name as one path segment, under the
    /// base URL's prefix (a gateway's `/triton`).
    fn model_route(&self, model: &str, suffix: &str) -> Url {
        let mut url = self.transport.root_endpoint("");
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(["v2", "models", model]);
            if !suffix.is_empty() {
                segments.push(suffix);
            }
        }
        url
    }

    /// `POST /v2/repository/index` with `{"ready":true}`: the names of the ready models.
    async fn ready_models(&self, probes: &mut Vec<HealthProbe>) -> Option<Vec<String>> {
        let url = self.transport.root_endpoint("v2/repository/index");
        let resp = self
            .transport
            .post_json(&url, r#"{"ready":true}"#, Budget::Health)
            .await;
        let route = format!("POST {}", url.path());
        match resp {
            Ok(resp) if resp.is_success() => {
                let names: Vec<String> = serde_json::from_slice::<Vec<Value>>(&resp.body)
                    .ok()?
                    .iter()
                    .filter_map(|m| m.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect();
                let shown: Vec<String> = names.iter().map(|n| shown_model(n)).collect();
                probes.push(HealthProbe::new(
                    route,
                    Some(resp.status),
                    format!("ready: {}", shown.join(", ")),
                ));
                Some(names)
            }
            Ok(resp) => {
                probes.push(HealthProbe::new(
                    route,
                    Some(resp.status),
                    err_note(&self.transport.http_error(&resp)),
                ));
                None
            }
            Err(err) => {
                probes.push(HealthProbe::new(route, None, err_note(&err)));
                None
            }
        }
    }

    fn is_openai_frontend(resp: &RawResponse) -> bool {
        resp.status == 404 && json_string_field(&resp.body, "detail").is_some()
    }

    fn server_message(&self, resp: &RawResponse) -> String {
        err_note(&self.transport.http_error(resp))
    }

    fn openai_frontend_state(&self) -> HealthState {
        HealthState::Unhealthy {
            reason: format!(
                "{} answers like Triton's OpenAI frontend (FastAPI \"Not Found\" on /v2), not the \
                 KServe v2 endpoint: point --vlm-base-url at Triton's HTTP port (8000 by default); \
                 note the OpenAI frontend is text-only, for images use `trtllm-serve` with \
                 --vlm-backend vllm",
                self.transport.root_endpoint("")
            ),
        }
    }
}

#[async_trait]
impl VlmClient for TritonClient {
    fn backend(&self) -> VlmBackend {
        VlmBackend::Triton
    }

    fn model(&self) -> Option<&str> {
        self.model.get()
    }

    fn base_url(&self) -> &Url {
        self.transport.base_url()
    }

    async fn health(&self) -> Result<HealthReport, VlmError> {
        let t = &self.transport;
        let mut report =
            HealthReport::new(VlmBackend::Triton, t.base_url().clone(), HealthState::Ready);
        report.model = self.model.configured().map(str::to_owned);

        // Liveness: 200 live, 400 not live, 503 while the server exits.
        let live = match t.probe("v2/health/live", &mut report.probes).await {
            Ok(resp) => resp,
            Err(err) => {
                report.state = state_for_error(&err, "GET /v2/health/live");
                return Ok(report);
            }
        };
        if Self::is_openai_frontend(&live) {
            report.state = self.openai_frontend_state();
            return Ok(report);
        }
        if !live.is_success() {
            report.state = HealthState::Unhealthy {
                reason: format!(
                    "GET /v2/health/live answered {}: {}; the server is not live, check \
                     tritonserver's log",
                    live.status,
                    self.server_message(&live)
                ),
            };
            return Ok(report);
        }

        if let Ok(resp) = t.probe("v2", &mut report.probes).await
            && resp.is_success()
        {
            report.server_version = json_string_field(&resp.body, "version");
        }

        // Readiness of the server: 200 ready, 400 not ready (models still loading).
        match t.probe("v2/health/ready", &mut report.probes).await {
            Ok(resp) if resp.is_success() => {}
            Ok(resp) => {
                report.state = HealthState::Starting {
                    reason: format!(
                        "GET /v2/health/ready answered {}{}: the server is not ready yet (models \
                         may still be loading); if it stays so, check tritonserver's log",
                        resp.status,
                        match self.server_message(&resp) {
                            m if m.starts_with("empty body") => String::new(),
                            m => format!(" ({m})"),
                        }
                    ),
                };
                return Ok(report);
            }
            Err(err) => {
                report.state = state_for_error(&err, "GET /v2/health/ready");
                return Ok(report);
            }
        }

        // The model: configured, or the only ready one in the repository index.
        if !self.model.is_known() {
            let ready = self.ready_models(&mut report.probes).await;
            match ready.as_deref() {
                Some([only]) => {
                    self.model.adopt(only);
                }
                // A report, not an error: the Triton flow prints the health report whatever it
                // says, then stops with the guidance.
                Some(several) if several.len() > 1 => {
                    report.served_models = several.to_vec();
                    report.state = HealthState::Unhealthy {
                        reason: format!(
                            "no model is configured and Triton has several ready: {}; choose \
                             one with --vlm-model (or vlm_triton_model)",
                            several
                                .iter()
                                .map(|n| shown_model(n))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    };
                    return Ok(report);
                }
                _ => {
                    report.state = HealthState::Unhealthy {
                        reason: "no model is configured and Triton listed no single ready model; \
                                 set --vlm-model (or vlm_triton_model) to the model to check"
                            .to_owned(),
                    };
                    return Ok(report);
                }
            }
            report.served_models = ready.unwrap_or_default();
        }
        let Some(model) = self.model.get().map(str::to_owned) else {
            report.state = HealthState::Unhealthy {
                reason: "no model is configured; set --vlm-model (or vlm_triton_model)".to_owned(),
            };
            return Ok(report);
        };
        report.model = Some(model.clone());

        let url = self.model_route(&model, "ready");
        let route = format!("GET {}", vlm_core::text::clip(url.path(), 600));
        let resp = match t.get(&url, Auth::None, Budget::Health).await {
            Ok(resp) => resp,
            Err(err) => {
                report
                    .probes
                    .push(HealthProbe::new(route, None, err_note(&err)));
                report.state = state_for_error(&err, "the model readiness check");
                return Ok(report);
            }
        };
        let message = if resp.is_success() {
            String::new()
        } else {
            self.server_message(&resp)
        };
        report
            .probes
            .push(HealthProbe::new(route, Some(resp.status), message.clone()));
        report.state = match resp.status {
            200..=299 => HealthState::Ready,
            404 => HealthState::Unhealthy {
                reason: format!(
                    "Triton does not know model {model:?} ({message}); set --vlm-model (or \
                     vlm_triton_model) to a model in the repository"
                ),
            },
            400 | 503 => HealthState::Starting {
                reason: format!(
                    "model {model:?} is not ready ({message}); it may still be loading; if it \
                     stays so, it failed to load: check tritonserver's log"
                ),
            },
            status => HealthState::Unhealthy {
                reason: format!("GET {} answered {status}: {message}", url.path()),
            },
        };
        Ok(report)
    }

    async fn infer_single(&self, _request: &VlmRequest) -> Result<VlmResponse, VlmError> {
        Err(VlmError::Unsupported {
            backend: VlmBackend::Triton,
            message: INFERENCE_GUIDANCE.to_owned(),
        })
    }

    async fn infer_stream(&self, _request: &VlmRequest) -> Result<VlmStream, VlmError> {
        Err(VlmError::Unsupported {
            backend: VlmBackend::Triton,
            message: INFERENCE_GUIDANCE.to_owned(),
        })
    }
}
