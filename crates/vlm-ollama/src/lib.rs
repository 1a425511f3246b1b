//! # vlm-ollama
//!
//! The [Ollama](https://github.com/ollama/ollama) client of ImageWorks VLM.
//!
//! - Health from Ollama's own routes, on the server root (under a gateway's prefix if there is
//!   one): `GET /` must answer `Ollama is running`; `GET /api/version` gives the version;
//!   `GET /api/tags` lists the pulled models. A configured model that is not pulled is Unhealthy
//!   with the fix (`ollama pull <model>`); `qwen2.5vl` means `qwen2.5vl:latest`, as Ollama
//!   itself reads it. With no model configured and one pulled, it is adopted.
//! - Inference over Ollama's OpenAI-compatible `/v1/chat/completions`. Ollama requires `model`,
//!   so it is always sent. Its thinking comes back in `reasoning`. Its data-URL parser takes only
//!   `image/jpeg`, `image/png` and `image/webp` (anything else is a bare "invalid image input"):
//!   a GIF is refused here, before anything is sent, with what to do.
//! - A base URL without `/v1` (`http://localhost:11434`, as ImageWorks writes it) gets `/v1`.
//!
//! ```no_run
//! use vlm_core::{ClientConfig, ImageInput, VlmBackend, VlmClient, VlmRequest};
//! use vlm_ollama::OllamaClient;
//!
//! # async fn run() -> Result<(), vlm_core::VlmError> {
//! let config = ClientConfig::new(VlmBackend::Ollama, "http://localhost:11434")?
//!     .with_model("qwen2.5vl:7b");
//! let client = OllamaClient::new(config)?;
//! println!("{}", client.health().await?);
//! let request = VlmRequest::builder("Describe this image.")
//!     .image(ImageInput::path("photo.jpg"))
//!     .build()?;
//! println!("{}", client.infer_single(&request).await?.text);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use serde_json::Value;
use vlm_core::openai::{OpenAiCompatible, OpenAiServer};
use vlm_core::support::{Transport, err_note, json_string_field, state_for_error};
use vlm_core::{
    HealthProbe, HealthReport, HealthState, ImageMime, VlmBackend, VlmError, async_trait,
};

/// What `GET /` answers on a running Ollama.
pub const ROOT_BANNER: &str = "Ollama is running";

/// Ollama (`ollama serve`): its health sequence, model names and image rules.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct Ollama;

/// A client for Ollama: [`OpenAiCompatible`] with Ollama's health sequence. Cheap to clone.
///
/// ```
/// use vlm_core::{ClientConfig, VlmBackend, VlmClient};
/// let config = ClientConfig::new(VlmBackend::Ollama, "http://localhost:11434").unwrap();
/// let client = vlm_ollama::OllamaClient::new(config).unwrap();
/// assert_eq!(client.base_url().as_str(), "http://localhost:11434/v1/");
/// ```
pub type OllamaClient = OpenAiCompatible<Ollama>;

/// `name` with Ollama's default tag: `qwen2.5vl` → `qwen2.5vl:latest`; a tagged name as it is.
/// The tag is what follows a `:` in the last path segment (`host:5000/ns/model` has none).
///
/// ```
/// assert_eq!(vlm_ollama::with_default_tag("qwen2.5vl"), "qwen2.5vl:latest");
/// assert_eq!(vlm_ollama::with_default_tag("qwen2.5vl:7b"), "qwen2.5vl:7b");
/// assert_eq!(vlm_ollama::with_default_tag("reg:5000/ns/llava"), "reg:5000/ns/llava:latest");
/// ```
pub fn with_default_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// The pulled models named in an `/api/tags` body: `{"models":[{"name":...}]}`.
fn pulled_models(body: &[u8]) -> Option<Vec<String>> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let models = match value.get("models")? {
        Value::Null => return Some(Vec::new()),
        Value::Array(models) => models,
        _ => return None,
    };
    Some(
        models
            .iter()
            .filter_map(|m| m.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect(),
    )
}

#[async_trait]
impl OpenAiServer for Ollama {
    const BACKEND: VlmBackend = VlmBackend::Ollama;
    // Ollama answers 400 "model is required" without one.
    const REQUIRES_MODEL: bool = true;

    async fn liveness(
        &self,
        transport: &Transport,
        report: &mut HealthReport,
    ) -> Option<HealthState> {
        let resp = match transport.probe("", &mut report.probes).await {
            Ok(resp) => resp,
            Err(err) => return Some(state_for_error(&err, "GET /")),
        };
        let banner = String::from_utf8_lossy(&resp.body);
        if !resp.is_success() || !banner.trim_start().starts_with(ROOT_BANNER) {
            return Some(HealthState::Unhealthy {
                reason: format!(
                    "GET {} answered {} without \"{ROOT_BANNER}\": is {} an Ollama server? Start \
                     one with `ollama serve`, or choose the backend that runs there",
                    transport.root_endpoint("").path(),
                    resp.status,
                    transport.root_endpoint("")
                ),
            });
        }
        if let Ok(resp) = transport.probe("api/version", &mut report.probes).await
            && resp.is_success()
        {
            report.server_version = json_string_field(&resp.body, "version");
        }
        None
    }

    async fn served_models(
        &self,
        transport: &Transport,
        probes: &mut Vec<HealthProbe>,
    ) -> Option<Result<Vec<String>, VlmError>> {
        let resp = match transport.probe("api/tags", probes).await {
            Ok(resp) => resp,
            Err(err) => return Some(Err(err)),
        };
        if !resp.is_success() {
            return Some(Err(transport.http_error(&resp)));
        }
        let listed = pulled_models(&resp.body).ok_or_else(|| VlmError::Protocol {
            backend: VlmBackend::Ollama,
            url: resp.url.to_string(),
            message: format!(
                "GET /api/tags is not {{\"models\":[{{\"name\":...}}]}}: {}",
                err_note(&transport.http_error(&resp))
            ),
        });
        if let (Ok(models), Some(probe)) = (&listed, probes.last_mut()) {
            probe.note = format!("pulled: {}", models.join(", "));
        }
        Some(listed)
    }

    fn same_model(&self, configured: &str, served: &str) -> bool {
        with_default_tag(configured) == with_default_tag(served)
    }

    fn not_served_advice(&self, model: &str) -> Option<String> {
        Some(format!("pull it with `ollama pull {model}`"))
    }

    fn check_image_type(&self, mime: ImageMime) -> Result<(), String> {
        match mime {
            ImageMime::Jpeg | ImageMime::Png | ImageMime::Webp => Ok(()),
            other => Err(format!(
                "Ollama takes only JPEG, PNG and WebP images ({} would be refused as \"invalid \
                 image input\"); convert it to PNG or JPEG",
                other.as_str()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_read_as_ollama_reads_them() {
        let o = Ollama;
        assert!(o.same_model("qwen2.5vl", "qwen2.5vl:latest"));
        assert!(o.same_model("qwen2.5vl:latest", "qwen2.5vl"));
        assert!(o.same_model("qwen2.5vl:7b", "qwen2.5vl:7b"));
        assert!(!o.same_model("qwen2.5vl:7b", "qwen2.5vl:latest"));
        assert!(!o.same_model("llava", "llava-phi3:latest"));
    }

    #[test]
    fn the_tags_body_lists_names_and_null_is_none() {
        let body = br#"{"models":[{"name":"qwen2.5vl:7b","model":"qwen2.5vl:7b","size":1},{"name":"llava:latest"}]}"#;
        assert_eq!(
            pulled_models(body),
            Some(vec!["qwen2.5vl:7b".to_owned(), "llava:latest".to_owned()])
        );
        assert_eq!(pulled_models(br#"{"models":null}"#), Some(vec![]));
        assert_eq!(pulled_models(b"404 page not found"), None);
    }

    #[test]
    fn gif_is_refused_with_what_to_do() {
        let why = Ollama.check_image_type(ImageMime::Gif).unwrap_err();
        assert!(
            why.contains("JPEG, PNG and WebP") && why.contains("convert"),
            "{why}"
        );
        assert!(Ollama.check_image_type(ImageMime::Webp).is_ok());
    }
}

/// The README's example, compiled as a doctest so that it cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
