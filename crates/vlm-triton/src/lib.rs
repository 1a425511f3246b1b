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
//! - Inference through Triton's generate extension (`POST /v2/models/{m}/generate`, and
//!   `/generate_stream` for a decoupled model), chosen from the model's metadata and
//!   configuration, read once: `image_url_input` (TensorRT-LLM multimodal ensembles: mllama,
//!   qwen2_vl, llava_onevision, pixtral) gets `data:image/jpeg;base64,` URLs; `image` (Triton's
//!   vLLM backend) gets raw base64. Only inputs the model lists are sent, each in its datatype;
//!   `exclude_input_in_output` is sent where the model has it, and otherwise the echoed prompt is
//!   cut from the answer. A model that takes images only as preprocessed pixels, or none at all,
//!   is [`VlmError::Unsupported`] saying what to run instead ([`VlmClient::image_support`]).
//! - Servers that take a raw prompt apply no chat template: `vlm_prompt_template`
//!   (`"<|image|>{prompt}"` for mllama on the vLLM backend) carries the model's placeholders.
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

mod generate;
mod model;

use std::time::Instant;

use model::{ImageWay, ModelInfo};
use vlm_core::StreamEvent;
use vlm_core::support::{StreamContext, fit_image, sse_events};

/// What to run instead when the server is Triton's OpenAI-compatible frontend.
pub const OPENAI_FRONTEND_GUIDANCE: &str = "Triton's OpenAI-compatible frontend (port 9000) is \
text-only: it refuses image parts (\"only text message is supported, but got image_url\"). Point \
--vlm-base-url at Triton's KServe HTTP port (8000 by default) to use the generate extension, or \
for images run `trtllm-serve <model>` and use `--vlm-backend openai --vlm-base-url \
http://<host>:8000/v1`";

/// A client for Triton Inference Server (KServe v2 HTTP/REST protocol).
/// Cheap to clone: clones share one connection pool and one adopted model.
#[derive(Debug, Clone)]
pub struct TritonClient {
    transport: Transport,
    model: Arc<ModelSlot>,
    /// What the model takes, read once.
    info: Arc<tokio::sync::OnceCell<ModelInfo>>,
    prompt_template: Option<String>,
    max_image_bytes: u64,
    max_image_edge: Option<u32>,
}

impl TritonClient {
    /// Builds the client. Nothing is sent until the first call.
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
            info: Arc::new(tokio::sync::OnceCell::new()),
            prompt_template: config.prompt_template,
            max_image_bytes: config.max_image_bytes,
            max_image_edge: config.max_image_edge,
        })
    }

    /// The model requests go to: configured, adopted, or the only ready one in the repository.
    async fn model_name(&self) -> Result<String, VlmError> {
        if let Some(model) = self.model.get() {
            return Ok(model.to_owned());
        }
        let mut probes = Vec::new();
        match self.ready_models(&mut probes).await.as_deref() {
            Some([only]) => Ok(self.model.adopt(only).to_owned()),
            _ => Err(VlmError::config(
                "no model is configured and Triton has no single ready model; set --vlm-model \
                 (or vlm_triton_model)",
            )),
        }
    }

    /// What `model` takes, from its metadata and configuration, read once per client.
    async fn model_info(&self, model: &str) -> Result<&ModelInfo, VlmError> {
        self.info
            .get_or_try_init(|| async {
                let t = &self.transport;
                let url = self.model_route(model, "");
                let resp = t.get(&url, Auth::Bearer, Budget::Health).await?;
                if Self::is_openai_frontend(&resp) {
                    return Err(VlmError::Unsupported {
                        backend: VlmBackend::Triton,
                        message: OPENAI_FRONTEND_GUIDANCE.to_owned(),
                    });
                }
                if !resp.is_success() {
                    return Err(t.http_error(&resp));
                }
                let metadata: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
                let config_url = self.model_route(model, "config");
                let config = match t.get(&config_url, Auth::Bearer, Budget::Health).await {
                    Ok(resp) if resp.is_success() => serde_json::from_slice(&resp.body).ok(),
                    _ => None,
                };
                ModelInfo::parse(&metadata, config.as_ref()).ok_or_else(|| VlmError::Protocol {
                    backend: VlmBackend::Triton,
                    url: url.to_string(),
                    message: "the model metadata has no name and inputs".to_owned(),
                })
            })
            .await
    }

    /// Loads the request's images, builds the generate body for the model.
    async fn prepare(
        &self,
        request: &VlmRequest,
        stream: bool,
    ) -> Result<(String, generate::Generate), VlmError> {
        request.validate()?;
        let model = self.model_name().await?;
        if let Some(asked) = request.model.as_deref().filter(|m| *m != model) {
            return Err(VlmError::config(format!(
                "this Triton client serves model {model:?}; a request for {asked:?} needs a client \
                 for that model (--vlm-model {asked})"
            )));
        }
        let info = self.model_info(&model).await?;
        let mut images = Vec::with_capacity(request.images.len());
        for image in &request.images {
            let loaded = image.load(self.max_image_bytes).await?;
            images.push(fit_image(loaded, self.max_image_edge, image.source_name()).await?);
        }
        let body = generate::body(
            info,
            request,
            &images,
            self.prompt_template.as_deref(),
            stream,
        )?;
        Ok((model, body))
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
                 --vlm-backend openai",
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
        if report.is_ready()
            && let Ok(info) = self.model_info(&model).await
        {
            report.image_input = Some(info.image.describe());
        }
        Ok(report)
    }

    async fn image_support(&self) -> Result<(), VlmError> {
        let Some(model) = self.model.get().map(str::to_owned) else {
            // No model known: only Triton's OpenAI frontend can be told apart already.
            let url = self.transport.root_endpoint("v2/health/live");
            if let Ok(resp) = self.transport.get(&url, Auth::None, Budget::Health).await
                && Self::is_openai_frontend(&resp)
            {
                return Err(VlmError::Unsupported {
                    backend: VlmBackend::Triton,
                    message: OPENAI_FRONTEND_GUIDANCE.to_owned(),
                });
            }
            return Ok(());
        };
        match &self.model_info(&model).await?.image {
            ImageWay::Unsupported(why) => Err(VlmError::Unsupported {
                backend: VlmBackend::Triton,
                message: why.clone(),
            }),
            _ => Ok(()),
        }
    }

    async fn infer_single(&self, request: &VlmRequest) -> Result<VlmResponse, VlmError> {
        let (model, generate) = self.prepare(request, false).await?;
        let url = self.model_route(&model, "generate");
        let started = Instant::now();
        let resp = self
            .transport
            .post_json_with_retries(&url, generate.body.to_string().into())
            .await?;
        if !resp.is_success() {
            return Err(self.transport.http_error(&resp));
        }
        let clean = self.transport.server_text();
        let reply: Value = serde_json::from_slice(&resp.body).map_err(|e| VlmError::Protocol {
            backend: VlmBackend::Triton,
            url: url.to_string(),
            message: clean.clean(&format!("the generate reply is not JSON ({e})"), 400),
        })?;
        let (text, finish_reason, usage) = generate::answer(&reply, &generate, clean)?;
        if text.trim().is_empty() {
            return Err(VlmError::empty_answer(
                VlmBackend::Triton,
                finish_reason.as_deref(),
                0,
            ));
        }
        let mut answer = VlmResponse::new(
            VlmBackend::Triton,
            reply
                .get("model_name")
                .and_then(Value::as_str)
                .map_or(model, |m| clean.redact(m).into_owned()),
            text,
        );
        answer.finish_reason = finish_reason;
        answer.usage = usage;
        answer.latency = started.elapsed();
        Ok(answer)
    }

    async fn infer_stream(&self, request: &VlmRequest) -> Result<VlmStream, VlmError> {
        let model = self.model_name().await?;
        if !self.model_info(&model).await?.decoupled {
            // A model that is not decoupled answers once: the whole answer, as one event.
            tracing::debug!(
                "model {model:?} is not decoupled: streaming through /generate, the whole answer at once"
            );
            let answer = self.infer_single(request).await?;
            let mut events = vec![Ok(StreamEvent::Text(answer.text))];
            if let Some(finish) = answer.finish_reason {
                events.push(Ok(StreamEvent::Finish(finish)));
            }
            if let Some(usage) = answer.usage {
                events.push(Ok(StreamEvent::Usage(usage)));
            }
            return Ok(Box::pin(futures_util::stream::iter(events)));
        }
        let (model, generate) = self.prepare(request, true).await?;
        let url = self.model_route(&model, "generate_stream");
        let timeout = self.transport.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let resp = self
            .transport
            .post_json_streaming(&url, generate.body.to_string().into(), timeout)
            .await?;
        Ok(sse_events(
            StreamContext {
                parse: generate::stream_chunk,
                end_is_done: true,
                backend: VlmBackend::Triton,
                url: url.to_string(),
                chunk_timeout: timeout,
                total_timeout: timeout,
                deadline,
                clean: self.transport.server_text().clone(),
            },
            resp.bytes_stream(),
        ))
    }
}
