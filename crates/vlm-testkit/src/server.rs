//! The emulator server: a hyper HTTP/1.1 server on 127.0.0.1, one per emulated backend.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vlm_core::VlmBackend;

use crate::routes;

/// The model an emulator serves when none is given.
pub fn default_model(backend: VlmBackend) -> &'static str {
    match backend {
        VlmBackend::Triton => "ensemble",
        VlmBackend::Ollama => "qwen2.5vl:7b",
        _ => "Qwen/Qwen2-VL-2B-Instruct",
    }
}

impl std::str::FromStr for OpenAiFlavor {
    type Err = String;

    /// `sglang`, `llama-cpp` (or `llama.cpp`, `llama-server`), `trtllm-serve`, `lm-studio`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sglang" => Ok(OpenAiFlavor::Sglang),
            "llama-cpp" | "llama.cpp" | "llamacpp" | "llama-server" => Ok(OpenAiFlavor::LlamaCpp),
            "trtllm-serve" | "trtllm" => Ok(OpenAiFlavor::TrtllmServe),
            "lm-studio" | "lmstudio" => Ok(OpenAiFlavor::LmStudio),
            other => Err(format!(
                "unknown --flavor {other:?}: expected sglang, llama-cpp, trtllm-serve or lm-studio"
            )),
        }
    }
}

/// Which OpenAI-compatible server an `openai` emulator is, for the routes beside chat
/// completions and the error shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OpenAiFlavor {
    /// SGLang (`python -m sglang.launch_server`): `/health` (empty 200), `/get_model_info`,
    /// `owned_by: "sglang"`, flat errors; `model` optional.
    #[default]
    Sglang,
    /// llama.cpp's `llama-server`: `/health` `{"status":"ok"}` (503 "Loading model" on every
    /// route while loading), `/props`, `owned_by: "llamacpp"`, `Server: llama.cpp`; `model`
    /// ignored.
    LlamaCpp,
    /// TensorRT-LLM's `trtllm-serve`: `/health` (empty 200), `/version`,
    /// `owned_by: "tensorrt_llm"`; `model` required.
    TrtllmServe,
    /// LM Studio's server (`lms server start`): no `/health`, since every unknown route is a
    /// 200 `{"error":"Unexpected endpoint or method. (GET /health)"}`; `GET /lmstudio-greeting`;
    /// model entries `owned_by: "organization_owner"` with no `created`; OpenAI's nested
    /// errors; `model` optional with one model loaded.
    LmStudio,
}

/// How to start an emulator.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmulatorConfig {
    /// The server to emulate.
    pub backend: VlmBackend,
    /// The port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// The one model served.
    pub model: String,
    /// When set, requests must carry `Authorization: Bearer <key>` where the real server asks.
    pub api_key: Option<String>,
    /// Fixed-answer mode for benchmarks: chat requests are read but not parsed, decoded or
    /// recorded, and answered with one precomputed completion.
    pub fast: bool,
    /// Serve every route under this path prefix, as a gateway or an ingress does
    /// (`/llama`: `/llama/health`, `/llama/v1/models`); anything else is a gateway's 404.
    pub prefix: Option<String>,
    /// For `VlmBackend::OpenAi`: which server it is.
    pub flavor: OpenAiFlavor,
    /// Answer as a server still loading its model for this long after start (llama.cpp: 503
    /// "Loading model" on every route).
    pub loading_for: Duration,
    /// For `VlmBackend::Triton`: which model repository it serves.
    pub triton_model: crate::TritonModel,
    /// A capacity model for chat completions (none: every request is answered at once).
    pub capacity: Option<crate::Capacity>,
}

impl EmulatorConfig {
    /// Port 0, the backend's default model, no API key.
    pub fn new(backend: VlmBackend) -> Self {
        EmulatorConfig {
            backend,
            port: 0,
            model: default_model(backend).to_owned(),
            api_key: None,
            fast: false,
            prefix: None,
            flavor: OpenAiFlavor::default(),
            loading_for: Duration::ZERO,
            triton_model: crate::TritonModel::default(),
            capacity: None,
        }
    }

    /// Answers chat completions as a server of this capacity would (see [`crate::Capacity`]).
    pub fn with_capacity(mut self, capacity: crate::Capacity) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// For Triton: serve this kind of model.
    pub fn with_triton_model(mut self, kind: crate::TritonModel) -> Self {
        self.triton_model = kind;
        self
    }

    /// For the `openai` backend: emulate this server.
    pub fn with_flavor(mut self, flavor: OpenAiFlavor) -> Self {
        self.flavor = flavor;
        self
    }

    /// Answers as a server still loading its model for `d` after start.
    pub fn loading_for(mut self, d: Duration) -> Self {
        self.loading_for = d;
        self
    }

    /// Serves every route under `prefix` (e.g. `/llama`), as behind a gateway.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        let trimmed = prefix.trim_matches('/');
        self.prefix = (!trimmed.is_empty()).then(|| format!("/{trimmed}"));
        self
    }

    /// Serves this model.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// Listens on this port.
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Fixed-answer mode (see [`EmulatorConfig::fast`]).
    pub fn with_fast(mut self, fast: bool) -> Self {
        self.fast = fast;
        self
    }

    /// Requires this API key.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }
}

/// Why an emulator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// The port could not be bound (busy, or not permitted).
    #[error(
        "cannot listen on 127.0.0.1:{port}: {source}; choose another --port or 0 for any free one"
    )]
    Bind {
        /// The port asked for.
        port: u16,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A fault to inject into the next chat-completions call.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this status, content type, body and extra headers.
    Status {
        /// The HTTP status.
        status: u16,
        /// The `Content-Type`.
        content_type: String,
        /// The body.
        body: String,
        /// Extra headers, e.g. `Retry-After`.
        headers: Vec<(String, String)>,
    },
    /// Never answer (until the client gives up or the emulator stops).
    Hang,
    /// Send the headers and part of the body, then close the connection.
    DropMidBody,
    /// Send this status's headers (promising a body), then nothing, until the client gives up:
    /// a proxy that stalls.
    StallAfterHeaders(u16),
    /// LMDeploy <= 0.15: HTTP 200 whose choice has `finish_reason: "error"` and this content.
    FinishReasonError(String),
    /// Wait this long before answering normally.
    Delay(Duration),
    /// A streamed answer that never ends: one token every interval, forever (a request that
    /// does not stream hangs instead).
    Trickle(Duration),
    /// Close the connection after reading the request, before any response byte (a server
    /// that died, a proxy that gave up).
    CloseWithoutResponse,
    /// Answer 401 with an error message that echoes the request's `Authorization` header, as
    /// some proxies do.
    EchoAuthorization,
    /// Under a JSON schema, answer prose instead of JSON (a model without constrained
    /// decoding); without a schema, answer as usual.
    NotJson,
}

impl Fault {
    /// 503 in the backend's error shape ("the server is overloaded").
    pub fn unavailable() -> Self {
        Fault::Status {
            status: 503,
            content_type: "application/json".into(),
            body: r#"{"error":{"message":"The server is temporarily overloaded","type":"ServiceUnavailableError","param":null,"code":503}}"#.into(),
            headers: Vec::new(),
        }
    }

    /// 429 with `Retry-After: <seconds>`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Fault::Status {
            status: 429,
            content_type: "application/json".into(),
            body: r#"{"error":{"message":"Too many requests","type":"RateLimitError","param":null,"code":429}}"#.into(),
            headers: vec![("retry-after".into(), retry_after_secs.to_string())],
        }
    }

    /// A proxy's HTML 502 page.
    pub fn html_bad_gateway() -> Self {
        Fault::Status {
            status: 502,
            content_type: "text/html".into(),
            body: "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n".into(),
            headers: Vec::new(),
        }
    }
}

/// A request the emulator received.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RecordedRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The headers, names lower-case, in order.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON, when it was JSON.
    pub json: Option<Value>,
    /// The body's length in bytes.
    pub body_len: usize,
    /// When the whole request had arrived.
    pub received_at: std::time::Instant,
}

impl RecordedRequest {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub(crate) queue: VecDeque<Fault>,
    pub(crate) delay: Duration,
    /// Delay of every route but chat completions (health, models, version).
    pub(crate) other_delay: Duration,
}

/// State shared by the accept loop and the handlers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) backend: VlmBackend,
    pub(crate) model: String,
    pub(crate) api_key: Option<String>,
    pub(crate) fast: bool,
    pub(crate) prefix: Option<String>,
    pub(crate) flavor: OpenAiFlavor,
    pub(crate) triton_model: crate::TritonModel,
    pub(crate) loading_until: std::time::Instant,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) requests: Mutex<Vec<RecordedRequest>>,
    pub(crate) counter: std::sync::atomic::AtomicU64,
    pub(crate) capacity: Option<crate::capacity::CapacityState>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler must not take the emulator down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running emulator. It stops (and its port closes) when dropped.
///
/// ```
/// use vlm_testkit::{Emulator, EmulatorConfig};
/// use vlm_core::VlmBackend;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let emulator = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm)).await.unwrap();
/// assert!(emulator.base_url().starts_with("http://127.0.0.1:"));
/// assert!(emulator.base_url().ends_with("/v1"));
/// # }
/// ```
#[derive(Debug)]
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Emulator {
    /// Binds 127.0.0.1 and starts serving.
    pub async fn start(config: EmulatorConfig) -> Result<Self, EmulatorError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, config.port))
            .await
            .map_err(|source| EmulatorError::Bind {
                port: config.port,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                port: config.port,
                source,
            })?;
        let shared = Arc::new(Shared::new(&config));
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(Emulator { addr, shared, task })
    }

    /// "Still loading": the port stays closed (connections refused, as vLLM and LMDeploy do
    /// while loading a model) for `delay`, then the emulator starts listening on it.
    pub async fn start_after(
        config: EmulatorConfig,
        delay: Duration,
    ) -> Result<Self, EmulatorError> {
        let port = config.port;
        let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .map_err(|source| EmulatorError::Bind { port, source })?;
        let addr = probe
            .local_addr()
            .map_err(|source| EmulatorError::Bind { port, source })?;
        drop(probe);
        let shared = Arc::new(Shared::new(&config));
        let inner = shared.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for _ in 0..50 {
                if let Ok(listener) = TcpListener::bind(addr).await {
                    serve(listener, inner).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::error!("emulator could not bind {addr} after its start-up delay");
        });
        Ok(Emulator { addr, shared, task })
    }

    /// The value to give `--vlm-base-url`: `http://127.0.0.1:P/v1` for vLLM and LMDeploy,
    /// `http://127.0.0.1:P` for Triton.
    /// Behind a prefix: `http://127.0.0.1:P/PREFIX/v1`.
    pub fn base_url(&self) -> String {
        match self.shared.backend {
            VlmBackend::Triton => self.root_url(),
            _ => format!("{}/v1", self.root_url()),
        }
    }

    /// The server root, `http://127.0.0.1:P` (with the prefix, if any).
    pub fn root_url(&self) -> String {
        format!(
            "http://{}{}",
            self.addr,
            self.shared.prefix.as_deref().unwrap_or("")
        )
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend emulated.
    pub fn backend(&self) -> VlmBackend {
        self.shared.backend
    }

    /// The model served.
    pub fn model(&self) -> &str {
        &self.shared.model
    }

    /// Injects `fault` into the next chat-completions call (faults queue up in order).
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.shared.faults).queue.push_back(fault);
    }

    /// Injects `fault` into each of the next `n` chat-completions calls.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut faults = lock(&self.shared.faults);
        for _ in 0..n {
            faults.queue.push_back(fault.clone());
        }
    }

    /// Delays every chat-completions answer by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared.faults).delay = delay;
    }

    /// Delays every answer but chat completions (health probes, model lists) by `delay`.
    pub fn delay_other_routes(&self, delay: Duration) {
        lock(&self.shared.faults).other_delay = delay;
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// The chat-completions requests received so far.
    pub fn chat_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/chat/completions"))
            .collect()
    }

    /// What the capacity model did, when there is one.
    pub fn capacity_stats(&self) -> Option<crate::CapacityStats> {
        self.shared.capacity.as_ref().map(|c| c.stats())
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }
}

impl Shared {
    fn new(config: &EmulatorConfig) -> Self {
        Shared {
            backend: config.backend,
            model: config.model.clone(),
            api_key: config.api_key.clone().filter(|k| !k.is_empty()),
            fast: config.fast,
            prefix: config.prefix.clone(),
            flavor: config.flavor,
            triton_model: config.triton_model,
            loading_until: std::time::Instant::now() + config.loading_for,
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
            counter: std::sync::atomic::AtomicU64::new(0),
            capacity: config.capacity.map(crate::capacity::CapacityState::new),
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in this set: aborting the accept task aborts them all.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("emulator accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move {
                    let resp = routes::handle(shared, req).await;
                    // A service error makes hyper close the connection without answering.
                    if resp.extensions().get::<CloseConnection>().is_some() {
                        return Err(CloseConnection);
                    }
                    Ok(resp)
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("emulator connection ended: {e}");
            }
        });
    }
}

/// Marks a response that must not be sent: the connection is closed instead.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CloseConnection;

impl std::fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the emulator closed the connection without answering (fault)")
    }
}

impl std::error::Error for CloseConnection {}

/// A response body: whole, or streamed from a channel (SSE, or a body cut short).
#[derive(Debug)]
pub(crate) enum Body {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        Body::Full(Some(bytes.into()))
    }

    pub(crate) fn empty() -> Self {
        Body::Full(None)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Body::Channel(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Full(Some(b)) => http_body::SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => http_body::SizeHint::with_exact(0),
            Body::Channel(_) => http_body::SizeHint::default(),
        }
    }
}

pub(crate) type Resp = Response<Body>;
