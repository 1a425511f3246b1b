//! The shared HTTP transport: one pooled `reqwest::Client`, timeouts, the bearer key, error
//! mapping. The vLLM, LMDeploy and Triton clients are all built on it.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use url::Url;

use crate::backend::VlmBackend;
use crate::config::{ClientConfig, server_root};
use crate::error::VlmError;
use crate::error_body::decode_error_body;
use crate::health::{HealthProbe, err_note};
use crate::key::ApiKey;
use crate::retry::{RetryPolicy, parse_retry_after, retryable_status};
use crate::text::{MAX_MESSAGE_BYTES, ServerText};

/// The largest response body read (a misbehaving proxy must not exhaust memory).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A response read whole.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The URL requested.
    pub url: Url,
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Bytes,
    /// How long the server asked the client to wait (`retry-after-ms` or `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl RawResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Which timeout bounds a request: each names the setting that governs it, so a timeout says
/// what to raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// An inference: `vlm_timeout`, per attempt, for the whole answer.
    Inference,
    /// A health probe: `vlm_health_timeout`.
    Health,
}

impl Budget {
    /// The setting's key.
    pub fn setting(self) -> &'static str {
        match self {
            Budget::Inference => "vlm_timeout",
            Budget::Health => "vlm_health_timeout",
        }
    }
}

/// Whether a request carries the API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Send `Authorization: Bearer <key>` when a key is configured.
    Bearer,
    /// Never send the key (open routes such as `/health`).
    None,
}

/// One pooled HTTP client bound to one server. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    http: reqwest::Client,
    backend: VlmBackend,
    base_url: Url,
    root: Url,
    api_key: Option<ApiKey>,
    server_text: ServerText,
    /// Per-attempt timeout of inference requests.
    pub timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
    /// Timeout of each health probe.
    pub health_timeout: Duration,
    /// How inference requests are retried.
    pub retry: RetryPolicy,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("backend", &self.backend)
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &self.api_key)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Builds the transport (and its connection pool) from a client configuration, or uses the
    /// caller's `reqwest::Client` when the configuration carries one.
    pub fn new(config: &ClientConfig) -> Result<Self, VlmError> {
        config.validate()?;
        let http = match &config.http_client {
            Some(http) => http.clone(),
            None => build_http(config)?,
        };
        Ok(Transport {
            http,
            backend: config.backend,
            base_url: config.base_url.clone(),
            root: server_root(&config.base_url),
            api_key: config.api_key.clone(),
            server_text: ServerText::new(config.api_key.clone()),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            health_timeout: config.health_timeout,
            retry: RetryPolicy {
                max_retries: config.max_retries,
                retry_timeouts: config.retry_timeouts,
                ..RetryPolicy::default()
            },
        })
    }

    /// The backend this transport talks to.
    pub fn backend(&self) -> VlmBackend {
        self.backend
    }

    /// The normalised base URL.
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// A URL under the base URL (`models` → `http://h:p/v1/models`).
    pub fn endpoint(&self, path: &str) -> Url {
        join(&self.base_url, path)
    }

    /// The cleaner of server-supplied text (it redacts this transport's API key).
    pub fn server_text(&self) -> &ServerText {
        &self.server_text
    }

    /// How long a request of this budget may take.
    pub fn budget(&self, budget: Budget) -> Duration {
        match budget {
            Budget::Inference => self.timeout,
            Budget::Health => self.health_timeout,
        }
    }

    /// A URL under the server root (`health` → `http://h:p/health`; under a gateway's prefix,
    /// `http://gw/llama/v1` → `http://gw/llama/health`).
    pub fn root_endpoint(&self, path: &str) -> Url {
        join(&self.root, path)
    }

    /// The port the server is expected on (for start-command hints).
    pub fn port(&self) -> u16 {
        self.base_url.port_or_known_default().unwrap_or(80)
    }

    /// Sends a GET and reads the whole body.
    pub async fn get(
        &self,
        url: &Url,
        auth: Auth,
        budget: Budget,
    ) -> Result<RawResponse, VlmError> {
        let req = self.http.get(url.clone()).timeout(self.budget(budget));
        self.send(req, url, auth, budget).await
    }

    /// Sends a POST with a JSON body (already serialised) once and reads the whole body.
    pub async fn post_json(
        &self,
        url: &Url,
        body: impl Into<reqwest::Body>,
        budget: Budget,
    ) -> Result<RawResponse, VlmError> {
        let req = self
            .http
            .post(url.clone())
            .timeout(self.budget(budget))
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        self.send(req, url, Auth::Bearer, budget).await
    }

    /// POSTs an inference's JSON body under the [`RetryPolicy`]:
    ///
    /// - refused, reset before the request was written, or closed before any response byte
    ///   arrived: retried (that server can no longer deliver this answer);
    /// - 408/429/5xx gateway statuses: retried with backoff or after the server's `Retry-After`;
    /// - a timeout, or a response cut off after its headers: the server may have done the work,
    ///   so it is re-sent only when the policy's `retry_timeouts` says so.
    ///
    /// Returns the last answer or error.
    pub async fn post_json_with_retries(
        &self,
        url: &Url,
        body: Bytes,
    ) -> Result<RawResponse, VlmError> {
        let policy = &self.retry;
        let mut retry = 0u32;
        loop {
            let result = self.post_json(url, body.clone(), Budget::Inference).await;
            let (delay, why) = match &result {
                Ok(resp) if resp.is_success() || !retryable_status(resp.status) => return result,
                Ok(resp) => {
                    let why = format!("HTTP {}", resp.status);
                    match resp.retry_after {
                        Some(after) if after > policy.max_retry_after => {
                            tracing::warn!(
                                status = resp.status,
                                "the server asked to retry after {:.0} s, over the {:.0} s cap; not retrying",
                                after.as_secs_f64(),
                                policy.max_retry_after.as_secs_f64()
                            );
                            return result;
                        }
                        Some(after) => (after, why),
                        None => (policy.backoff(retry), why),
                    }
                }
                // The server may still be generating, or has finished: sending it again would
                // run the whole generation twice.
                Err(e) if e.may_have_run() && !policy.retry_timeouts => return result,
                Err(e) if e.is_retryable() => (policy.backoff(retry), err_note(e)),
                Err(_) => return result,
            };
            if retry >= policy.max_retries {
                if retry > 0 {
                    tracing::warn!("giving up on {url} after {} attempts: {why}", retry + 1);
                }
                return result;
            }
            retry += 1;
            tracing::warn!(
                attempt = retry + 1,
                of = policy.max_retries + 1,
                delay_ms = delay.as_millis() as u64,
                "{why} from the {} server; retrying",
                self.backend
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// POSTs a JSON body for a streamed answer: waits at most `timeout` for the response
    /// headers, decodes a non-2xx answer into an error, and returns the response whose body is
    /// the event stream (no reqwest timeout: the caller bounds the whole stream and each wait
    /// for a chunk).
    pub async fn post_json_streaming(
        &self,
        url: &Url,
        body: Bytes,
        timeout: Duration,
    ) -> Result<reqwest::Response, VlmError> {
        let mut req = self
            .http
            .post(url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                reqwest::header::ACCEPT,
                HeaderValue::from_static("text/event-stream"),
            )
            .body(body);
        req = self.authorize(req, Auth::Bearer)?;
        let timed_out = || VlmError::Timeout {
            backend: self.backend,
            url: url.to_string(),
            after: timeout,
            setting: Budget::Inference.setting(),
            source: None,
        };
        // One deadline for the headers and an error body alike.
        let deadline = tokio::time::Instant::now() + timeout;
        let resp = match tokio::time::timeout_at(deadline, req.send()).await {
            Err(_) => return Err(timed_out()),
            Ok(sent) => sent.map_err(|e| self.map_send_error(e, url, Budget::Inference))?,
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        // The error body is bounded in size and in time like any other: a proxy that sends
        // 502 headers and then stalls must not hang the caller.
        let read = tokio::time::timeout_at(deadline, self.read_whole(resp, url, Budget::Inference));
        match read.await {
            Ok(Ok(raw)) => Err(self.http_error(&raw)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(timed_out()),
        }
    }

    fn authorize(
        &self,
        req: reqwest::RequestBuilder,
        auth: Auth,
    ) -> Result<reqwest::RequestBuilder, VlmError> {
        match (auth, &self.api_key) {
            (Auth::Bearer, Some(key)) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .map_err(|_| {
                        VlmError::config(
                            "the API key contains characters not allowed in an HTTP header; \
                             check VLM_API_KEY / vlm_<backend>_api_key",
                        )
                    })?;
                value.set_sensitive(true);
                Ok(req.header(AUTHORIZATION, value))
            }
            _ => Ok(req),
        }
    }

    async fn send(
        &self,
        mut req: reqwest::RequestBuilder,
        url: &Url,
        auth: Auth,
        budget: Budget,
    ) -> Result<RawResponse, VlmError> {
        req = self.authorize(req, auth)?;
        let resp = req
            .send()
            .await
            .map_err(|e| self.map_send_error(e, url, budget))?;
        self.read_whole(resp, url, budget).await
    }

    /// Reads a response whole, refusing a body over [`MAX_RESPONSE_BYTES`]. A failure here
    /// comes after the headers: a timeout, or [`VlmError::ResponseCut`].
    async fn read_whole(
        &self,
        mut resp: reqwest::Response,
        url: &Url,
        budget: Budget,
    ) -> Result<RawResponse, VlmError> {
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        let content_type = header(CONTENT_TYPE.as_str()).map(str::to_owned);
        let retry_after = parse_retry_after(header("retry-after-ms"), header("retry-after"));
        if let Some(len) = resp.content_length()
            && len > MAX_RESPONSE_BYTES as u64
        {
            return Err(self.too_large(url, status));
        }
        let mut body: Vec<u8> = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(self.too_large(url, status));
                    }
                    if body.is_empty() && resp.content_length().is_none() {
                        body.reserve(chunk.len());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(self.map_send_error(e, url, budget)),
                Err(e) => {
                    return Err(VlmError::ResponseCut {
                        backend: self.backend,
                        url: url.to_string(),
                        status,
                        reason: format!("after {} bytes: {}", body.len(), error_chain(&e)),
                        source: Some(Box::new(e)),
                    });
                }
            }
        }
        Ok(RawResponse {
            url: url.clone(),
            status,
            content_type,
            body: Bytes::from(body),
            retry_after,
        })
    }

    /// GETs a route on the server root without the API key (health routes are open on every
    /// server) and records the probe in `probes`.
    pub async fn probe(
        &self,
        path: &str,
        probes: &mut Vec<HealthProbe>,
    ) -> Result<RawResponse, VlmError> {
        let url = self.root_endpoint(path);
        let route = format!("GET {}", url.path());
        match self.get(&url, Auth::None, Budget::Health).await {
            Ok(resp) => {
                let note = if resp.is_success() {
                    self.server_text.snippet(&resp.body, 80)
                } else {
                    err_note(&self.http_error(&resp))
                };
                probes.push(HealthProbe {
                    route,
                    status: Some(resp.status),
                    note,
                });
                Ok(resp)
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

    fn too_large(&self, url: &Url, status: u16) -> VlmError {
        VlmError::Protocol {
            backend: self.backend,
            url: url.to_string(),
            message: format!(
                "HTTP {status} with a body over {MAX_RESPONSE_BYTES} bytes; a proxy or the \
                 server is misbehaving"
            ),
        }
    }

    /// Maps a reqwest failure before the response headers to `Unreachable` (nothing was sent:
    /// refused, DNS, or no connection within the connect timeout), `Timeout`, or `Transport`.
    pub fn map_send_error(&self, e: reqwest::Error, url: &Url, budget: Budget) -> VlmError {
        let url_s = url.to_string();
        // reqwest marks a connect timeout both `is_connect` and `is_timeout`: it is a
        // connection that never happened, governed by the connect timeout.
        if e.is_connect() {
            let reason = if e.is_timeout() {
                format!(
                    "no connection within {:.1} s (vlm_connect_timeout; raise it with \
                     `--vlm-connect-timeout` if the network is slow, or check that nothing \
                     drops the connection on the way)",
                    self.connect_timeout.as_secs_f64()
                )
            } else {
                error_chain(&e)
            };
            VlmError::Unreachable {
                backend: self.backend,
                url: url_s,
                reason,
                start_command: self.backend.start_command(self.port()),
                source: Some(Box::new(e)),
            }
        } else if e.is_timeout() {
            VlmError::Timeout {
                backend: self.backend,
                url: url_s,
                after: self.budget(budget),
                setting: budget.setting(),
                source: Some(Box::new(e)),
            }
        } else {
            VlmError::Transport {
                backend: self.backend,
                url: url_s,
                reason: error_chain(&e),
                source: Some(Box::new(e)),
            }
        }
    }

    /// The `VlmError::Http` for a non-2xx response, decoding the body's error shape. The
    /// server's message is cleaned: the API key redacted, control characters escaped, the length
    /// capped at [`MAX_MESSAGE_BYTES`].
    pub fn http_error(&self, resp: &RawResponse) -> VlmError {
        // Redacted before decoding: a snippet of a non-JSON body must not hold half a key.
        let body = self.server_text.redact_bytes(&resp.body);
        let decoded = decode_error_body(resp.content_type.as_deref(), &body);
        VlmError::Http {
            backend: self.backend,
            url: resp.url.to_string(),
            status: resp.status,
            message: self.server_text.clean(&decoded.message, MAX_MESSAGE_BYTES),
            kind: decoded.kind.map(|k| self.server_text.clean(&k, 200)),
        }
    }
}

fn build_http(config: &ClientConfig) -> Result<reqwest::Client, VlmError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .user_agent(concat!("imageworks-vlm/", env!("CARGO_PKG_VERSION")));
    if is_loopback(&config.base_url) {
        // No proxy can reach this machine's loopback; an HTTP_PROXY set for the internet must
        // not swallow requests to a local server.
        builder = builder.no_proxy();
    }
    builder.build().map_err(|e| {
        VlmError::config(format!(
            "cannot set up the HTTP client: {e}; check the TLS and proxy environment"
        ))
    })
}

fn join(base: &Url, path: &str) -> Url {
    // Bases always end with '/', and paths here are fixed relative strings.
    base.join(path.trim_start_matches('/'))
        .unwrap_or_else(|_| base.clone())
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The error and its sources, joined, without the URL (which the caller shows once).
fn error_chain(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut parts = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.contains(&s) {
            parts.push(s);
        }
        cur = err.source();
    }
    if parts.is_empty() {
        parts.push(e.without_url_string());
    }
    parts.join(": ")
}

trait WithoutUrl {
    fn without_url_string(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_string(&self) -> String {
        let mut s = self.to_string();
        if let Some(url) = self.url() {
            s = s.replace(&format!(" ({url})"), "");
        }
        s
    }
}
