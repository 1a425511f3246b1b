//! # vlm-vllm
//!
//! The [vLLM](https://github.com/vllm-project/vllm) client of ImageWorks VLM.
//!
//! - Health: `GET /health` on the server root (200 with an empty body; 503 only when the engine
//!   died), `GET /version`, then `GET /v1/models` must list the configured model (a typo in the
//!   model name is the commonest mistake, and vLLM only answers 404 at inference). With no model
//!   configured, the only served model is adopted.
//! - Inference: OpenAI chat completions with images as `data:` URLs. vLLM makes `model`
//!   optional, so it is omitted while unknown and the answering model is adopted.
//!
//! ```no_run
//! use vlm_core::{ClientConfig, ImageInput, VlmBackend, VlmClient, VlmRequest};
//! use vlm_vllm::VllmClient;
//!
//! # async fn run() -> Result<(), vlm_core::VlmError> {
//! let config = ClientConfig::new(VlmBackend::Vllm, "http://localhost:8000/v1")?
//!     .with_model("Qwen/Qwen2-VL-2B-Instruct");
//! let client = VllmClient::new(config)?;
//! println!("{}", client.health().await?);
//! let request = VlmRequest::builder("Describe this image.")
//!     .image(ImageInput::path("photo.jpg"))
//!     .build()?;
//! println!("{}", client.infer_single(&request).await?.text);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use vlm_core::openai::{OpenAiChat, err_note, json_string_field, state_for_error};
use vlm_core::transport::Transport;
use vlm_core::{
    ClientConfig, HealthReport, HealthState, ModelSlot, Url, VlmBackend, VlmClient, VlmError,
    VlmRequest, VlmResponse, VlmStream, async_trait,
};

/// A client for vLLM's OpenAI-compatible server (`vllm serve <model>`).
#[derive(Debug)]
pub struct VllmClient {
    chat: OpenAiChat,
    model: ModelSlot,
}

impl VllmClient {
    /// Builds the client (and its connection pool). Nothing is sent until the first call.
    ///
    /// ```
    /// use vlm_core::{ClientConfig, VlmBackend, VlmClient};
    /// let config = ClientConfig::new(VlmBackend::Vllm, "localhost:8000").unwrap();
    /// let client = vlm_vllm::VllmClient::new(config).unwrap();
    /// assert_eq!(client.base_url().as_str(), "http://localhost:8000/v1/");
    /// assert_eq!(client.model(), "");
    /// ```
    pub fn new(config: ClientConfig) -> Result<Self, VlmError> {
        let mut config = config;
        config.base_url = vlm_core::normalize_base_url(VlmBackend::Vllm, config.base_url.as_str())?;
        config.backend = VlmBackend::Vllm;
        Ok(VllmClient {
            chat: OpenAiChat {
                transport: Transport::new(&config)?,
                max_image_bytes: config.max_image_bytes,
            },
            model: ModelSlot::new(config.model),
        })
    }
}

#[async_trait]
impl VlmClient for VllmClient {
    fn backend(&self) -> VlmBackend {
        VlmBackend::Vllm
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
            VlmBackend::Vllm,
            transport.base_url().clone(),
            HealthState::Ready,
        );
        report.model = self.model.configured().map(str::to_owned);
        match transport.probe("health", &mut report.probes).await {
            Err(err) => {
                report.state = state_for_error(&err, "GET /health");
                return Ok(report);
            }
            Ok(resp) if resp.is_success() => {}
            Ok(resp) if resp.status == 503 => {
                // vLLM answers 503 on /health only when the engine has died; it does not
                // recover by itself.
                report.state = HealthState::Unhealthy {
                    reason: "GET /health answered 503: the vLLM engine is dead; restart the \
                             server and check its log"
                        .to_owned(),
                };
                return Ok(report);
            }
            Ok(resp) => {
                let err = transport.http_error(&resp);
                report.state = HealthState::Unhealthy {
                    reason: format!(
                        "GET /health answered {}: {}; is {} a vLLM server?",
                        resp.status,
                        err_note(&err),
                        transport.root_endpoint("")
                    ),
                };
                return Ok(report);
            }
        }
        if let Ok(resp) = transport.probe("version", &mut report.probes).await
            && resp.is_success()
        {
            report.server_version = json_string_field(&resp.body, "version");
        }
        self.chat.check_models(&mut report, &self.model).await?;
        Ok(report)
    }

    async fn infer_single(&self, request: &VlmRequest) -> Result<VlmResponse, VlmError> {
        // vLLM's `model` is optional: while unknown, omit it and let the server use its model.
        let model = self.model.is_known().then(|| self.model.get());
        let response = self.chat.chat(request, model).await?;
        if !self.model.is_known() && !response.model.is_empty() {
            self.model.adopt(&response.model);
        }
        Ok(response)
    }

    async fn infer_stream(&self, request: &VlmRequest) -> Result<VlmStream, VlmError> {
        let model = self.model.is_known().then(|| self.model.get());
        self.chat.chat_stream(request, model).await
    }
}
