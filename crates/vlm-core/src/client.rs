//! The `VlmClient` trait every backend implements.

use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use url::Url;

use crate::backend::VlmBackend;
use crate::error::VlmError;
use crate::health::{HealthReport, HealthState};
use crate::image::ImageMime;
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
///     println!("🤖 VLM: {}/{}", client.backend(), client.model().unwrap_or("?"));
///     Ok(answer.text)
/// }
/// ```
#[async_trait]
pub trait VlmClient: Send + Sync + fmt::Debug {
    /// Which server this client talks to.
    fn backend(&self) -> VlmBackend;

    /// The model requests go to: the configured one, or the one [`health`](Self::health)
    /// adopted because the server serves only it; `None` while not known yet.
    fn model(&self) -> Option<&str>;

    /// The base URL (`http://host:port/v1` for OpenAI-compatible servers, the root for Triton).
    fn base_url(&self) -> &Url;

    /// Whether this server takes images of this type; `Err` says why not and what to do (Ollama
    /// takes no GIF). Every type by default. Requests with such an image fail with
    /// [`VlmError::Image`] before anything is sent; callers can ask first.
    fn check_image_type(&self, mime: ImageMime) -> Result<(), String> {
        let _ = mime;
        Ok(())
    }

    /// Whether the model can take images from this client at all, asked once before a run:
    /// [`VlmError::Unsupported`] says what the model takes and what to run instead (a Triton
    /// model that wants preprocessed pixels, a text-only model, Triton's OpenAI frontend). Every
    /// OpenAI-compatible server can, so the default is `Ok`.
    async fn image_support(&self) -> Result<(), VlmError> {
        Ok(())
    }

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

    /// How many requests wait in the server's queue, where the server publishes it (vLLM's
    /// `vllm:num_requests_waiting`, LMDeploy's `lmdeploy:num_requests_waiting` (on by default
    /// since LMDeploy 0.11), SGLang's `sglang:num_queue_reqs` (with `--enable-metrics`, once its
    /// model list has shown the server is SGLang), all on `GET /metrics`); `None` where it does
    /// not or could not be read. Adaptive concurrency keeps it short.
    async fn queue_depth(&self) -> Option<f64> {
        None
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
