//! `ClientConfig`, and the one normalisation of base URLs.

use std::time::Duration;

use url::Url;

use crate::backend::VlmBackend;
use crate::error::VlmError;
use crate::key::ApiKey;

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
    /// The caller's own HTTP client (proxies, TLS roots, middleware), used instead of one built
    /// from the timeouts above; per-request timeouts still apply.
    pub http_client: Option<reqwest::Client>,
    /// For servers that take a raw prompt (Triton): the text sent, with `{prompt}` where the
    /// request's prompt goes, e.g. `"<|image|>{prompt}"` (`vlm_prompt_template`).
    pub prompt_template: Option<String>,
    /// Shrink images whose longer edge is larger before sending them (`vlm_max_image_edge`;
    /// needs the `resize` feature).
    pub max_image_edge: Option<u32>,
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
            http_client: None,
            prompt_template: None,
            max_image_edge: None,
        })
    }

    /// Shrinks images whose longer edge is larger than `edge` pixels before they are sent
    /// (JPEG, or PNG with alpha; off the async threads). Needs the `resize` feature:
    /// [`validate`](Self::validate) refuses it otherwise.
    pub fn with_max_image_edge(mut self, edge: u32) -> Self {
        self.max_image_edge = Some(edge);
        self
    }

    /// Sets the prompt template (`{prompt}` marks where the prompt goes); servers that take a
    /// raw prompt (Triton) send the template filled in. A template without `{prompt}` is refused
    /// by [`validate`](Self::validate).
    ///
    /// ```
    /// use vlm_core::{ClientConfig, VlmBackend};
    /// let config = ClientConfig::new(VlmBackend::Triton, "http://h:8000")
    ///     .unwrap()
    ///     .with_prompt_template("<|image|>{prompt}");
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn with_prompt_template(mut self, template: impl Into<String>) -> Self {
        let template = template.into();
        self.prompt_template = (!template.trim().is_empty()).then_some(template);
        self
    }

    /// Uses the caller's own `reqwest::Client` (its proxies, TLS roots, connection pool) instead
    /// of building one; `connect_timeout` is then the caller's client's business.
    ///
    /// ```
    /// use vlm_core::{ClientConfig, VlmBackend};
    /// let http = reqwest::Client::builder().build().unwrap();
    /// let config = ClientConfig::new(VlmBackend::Vllm, "http://gpu:8000/v1")
    ///     .unwrap()
    ///     .with_http_client(http);
    /// assert!(config.http_client.is_some());
    /// ```
    pub fn with_http_client(mut self, client: reqwest::Client) -> Self {
        self.http_client = Some(client);
        self
    }

    /// Checks what the setters cannot: every timeout is above zero. Clients call it when they
    /// are built, so `with_timeout(Duration::ZERO)` is refused there.
    ///
    /// ```
    /// use std::time::Duration;
    /// use vlm_core::{ClientConfig, VlmBackend};
    /// let config = ClientConfig::default_for(VlmBackend::Vllm).unwrap();
    /// assert!(config.clone().validate().is_ok());
    /// assert!(config.with_timeout(Duration::ZERO).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), VlmError> {
        for (name, value) in [
            ("timeout (vlm_timeout)", self.timeout),
            (
                "connect timeout (vlm_connect_timeout)",
                self.connect_timeout,
            ),
            ("health timeout (vlm_health_timeout)", self.health_timeout),
        ] {
            if value.is_zero() {
                return Err(VlmError::config(format!(
                    "the {name} is zero: every request would fail at once; give a number of \
                     seconds above 0"
                )));
            }
        }
        if self.max_image_edge.is_some() && !cfg!(feature = "resize") {
            return Err(VlmError::config(crate::resize::RESIZE_MISSING));
        }
        if let Some(template) = &self.prompt_template
            && !template.contains("{prompt}")
        {
            return Err(VlmError::config(format!(
                "the prompt template {template:?} (vlm_prompt_template) has no {{prompt}}: the \
                 prompt would never be sent; write {{prompt}} where it goes, e.g. \
                 \"<|image|>{{prompt}}\""
            )));
        }
        Ok(())
    }

    /// The backend's default URL; a configuration error for a backend with none (`openai`).
    pub fn default_for(backend: VlmBackend) -> Result<Self, VlmError> {
        let url = backend
            .default_base_url()
            .ok_or_else(|| no_default_url(backend))?;
        Self::new(backend, url)
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

    /// Sets the per-attempt inference timeout (above zero: [`validate`](Self::validate)).
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

/// The error for a backend with no default URL (`openai`) and none configured.
pub fn no_default_url(backend: VlmBackend) -> VlmError {
    VlmError::config(format!(
        "the {backend} backend has no default URL: set it with --vlm-base-url, VLM_BASE_URL or \
         vlm_{backend}_base_url (e.g. http://gpu-box:30000/v1 for SGLang, http://gpu-box:8080/v1 \
         for llama-server)"
    ))
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
    let example = backend
        .default_base_url()
        .unwrap_or("http://gpu-box:30000/v1");
    let bad = |why: &str| {
        VlmError::config(format!(
            "invalid base URL {shown:?} for {backend}: {why}; use a URL such as {example}"
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
}
