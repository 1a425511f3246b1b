//! One client for every OpenAI-compatible server. A backend crate supplies only what differs:
//! its server's health sequence and whether `model` must be sent ([`OpenAiServer`]).

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use url::Url;

use super::parse::{ServedModel, parse_chat_response, parse_model_list};
use bytes::Bytes;

use super::payload::{PayloadOptions, body_capacity, build_chat_body_into};
use crate::backend::VlmBackend;
use crate::buffers::BufferPool;
use crate::client::VlmClient;
use crate::config::{ClientConfig, normalize_base_url};
use crate::error::VlmError;
use crate::health::{HealthProbe, HealthReport, HealthState, err_note, state_for_error};
use crate::image::{ImageMime, LoadedImage};
use crate::models::{ModelNames, ModelSlot, resolve_model};
use crate::request::VlmRequest;
use crate::response::VlmResponse;
use crate::stream::{StreamContext, VlmStream, sse_events};
use crate::text::shown_model;
use crate::transport::{Auth, Budget, Transport};

/// What one OpenAI-compatible server does its own way. Implemented by each backend crate
/// (`vlm_vllm::Vllm`, `vlm_lmdeploy::LmDeploy`); [`OpenAiCompatible`] does the rest.
#[async_trait]
pub trait OpenAiServer: Send + Sync + fmt::Debug + Default + 'static {
    /// The backend this server is.
    const BACKEND: VlmBackend;

    /// Whether every request must name the model. LMDeploy answers 404 without it, so the
    /// model is discovered first; vLLM uses its served model when `model` is left out, so it is
    /// left out while unknown and adopted from the answer.
    const REQUIRES_MODEL: bool;

    /// Checks the server before its model list is read, recording each probe in `report`.
    /// `None` goes on to the model list; a state ends the check with it.
    async fn liveness(
        &self,
        transport: &Transport,
        report: &mut HealthReport,
    ) -> Option<HealthState>;

    /// The served models for the health check, read from the server's own route; `None` (the
    /// default) reads `GET /v1/models`.
    async fn served_models(
        &self,
        transport: &Transport,
        probes: &mut Vec<HealthProbe>,
    ) -> Option<Result<Vec<String>, VlmError>> {
        let _ = (transport, probes);
        None
    }

    /// Whether the configured `model` names the served `served`; exact by default.
    fn same_model(&self, configured: &str, served: &str) -> bool {
        configured == served
    }

    /// What to do when the configured model is not served, beyond choosing a served one.
    fn not_served_advice(&self, model: &str) -> Option<String> {
        let _ = model;
        None
    }

    /// Whether the server takes images of this type in a `data:` URL; `Err` says why not and
    /// what to do. Every type by default.
    fn check_image_type(&self, mime: ImageMime) -> Result<(), String> {
        let _ = mime;
        Ok(())
    }

    /// The Prometheus gauge on `GET /metrics` that counts the requests waiting in the server's
    /// queue (`vllm:num_requests_waiting`), where the server has one; `None` by default.
    fn queue_metric(&self) -> Option<&'static str> {
        None
    }

    /// Request fields this server accepts and silently drops, each with what it reads instead:
    /// sending one is warned about once (request linting).
    fn ignored_fields(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
}

/// Warns once per process and field that the server drops it.
fn lint(backend: VlmBackend, field: &str, instead: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let key = format!("{backend}/{field}");
    if !warned.contains(&key) {
        tracing::warn!(
            "the {backend} server silently drops the request field {field:?}; it reads {instead}"
        );
        warned.push(key);
    }
}

/// The server's naming rules, as the model check wants them.
struct Names<'a, S>(&'a S);

impl<S: OpenAiServer> ModelNames for Names<'_, S> {
    fn same_model(&self, configured: &str, served: &str) -> bool {
        self.0.same_model(configured, served)
    }

    fn not_served_advice(&self, model: &str) -> Option<String> {
        self.0.not_served_advice(model)
    }
}

/// Images of this many bytes or more in all are encoded on the blocking pool.
const BUILD_OFF_THREAD: usize = 1 << 20;

/// Builds a body into a buffer of `pool` (over the pages an earlier body left there).
fn build_pooled(
    pool: &Arc<BufferPool>,
    request: &VlmRequest,
    images: &[LoadedImage],
    options: PayloadOptions<'_>,
) -> Result<Bytes, VlmError> {
    let mut body = pool.take(body_capacity(request, images));
    build_chat_body_into(&mut body, request, images, options)?;
    Ok(pool.freeze(body))
}

/// The type of a loaded image: its sniffed type, or the one a `data:` URL declares.
fn image_type(image: &LoadedImage) -> Option<ImageMime> {
    match image {
        LoadedImage::Inline { mime, .. } => Some(*mime),
        LoadedImage::Url(url) => {
            let declared = url.strip_prefix("data:")?.split([';', ',']).next()?;
            ImageMime::from_mime_str(declared)
        }
    }
}

/// A client for an OpenAI-compatible chat-completions server: images as `data:` URLs, retries,
/// streaming, model discovery, and a health check of the server's own routes then
/// `GET /v1/models`. Cheap to clone: clones share one connection pool and one adopted model.
///
/// ```no_run
/// use vlm_core::{ClientConfig, VlmBackend, VlmClient};
/// use vlm_core::openai::OpenAiCompatible;
///
/// # async fn run<S: vlm_core::openai::OpenAiServer>() -> Result<(), vlm_core::VlmError> {
/// let client = OpenAiCompatible::<S>::new(ClientConfig::default_for(S::BACKEND)?)?;
/// println!("{}", client.health().await?);
/// # Ok(()) }
/// ```
pub struct OpenAiCompatible<S> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    server: S,
    transport: Transport,
    max_image_bytes: u64,
    max_image_edge: Option<u32>,
    model: ModelSlot,
    /// Body buffers reused across requests (no fresh pages per request).
    bodies: Arc<BufferPool>,
    /// `<base>/chat/completions`, joined once.
    chat_url: Url,
    /// The `owned_by` of the served models, once `GET /v1/models` has been read: what the
    /// server is, behind the generic protocol.
    owner: std::sync::OnceLock<String>,
}

impl<S> Clone for OpenAiCompatible<S> {
    fn clone(&self) -> Self {
        OpenAiCompatible {
            inner: self.inner.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for OpenAiCompatible<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiCompatible")
            .field("server", &self.inner.server)
            .field("transport", &self.inner.transport)
            .field("model", &self.inner.model)
            .finish()
    }
}

impl<S: OpenAiServer> OpenAiCompatible<S> {
    /// Builds the client (and its connection pool, unless the configuration brings its own
    /// `reqwest::Client`). Nothing is sent until the first call. The base URL is normalised for
    /// this server, and a zero timeout is refused.
    pub fn new(config: ClientConfig) -> Result<Self, VlmError> {
        let mut config = config;
        config.base_url = normalize_base_url(S::BACKEND, config.base_url.as_str())?;
        config.backend = S::BACKEND;
        let transport = Transport::new(&config)?;
        Ok(OpenAiCompatible {
            inner: Arc::new(Inner {
                server: S::default(),
                chat_url: transport.endpoint("chat/completions"),
                transport,
                max_image_bytes: config.max_image_bytes,
                max_image_edge: config.max_image_edge,
                model: ModelSlot::new(config.model),
                bodies: Arc::default(),
                owner: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The model to send: the known one; or, when the server requires one and none is known
    /// yet, the one discovered now from `/v1/models`; or none (the server's own).
    async fn model_to_send(&self) -> Result<Option<String>, VlmError> {
        if let Some(model) = self.inner.model.get() {
            return Ok(Some(model.to_owned()));
        }
        if !S::REQUIRES_MODEL {
            return Ok(None);
        }
        let transport = &self.inner.transport;
        let mut report =
            HealthReport::new(S::BACKEND, transport.base_url().clone(), HealthState::Ready);
        let listed = self
            .inner
            .server
            .served_models(transport, &mut report.probes)
            .await;
        report.served_models = match listed {
            Some(listed) => listed?,
            None => self
                .list_models(&mut report.probes)
                .await?
                .into_iter()
                .map(|m| m.id)
                .collect(),
        };
        resolve_model(&mut report, &self.inner.model, &Names(&self.inner.server))?;
        match report.model {
            Some(model) => Ok(Some(model)),
            None => Err(VlmError::config(format!(
                "no model is configured and the {} server at {} serves none; start it with a \
                 model (`{}`)",
                S::BACKEND,
                transport.base_url(),
                S::BACKEND.start_command(transport.port())
            ))),
        }
    }

    /// Checks the request, loads its images (files are read now, per request) and builds the
    /// body; the loaded images are dropped before anything is sent.
    async fn body(
        &self,
        request: &VlmRequest,
        options: PayloadOptions<'_>,
    ) -> Result<Bytes, VlmError> {
        request.validate()?;
        for (field, instead) in self.inner.server.ignored_fields() {
            if request.extra.contains_key(*field) {
                lint(S::BACKEND, field, instead);
            }
        }
        let mut images = Vec::with_capacity(request.images.len());
        for image in &request.images {
            let loaded = image.load(self.inner.max_image_bytes).await?;
            let loaded =
                crate::resize::fit(loaded, self.inner.max_image_edge, image.source_name()).await?;
            if let Some(mime) = image_type(&loaded) {
                self.takes_image_type(mime)
                    .map_err(|why| VlmError::image(image.source_name(), why))?;
            }
            images.push(loaded);
        }
        let pool = self.inner.bodies.clone();
        let inline: usize = images
            .iter()
            .map(|image| match image {
                LoadedImage::Inline { data, .. } => data.len(),
                LoadedImage::Url(url) => url.len(),
            })
            .sum();
        if inline < BUILD_OFF_THREAD {
            return build_pooled(&pool, request, &images, options);
        }
        // Encoding megabytes takes milliseconds: not on the threads driving other requests.
        let request = request.clone();
        let (model, stream) = (options.model.map(str::to_owned), options.stream);
        tokio::task::spawn_blocking(move || {
            let options = PayloadOptions {
                model: model.as_deref(),
                stream,
            };
            build_pooled(&pool, &request, &images, options)
        })
        .await
        .map_err(|e| VlmError::config(format!("internal error while building the request: {e}")))?
    }

    /// Loads the images, builds the body, posts it and parses the answer.
    async fn chat(
        &self,
        request: &VlmRequest,
        model: Option<&str>,
    ) -> Result<VlmResponse, VlmError> {
        let body = self
            .body(
                request,
                PayloadOptions {
                    model,
                    stream: false,
                },
            )
            .await?;
        let url = &self.inner.chat_url;
        let started = Instant::now();
        let resp = self
            .inner
            .transport
            .post_json_with_retries(url, body)
            .await?;
        if !resp.is_success() {
            return Err(self.inner.transport.http_error(&resp));
        }
        parse_chat_response(
            self.inner.transport.backend(),
            &resp,
            model.unwrap_or(""),
            started.elapsed(),
            self.inner.transport.server_text(),
        )
    }

    /// Like [`chat`](Self::chat), streamed: `"stream": true` with
    /// `stream_options.include_usage`, each wait for the next event bounded by the timeout.
    async fn chat_stream(
        &self,
        request: &VlmRequest,
        model: Option<&str>,
    ) -> Result<VlmStream, VlmError> {
        let body = self
            .body(
                request,
                PayloadOptions {
                    model,
                    stream: true,
                },
            )
            .await?;
        let url = &self.inner.chat_url;
        let timeout = self.inner.transport.timeout;
        // The whole answer, streamed or not, is bounded by vlm_timeout.
        let deadline = tokio::time::Instant::now() + timeout;
        let resp = self
            .inner
            .transport
            .post_json_streaming(url, body, timeout)
            .await?;
        Ok(sse_events(
            StreamContext {
                parse: crate::stream::openai_chunk,
                end_is_done: false,
                backend: self.inner.transport.backend(),
                url: url.to_string(),
                chunk_timeout: timeout,
                total_timeout: timeout,
                deadline,
                clean: self.inner.transport.server_text().clone(),
            },
            resp.bytes_stream(),
        ))
    }

    /// Whether the server takes this image type: the backend's own rule, then what the server
    /// is known to be from its model list (llama.cpp cannot decode WebP).
    fn takes_image_type(&self, mime: ImageMime) -> Result<(), String> {
        self.inner.server.check_image_type(mime)?;
        owner_takes(self.inner.owner.get().map(String::as_str), mime)
    }

    /// `GET /v1/models`, recorded as a probe.
    pub async fn list_models(
        &self,
        probes: &mut Vec<HealthProbe>,
    ) -> Result<Vec<ServedModel>, VlmError> {
        let url = self.inner.transport.endpoint("models");
        let resp = self
            .inner
            .transport
            .get(&url, Auth::Bearer, Budget::Health)
            .await;
        let route = format!("GET {}", url.path());
        match resp {
            Ok(resp) if resp.is_success() => {
                let models = parse_model_list(
                    self.inner.transport.backend(),
                    &resp,
                    self.inner.transport.server_text(),
                )?;
                if let Some(owner) = models.iter().find_map(|m| m.owned_by.clone()) {
                    let _ = self.inner.owner.set(owner);
                }
                let names: Vec<String> = models.iter().map(|m| shown_model(&m.id)).collect();
                probes.push(HealthProbe {
                    route,
                    status: Some(resp.status),
                    note: format!("serves {}", names.join(", ")),
                });
                Ok(models)
            }
            Ok(resp) => {
                let err = self.inner.transport.http_error(&resp);
                probes.push(HealthProbe {
                    route,
                    status: Some(resp.status),
                    note: err_note(&err),
                });
                Err(err)
            }
            Err(err) => {
                probes.push(HealthProbe {
                    route,
                    status: None,
                    note: err_note(&err),
                });
                Err(err)
            }
        }
    }

    /// Completes a report whose liveness probe passed: lists the models, checks the configured
    /// one is served (or adopts the only one), and sets the final state.
    async fn check_models(&self, report: &mut HealthReport) -> Result<(), VlmError> {
        let transport = &self.inner.transport;
        let listed = match self
            .inner
            .server
            .served_models(transport, &mut report.probes)
            .await
        {
            Some(listed) => listed,
            None => self
                .list_models(&mut report.probes)
                .await
                .map(|models| models.into_iter().map(|m| m.id).collect()),
        };
        match listed {
            Ok(models) => report.served_models = models,
            Err(err) => {
                report.state = state_for_error(&err, "the model list");
                return Ok(());
            }
        }
        resolve_model(report, &self.inner.model, &Names(&self.inner.server))
    }
}

/// The queue gauge of a server known from its model list's `owned_by`: SGLang publishes
/// `sglang:num_queue_reqs` on `GET /metrics` when started with `--enable-metrics`.
fn owner_queue_metric(owner: Option<&str>) -> Option<&'static str> {
    match owner {
        Some("sglang") => Some("sglang:num_queue_reqs"),
        _ => None,
    }
}

/// The image types a server cannot decode, known from its model list's `owned_by`:
/// llama.cpp's `llama-server` (`llamacpp`) decodes images with stb_image, which has no WebP, and
/// answers one with a bare 400 "Failed to load image or audio file".
fn owner_takes(owner: Option<&str>, mime: ImageMime) -> Result<(), String> {
    match (owner, mime) {
        (Some("llamacpp"), ImageMime::Webp) => Err(
            "llama.cpp's llama-server cannot decode WebP (it would answer \"Failed to load image or audio file\"); convert it to PNG or JPEG"
                .to_owned(),
        ),
        _ => Ok(()),
    }
}

#[async_trait]
impl<S: OpenAiServer> VlmClient for OpenAiCompatible<S> {
    fn backend(&self) -> VlmBackend {
        S::BACKEND
    }

    fn model(&self) -> Option<&str> {
        self.inner.model.get()
    }

    fn base_url(&self) -> &Url {
        self.inner.transport.base_url()
    }

    fn check_image_type(&self, mime: ImageMime) -> Result<(), String> {
        self.takes_image_type(mime)
    }

    async fn health(&self) -> Result<HealthReport, VlmError> {
        let transport = &self.inner.transport;
        let mut report =
            HealthReport::new(S::BACKEND, transport.base_url().clone(), HealthState::Ready);
        report.model = self.inner.model.configured().map(str::to_owned);
        if let Some(state) = self.inner.server.liveness(transport, &mut report).await {
            report.state = state;
            return Ok(report);
        }
        self.check_models(&mut report).await?;
        Ok(report)
    }

    async fn queue_depth(&self) -> Option<f64> {
        let name = self
            .inner
            .server
            .queue_metric()
            .or_else(|| owner_queue_metric(self.inner.owner.get().map(String::as_str)))?;
        let transport = &self.inner.transport;
        let url = transport.root_endpoint("metrics");
        let resp = transport
            .get(&url, Auth::Bearer, Budget::Health)
            .await
            .ok()?;
        if !resp.is_success() {
            return None;
        }
        crate::metrics::gauge_sum(std::str::from_utf8(&resp.body).ok()?, name)
    }

    async fn infer_single(&self, request: &VlmRequest) -> Result<VlmResponse, VlmError> {
        let model = match &request.model {
            Some(model) => Some(model.clone()),
            None => self.model_to_send().await?,
        };
        let response = self.chat(request, model.as_deref()).await?;
        if model.is_none() && !response.model.is_empty() {
            self.inner.model.adopt(&response.model);
        }
        Ok(response)
    }

    async fn infer_stream(&self, request: &VlmRequest) -> Result<VlmStream, VlmError> {
        let model = match &request.model {
            Some(model) => Some(model.clone()),
            None => self.model_to_send().await?,
        };
        self.chat_stream(request, model.as_deref()).await
    }
}
