//! The `VlmClient` trait every backend implements, and the configuration clients are built from.

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use url::Url;

use crate::backend::VlmBackend;
use crate::error::VlmError;
use crate::health::{HealthReport, HealthState};
use crate::request::VlmRequest;
use crate::response::VlmResponse;
use crate::stream::VlmStream;

/// One interface to a vision-language model, whichever server hosts it.
///
/// Get one from `vlm_factory::build_client` (chosen by configuration) or build a backend's
/// client directly. Implementations are cheap to share (`Arc<dyn VlmClient>`) and reuse one
/// connection pool.
///
/// ```no_run
/// use vlm_core::{ImageInput, VlmClient, VlmRequest};
///
/// async fn narrate(client: &dyn VlmClient) -> Result<String, vlm_core::VlmError> {
///     let report = client.health().await?;
///     if !report.is_ready() {
///         eprintln!("{report}");
///     }
///     let request = VlmRequest::builder("Describe the colours in this photograph.")
///         .image(ImageInput::path("photo.jpg"))
///         .max_tokens(200)
///         .build()?;
///     let answer = client.infer_single(&request).await?;
///     println!("🤖 VLM: {}/{}", client.backend(), client.model());
///     Ok(answer.text)
/// }
/// ```
#[async_trait]
pub trait VlmClient: Send + Sync + fmt::Debug {
    /// Which server this client talks to.
    fn backend(&self) -> VlmBackend;

    /// The model requests go to: the configured one, or the one [`health`](Self::health)
    /// adopted because the server serves only it; empty while unknown.
    fn model(&self) -> &str;

    /// The base URL (`http://host:port/v1` for OpenAI-compatible servers, the root for Triton).
    fn base_url(&self) -> &Url;

    /// Checks the server and says why it is or is not ready.
    ///
    /// A server that does not answer is `Ok` with [`HealthState::Unreachable`]; `Err` is kept for
    /// what a retry cannot fix, such as several served models and none configured.
    async fn health(&self) -> Result<HealthReport, VlmError>;

    /// Whether the server is ready (any error counts as not ready).
    async fn health_check(&self) -> bool {
        self.health().await.map(|r| r.is_ready()).unwrap_or(false)
    }

    /// Polls [`health`](Self::health) with backoff (0.25 s doubling to 2 s) while the server is
    /// starting or unreachable, until it is ready, clearly unhealthy, or `deadline` has passed;
    /// returns the last report.
    async fn wait_ready(&self, deadline: Duration) -> Result<HealthReport, VlmError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(250);
        loop {
            let report = self.health().await?;
            let waiting = matches!(
                report.state,
                HealthState::Starting { .. } | HealthState::Unreachable { .. }
            );
            let left = deadline.saturating_sub(start.elapsed());
            if !waiting || left.is_zero() {
                return Ok(report);
            }
            tracing::debug!(
                state = report.state.label(),
                "server not ready yet; waiting"
            );
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Sends one request and waits for the whole answer.
    async fn infer_single(&self, request: &VlmRequest) -> Result<VlmResponse, VlmError>;

    /// Sends one request and streams the answer as it is generated (SSE).
    ///
    /// The default answers [`VlmError::Unsupported`]; vLLM and LMDeploy implement it.
    async fn infer_stream(&self, request: &VlmRequest) -> Result<VlmStream, VlmError> {
        let _ = request;
        Err(VlmError::Unsupported {
            backend: self.backend(),
            message: format!(
                "streaming is not supported by the {} client",
                self.backend()
            ),
        })
    }

    /// Sends many requests with at most `concurrency` in flight; the results come back in the
    /// order of `requests`, each paired with its own request whatever order they finished in.
    async fn infer_batch(
        &self,
        requests: &[VlmRequest],
        concurrency: usize,
    ) -> Vec<Result<VlmResponse, VlmError>> {
        use futures_util::StreamExt as _;
        // Built before the first await: a closure held across it would make the future's
        // `Send` bound too general for the compiler to prove.
        let jobs: Vec<Keyed<'_>> = requests
            .iter()
            .enumerate()
            .map(|(i, request)| keyed(self, i, request))
            .collect();
        let mut done: Vec<(usize, Result<VlmResponse, VlmError>)> =
            futures_util::stream::iter(jobs)
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
        done.sort_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, result)| result).collect()
    }
}

type Keyed<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (usize, Result<VlmResponse, VlmError>)> + Send + 'a>,
>;

/// One request of a batch, tagged with its index (a named function, so the future's lifetime is
/// tied to the client and request rather than inferred for a closure).
fn keyed<'a, C: VlmClient + ?Sized>(client: &'a C, i: usize, request: &'a VlmRequest) -> Keyed<'a> {
    Box::pin(async move { (i, client.infer_single(request).await) })
}

/// An API key. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The settings every client is built from; `vlm-factory` fills it from configuration.
///
/// ```
/// use std::time::Duration;
/// use vlm_core::{ClientConfig, VlmBackend};
///
/// let config = ClientConfig::new(VlmBackend::LmDeploy, "http://gpu-box:23333")
///     .unwrap()
///     .with_model("Qwen2.5-VL-7B-AWQ")
///     .with_timeout(Duration::from_secs(60));
/// assert_eq!(config.base_url.as_str(), "http://gpu-box:23333/v1/");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The backend this configuration is for.
    pub backend: VlmBackend,
    /// The normalised base URL (see [`normalize_base_url`]).
    pub base_url: Url,
    /// The model; discovered from the server when `None`.
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: Option<ApiKey>,
    /// Per-attempt timeout of an inference request (`vlm_timeout`).
    pub timeout: Duration,
    /// Timeout of establishing a connection (`vlm_connect_timeout`).
    pub connect_timeout: Duration,
    /// Timeout of each health probe (`vlm_health_timeout`).
    pub health_timeout: Duration,
    /// How many times a failed request may be retried (`vlm_max_retries`).
    pub max_retries: u32,
    /// Whether an inference that timed out is sent again (`vlm_retry_timeouts`, default off:
    /// the server may still be generating it).
    pub retry_timeouts: bool,
    /// The largest image accepted (`vlm_max_image_bytes`).
    pub max_image_bytes: u64,
}

impl ClientConfig {
    /// Default per-attempt inference timeout (`vlm_timeout`).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
    /// Default connect timeout (`vlm_connect_timeout`).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default health-probe timeout (`vlm_health_timeout`).
    pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default retries (`vlm_max_retries`).
    pub const DEFAULT_MAX_RETRIES: u32 = 2;
    /// Default image size limit (`vlm_max_image_bytes`): 32 MiB.
    pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 32 * 1024 * 1024;

    /// A configuration with defaults for everything but the backend and URL (normalised).
    pub fn new(backend: VlmBackend, base_url: &str) -> Result<Self, VlmError> {
        Ok(ClientConfig {
            backend,
            base_url: normalize_base_url(backend, base_url)?,
            model: None,
            api_key: None,
            timeout: Self::DEFAULT_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            health_timeout: Self::DEFAULT_HEALTH_TIMEOUT,
            max_retries: Self::DEFAULT_MAX_RETRIES,
            retry_timeouts: false,
            max_image_bytes: Self::DEFAULT_MAX_IMAGE_BYTES,
        })
    }

    /// The backend's default URL.
    pub fn default_for(backend: VlmBackend) -> Result<Self, VlmError> {
        Self::new(backend, backend.default_base_url())
    }

    /// Sets the model (an empty name means "discover it").
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        let model = model.into();
        self.model = (!model.trim().is_empty()).then(|| model.trim().to_owned());
        self
    }

    /// Sets the API key (an empty key means none).
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        let key = key.into();
        self.api_key = (!key.is_empty()).then(|| ApiKey::new(key));
        self
    }

    /// Sets the per-attempt inference timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the health-probe timeout.
    pub fn with_health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// Sets how many times a failed request may be retried.
    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Sets whether an inference that timed out is sent again.
    pub fn with_retry_timeouts(mut self, on: bool) -> Self {
        self.retry_timeouts = on;
        self
    }

    /// Sets the image size limit.
    pub fn with_max_image_bytes(mut self, n: u64) -> Self {
        self.max_image_bytes = n;
        self
    }
}

/// A URL as it may be shown: `user:pass@` masked as `***@`, and a query or fragment (where keys
/// are sometimes passed, `?api_key=...`) masked as `?***` / `#***`.
fn shown_url(url: &str) -> String {
    let (url, hidden_tail) = match url.find(['?', '#']) {
        Some(i) => (&url[..i], format!("{}***", &url[i..=i])),
        None => (url, String::new()),
    };
    let masked = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        (None, Some(at)) => format!("***{}", &url[at..]),
        _ => url.to_owned(),
    };
    masked + &hidden_tail
}

/// Normalises a base URL once, so joining paths is never surprising.
///
/// OpenAI-compatible backends get `/v1` when the path is empty and always a trailing `/`
/// (`Url::join("chat/completions")` on `http://h/v1` would drop `v1`); Triton keeps a path
/// prefix (a gateway's `/triton`) and loses only a trailing `/v1` or `/v2`. A URL without a
/// scheme gets `http://`.
///
/// ```
/// use vlm_core::{normalize_base_url, VlmBackend};
///
/// let vllm = |s| normalize_base_url(VlmBackend::Vllm, s).unwrap().to_string();
/// assert_eq!(vllm("localhost:8000"), "http://localhost:8000/v1/");
/// assert_eq!(vllm("http://localhost:8000/"), "http://localhost:8000/v1/");
/// assert_eq!(vllm("http://localhost:8000/v1"), "http://localhost:8000/v1/");
/// let triton = normalize_base_url(VlmBackend::Triton, "http://h:9000/v1/").unwrap();
/// assert_eq!(triton.as_str(), "http://h:9000/");
/// let behind_a_gateway = normalize_base_url(VlmBackend::Triton, "http://gw/triton/v2").unwrap();
/// assert_eq!(behind_a_gateway.as_str(), "http://gw/triton/");
/// ```
pub fn normalize_base_url(backend: VlmBackend, input: &str) -> Result<Url, VlmError> {
    let trimmed = input.trim();
    // Never echo credentials: `http://user:secret@host` is shown as `http://***@host`.
    let shown = shown_url(trimmed);
    let bad = |why: &str| {
        VlmError::config(format!(
            "invalid base URL {shown:?} for {backend}: {why}; use a URL such as {}",
            backend.default_base_url()
        ))
    };
    if trimmed.is_empty() {
        return Err(bad("it is empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not have a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // It would be logged and printed with every URL: keys go in the Authorization header.
        return Err(bad(
            "it must not carry credentials (user:password@); set the key with VLM_API_KEY or \
             vlm_<backend>_api_key",
        ));
    }
    if backend.is_openai_compatible() {
        let path = url.path().trim_end_matches('/').to_owned();
        if path.is_empty() {
            url.set_path("/v1/");
        } else {
            url.set_path(&format!("{path}/"));
        }
    } else {
        let path = url.path().trim_end_matches('/');
        let prefix = path
            .strip_suffix("/v1")
            .or_else(|| path.strip_suffix("/v2"))
            .unwrap_or(path)
            .to_owned();
        url.set_path(&format!("{prefix}/"));
    }
    Ok(url)
}

/// The server root of a base URL: the base without a trailing `/v1` (`http://h:p/v1/` →
/// `http://h:p/`). Health and version routes live there, not under `/v1`; a gateway's path
/// prefix stays (`http://gw/llama/v1/` → `http://gw/llama/`).
///
/// ```
/// use vlm_core::{server_root, Url};
/// let root = |s: &str| server_root(&Url::parse(s).unwrap()).to_string();
/// assert_eq!(root("http://h:8000/v1/"), "http://h:8000/");
/// assert_eq!(root("http://gw:8080/llama/v1/"), "http://gw:8080/llama/");
/// assert_eq!(root("http://gw:8080/llama/"), "http://gw:8080/llama/");
/// ```
pub fn server_root(base_url: &Url) -> Url {
    let mut root = base_url.clone();
    let path = base_url.path().trim_end_matches('/');
    let prefix = path.strip_suffix("/v1").unwrap_or(path);
    root.set_path(&format!("{prefix}/"));
    root
}

/// Holds the model: configured, or adopted once from the server.
#[derive(Debug, Default)]
pub struct ModelSlot {
    configured: Option<String>,
    discovered: OnceLock<String>,
}

impl ModelSlot {
    /// A slot with the configured model, if any.
    pub fn new(configured: Option<String>) -> Self {
        ModelSlot {
            configured,
            discovered: OnceLock::new(),
        }
    }

    /// The model, or `""` while unknown.
    pub fn get(&self) -> &str {
        self.configured
            .as_deref()
            .or_else(|| self.discovered.get().map(String::as_str))
            .unwrap_or("")
    }

    /// The configured model, if one was configured.
    pub fn configured(&self) -> Option<&str> {
        self.configured.as_deref()
    }

    /// Whether a model is known.
    pub fn is_known(&self) -> bool {
        !self.get().is_empty()
    }

    /// Adopts a discovered model (the first adoption wins).
    pub fn adopt(&self, model: &str) -> &str {
        if self.configured.is_none() {
            let _ = self.discovered.set(model.to_owned());
        }
        self.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised_per_backend() {
        let cases = [
            (VlmBackend::Vllm, "h:8000", "http://h:8000/v1/"),
            (VlmBackend::Vllm, "h:8000/", "http://h:8000/v1/"),
            (VlmBackend::Vllm, "h:8000/v1", "http://h:8000/v1/"),
            (VlmBackend::Vllm, "h:8000/v1/", "http://h:8000/v1/"),
            (
                VlmBackend::LmDeploy,
                "https://proxy/lmdeploy/v1",
                "https://proxy/lmdeploy/v1/",
            ),
            (VlmBackend::Triton, "h:8000", "http://h:8000/"),
            (VlmBackend::Triton, "h:8000/v1", "http://h:8000/"),
            (VlmBackend::Triton, "h:8000/v1/", "http://h:8000/"),
            (VlmBackend::Triton, "h:8000/v2", "http://h:8000/"),
            (VlmBackend::Triton, "gw/triton/v1", "http://gw/triton/"),
            (VlmBackend::Triton, "gw/triton", "http://gw/triton/"),
            (
                VlmBackend::Vllm,
                "gw:8080/llama/v1",
                "http://gw:8080/llama/v1/",
            ),
        ];
        for (backend, input, want) in cases {
            let got = normalize_base_url(backend, input).map(|u| u.to_string());
            assert_eq!(got.ok().as_deref(), Some(want), "{backend} {input}");
        }
        for bad in [
            "",
            "ftp://h/v1",
            "http://",
            "http://h:8000/v1?x=1",
            "http://h:99999",
        ] {
            let err = normalize_base_url(VlmBackend::Vllm, bad).unwrap_err();
            assert!(err.is_config(), "{bad}: {err}");
        }
        for secret in [
            "http://u:hunter2@h:8000/v1",
            "u:hunter2@h:8000",
            "http://u:hunter2@h:99999",
        ] {
            let err = normalize_base_url(VlmBackend::Vllm, secret)
                .unwrap_err()
                .to_string();
            assert!(!err.contains("hunter2") && err.contains("***@h"), "{err}");
        }
        // A key in the query string is masked like a password.
        let err = normalize_base_url(VlmBackend::Vllm, "http://h:8000/v1?api_key=hunter2")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2") && err.contains("/v1?***"), "{err}");
    }

    #[test]
    fn api_key_never_prints() {
        let key = ApiKey::new("sk-secret");
        assert_eq!(format!("{key:?} {key}"), "ApiKey(***) ***");
        let config = ClientConfig::default_for(VlmBackend::Vllm)
            .unwrap()
            .with_api_key("sk-secret");
        assert!(!format!("{config:?}").contains("sk-secret"));
    }

    #[test]
    fn model_slot_adopts_only_when_unconfigured() {
        let slot = ModelSlot::new(None);
        assert_eq!(slot.get(), "");
        assert_eq!(slot.adopt("a"), "a");
        assert_eq!(slot.adopt("b"), "a");
        let slot = ModelSlot::new(Some("x".into()));
        assert_eq!(slot.adopt("a"), "x");
    }
}
