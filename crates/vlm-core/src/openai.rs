//! The OpenAI chat-completions protocol: the one payload builder, response parsing, model lists
//! and the decoding of every error-body shape vLLM, LMDeploy, Triton and proxies send.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::backend::VlmBackend;
use crate::client::ModelSlot;
use crate::error::VlmError;
use crate::health::{HealthProbe, HealthReport, HealthState};
use crate::image::{LoadedImage, engine};
use crate::request::VlmRequest;
use crate::response::{Usage, VlmResponse};
use crate::text::{MAX_MESSAGE_BYTES, ServerText, body_snippet, shown_model};
use crate::transport::{Auth, Budget, RawResponse, Transport};

/// Options of the payload that depend on the backend, not the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct PayloadOptions<'a> {
    /// The `model` field; omitted when `None` (vLLM then uses its first served model).
    pub model: Option<&'a str>,
    /// Sets `"stream": true` and `stream_options.include_usage`; `stream_options` is never
    /// sent otherwise (vLLM answers 400 to `stream_options` without `stream`).
    pub stream: bool,
}

/// Writes the chat-completions JSON body for `request` with its `images` already loaded.
///
/// This is the only place that writes the payload: one optional system message, then one user
/// message whose content is the text part followed by one `image_url` part per image, each a
/// `data:<mime>;base64,<...>` URL encoded straight into the pre-sized buffer (the base64 alphabet
/// needs no JSON escaping), then the sampling parameters and the `extra` fields at the top level.
///
/// ```
/// use vlm_core::openai::{build_chat_body, PayloadOptions};
/// use vlm_core::{ImageMime, LoadedImage, VlmRequest};
///
/// let request = VlmRequest::builder("What colour is it?").max_tokens(50).build().unwrap();
/// let image = LoadedImage::Inline { data: b"GIF89a".to_vec().into(), mime: ImageMime::Gif };
/// let body = build_chat_body(&request, &[image], PayloadOptions { model: Some("m"), stream: false })
///     .unwrap();
/// let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
/// assert_eq!(json["messages"][0]["content"][1]["image_url"]["url"], "data:image/gif;base64,R0lGODlh");
/// ```
pub fn build_chat_body(
    request: &VlmRequest,
    images: &[LoadedImage],
    options: PayloadOptions<'_>,
) -> Result<Vec<u8>, VlmError> {
    request.validate()?;
    let encoded_images: usize = images
        .iter()
        .map(|img| match img {
            LoadedImage::Inline { data, .. } => {
                base64::encoded_len(data.len(), true).unwrap_or(0) + 96
            }
            LoadedImage::Url(u) => u.len() + 96,
        })
        .sum();
    let text_len = request.prompt.len() + request.system_prompt.as_ref().map_or(0, String::len);
    let mut out: Vec<u8> = Vec::with_capacity(encoded_images + text_len + text_len / 8 + 256);

    out.push(b'{');
    if let Some(model) = options.model {
        out.extend_from_slice(b"\"model\":");
        write_json_str(&mut out, model);
        out.push(b',');
    }
    out.extend_from_slice(b"\"messages\":[");
    if let Some(system) = &request.system_prompt {
        out.extend_from_slice(b"{\"role\":\"system\",\"content\":");
        write_json_str(&mut out, system);
        out.extend_from_slice(b"},");
    }
    out.extend_from_slice(b"{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":");
    write_json_str(&mut out, &request.prompt);
    out.push(b'}');
    for image in images {
        out.extend_from_slice(b",{\"type\":\"image_url\",\"image_url\":{\"url\":");
        match image {
            LoadedImage::Inline { data, mime } => {
                out.extend_from_slice(b"\"data:");
                out.extend_from_slice(mime.as_str().as_bytes());
                out.extend_from_slice(b";base64,");
                let start = out.len();
                let len = base64::encoded_len(data.len(), true).ok_or_else(|| VlmError::Image {
                    source_name: "<request>".into(),
                    message: "too large to encode".into(),
                })?;
                out.resize(start + len, 0);
                engine()
                    .encode_slice(data, &mut out[start..])
                    .map_err(|e| VlmError::Image {
                        source_name: "<request>".into(),
                        message: format!("base64 encoding failed: {e}"),
                    })?;
                out.push(b'"');
            }
            LoadedImage::Url(url) => write_json_str(&mut out, url),
        }
        out.extend_from_slice(b"}}");
    }
    out.extend_from_slice(b"]}]");

    if let Some(n) = request.max_tokens {
        write_field(&mut out, "max_tokens", &n)?;
    }
    if let Some(t) = request.temperature {
        write_field(&mut out, "temperature", &t)?;
    }
    if let Some(p) = request.top_p {
        write_field(&mut out, "top_p", &p)?;
    }
    if !request.stop.is_empty() {
        write_field(&mut out, "stop", &request.stop)?;
    }
    if let Some(seed) = request.seed {
        write_field(&mut out, "seed", &seed)?;
    }
    if let Some(format) = &request.response_format {
        write_field(&mut out, "response_format", &format.to_json())?;
    }
    if options.stream {
        out.extend_from_slice(b",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    }
    for (key, value) in &request.extra {
        out.push(b',');
        write_json_str(&mut out, key);
        out.push(b':');
        serde_json::to_writer(&mut out, value).map_err(serialise_error)?;
    }
    out.push(b'}');
    Ok(out)
}

fn serialise_error(e: serde_json::Error) -> VlmError {
    VlmError::config(format!("cannot serialise a request field: {e}"))
}

fn write_field<T: serde::Serialize>(
    out: &mut Vec<u8>,
    key: &str,
    value: &T,
) -> Result<(), VlmError> {
    out.push(b',');
    write_json_str(out, key);
    out.push(b':');
    serde_json::to_writer(&mut *out, value).map_err(serialise_error)
}

/// Writes `s` as a JSON string literal, escaping once, copying runs that need no escape.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most strings (a pre-encoded `data:` URL above all) need no escape: one branch-free scan,
    // then one copy.
    if !bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    }) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The message and type decoded from an error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedError {
    /// The server's message (or a description of a body that had none).
    pub message: String,
    /// The server's error type, when given.
    pub kind: Option<String>,
}

/// Decodes every error-body shape seen from these servers and the proxies in front of them:
///
/// - vLLM (current): `{"error":{"message","type","param","code"}}`
/// - vLLM (old) and LMDeploy: `{"object":"error","message","type","param","code"}`
/// - vLLM's auth middleware and Triton: `{"error":"Unauthorized"}` (a string)
/// - FastAPI: `{"detail":"Not Found"}` or `{"detail":[{"loc","msg","type"}]}`
/// - anything else (an HTML page from a proxy, plain text, nothing): the content type and the
///   first bytes, so the status and what was said are never lost.
///
/// ```
/// use vlm_core::openai::decode_error_body;
///
/// let nested = br#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":"model","code":404}}"#;
/// let d = decode_error_body(Some("application/json"), nested);
/// assert_eq!(d.message, "The model `x` does not exist.");
/// assert_eq!(d.kind.as_deref(), Some("NotFoundError"));
///
/// let html = b"<html><body><h1>502 Bad Gateway</h1></body></html>";
/// let d = decode_error_body(Some("text/html"), html);
/// assert!(d.message.contains("502 Bad Gateway"));
/// ```
pub fn decode_error_body(content_type: Option<&str>, body: &[u8]) -> DecodedError {
    if let Ok(value) = serde_json::from_slice::<Value>(body)
        && let Some(decoded) = decode_json_error(&value)
    {
        return decoded;
    }
    let ct = content_type.unwrap_or("no content type");
    let message = if body.iter().all(u8::is_ascii_whitespace) {
        format!("empty body ({ct})")
    } else {
        format!("non-JSON body ({ct}): {}", body_snippet(body, 200))
    };
    DecodedError {
        message,
        kind: None,
    }
}

fn decode_json_error(value: &Value) -> Option<DecodedError> {
    let obj = value.as_object()?;
    let kind_of = |o: &serde_json::Map<String, Value>| {
        o.get("type").and_then(Value::as_str).map(str::to_owned)
    };
    match obj.get("error") {
        Some(Value::Object(inner)) => {
            let message = inner
                .get("message")
                .map(value_text)
                .unwrap_or_else(|| Value::Object(inner.clone()).to_string());
            return Some(DecodedError {
                message,
                kind: kind_of(inner),
            });
        }
        Some(Value::String(s)) => {
            return Some(DecodedError {
                message: s.clone(),
                kind: None,
            });
        }
        _ => {}
    }
    if let Some(message) = obj.get("message") {
        return Some(DecodedError {
            message: value_text(message),
            kind: kind_of(obj),
        });
    }
    if let Some(detail) = obj.get("detail") {
        let message = match detail {
            Value::Array(items) => items
                .iter()
                .map(|item| {
                    let msg = item
                        .get("msg")
                        .map(value_text)
                        .unwrap_or_else(|| item.to_string());
                    match item.get("loc").and_then(Value::as_array) {
                        Some(loc) => {
                            let path: Vec<String> = loc.iter().map(value_text).collect();
                            format!("{}: {msg}", path.join("."))
                        }
                        None => msg,
                    }
                })
                .collect::<Vec<_>>()
                .join("; "),
            other => value_text(other),
        };
        return Some(DecodedError {
            message,
            kind: None,
        });
    }
    None
}

/// A top-level string field of a JSON object body (e.g. `version` of vLLM's `/version` or
/// Triton's `/v2`); `None` when the body is not such an object.
pub fn json_string_field(body: &[u8], field: &str) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get(field)?.as_str().map(str::to_owned)
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
struct ChatCompletion {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    /// Kept raw: counts a server got wrong (`1e400`, `1.5`) must not cost the answer.
    #[serde(default)]
    usage: Option<Box<serde_json::value::RawValue>>,
}

/// The token counts of a `usage` object, or `None` (with a warning) when they are not counts.
pub(crate) fn lenient_usage(backend: VlmBackend, raw: &str, clean: &ServerText) -> Option<Usage> {
    match serde_json::from_str::<Option<Usage>>(raw) {
        Ok(usage) => usage,
        Err(e) => {
            let said = clean.clean(&format!("{e}: {}", clean.snippet(raw.as_bytes(), 200)), 400);
            tracing::warn!(
                "the {backend} server's usage is not token counts ({said}); the answer is kept \
                 and its usage recorded as null"
            );
            None
        }
    }
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChoiceMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    /// vLLM's name for reasoning text.
    #[serde(default)]
    reasoning: Option<String>,
    /// LMDeploy's (and older vLLM's) name for reasoning text.
    #[serde(default)]
    reasoning_content: Option<String>,
}

/// Parses a successful chat-completions response.
///
/// - LMDeploy <= 0.15 reports engine errors as HTTP 200 with `finish_reason: "error"` and the
///   message in the content: that is returned as [`VlmError::Generation`], never as a success.
/// - An answer with no text (`content` null or blank) is [`VlmError::EmptyAnswer`], never a
///   success with `""`.
/// - Usage counts that are not counts (`1e400`, `1.5`) are dropped with a warning; the answer
///   is kept.
/// - Server-chosen text is cleaned by `clean` (the API key redacted; messages also escaped and
///   capped).
pub fn parse_chat_response(
    backend: VlmBackend,
    resp: &RawResponse,
    requested_model: &str,
    latency: Duration,
    clean: &ServerText,
) -> Result<VlmResponse, VlmError> {
    // serde quotes the offending value in its message: cleaned like any server text.
    let protocol = |message: String| VlmError::Protocol {
        backend,
        url: resp.url.to_string(),
        message: clean.clean(&message, MAX_MESSAGE_BYTES),
    };
    let completion: ChatCompletion = serde_json::from_slice(&resp.body).map_err(|e| {
        protocol(format!(
            "HTTP {} ({}) is not a chat completion ({e}): {}",
            resp.status,
            resp.content_type.as_deref().unwrap_or("no content type"),
            clean.snippet(&resp.body, 200)
        ))
    })?;
    let Some(choice) = completion.choices.into_iter().next() else {
        return Err(protocol("the completion has no choices".to_owned()));
    };
    let message = choice.message.unwrap_or(ChoiceMessage {
        content: None,
        reasoning: None,
        reasoning_content: None,
    });
    let text = message.content.unwrap_or_default();
    if choice.finish_reason.as_deref() == Some("error") {
        let message = if text.trim().is_empty() {
            "finish_reason \"error\" with no message; see the server's log".to_owned()
        } else {
            clean.clean(&text, MAX_MESSAGE_BYTES)
        };
        return Err(VlmError::Generation { backend, message });
    }
    let reasoning = message.reasoning.or(message.reasoning_content);
    if text.trim().is_empty() {
        let finish = choice.finish_reason.as_deref().map(|f| clean.clean(f, 64));
        return Err(VlmError::empty_answer(
            backend,
            finish.as_deref(),
            reasoning.as_deref().map_or(0, |r| r.trim().chars().count()),
        ));
    }
    Ok(VlmResponse {
        text: clean.redact(&text).into_owned(),
        reasoning: reasoning.map(|r| clean.redact(&r).into_owned()),
        finish_reason: choice.finish_reason.map(|f| clean.clean(&f, 64)),
        usage: completion
            .usage
            .and_then(|raw| lenient_usage(backend, raw.get(), clean)),
        model: completion
            .model
            .map(|m| clean.redact(&m).into_owned())
            .unwrap_or_else(|| requested_model.to_owned()),
        backend,
        latency,
    })
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ServedModel {
    /// The name to send as `model`.
    pub id: String,
    /// vLLM's context length, when given.
    #[serde(default)]
    pub max_model_len: Option<u64>,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ServedModel>,
}

/// Parses a `GET /v1/models` body; a failure's message is cleaned by `clean`.
pub fn parse_model_list(
    backend: VlmBackend,
    resp: &RawResponse,
    clean: &ServerText,
) -> Result<Vec<ServedModel>, VlmError> {
    serde_json::from_slice::<ModelList>(&resp.body)
        .map(|l| l.data)
        .map_err(|e| VlmError::Protocol {
            backend,
            url: resp.url.to_string(),
            message: clean.clean(
                &format!(
                    "the model list is not {{\"data\":[{{\"id\":...}}]}} ({e}): {}",
                    clean.snippet(&resp.body, 200)
                ),
                MAX_MESSAGE_BYTES,
            ),
        })
}

/// The part of a chat client that vLLM and LMDeploy share.
#[derive(Debug, Clone)]
pub struct OpenAiChat {
    /// The transport.
    pub transport: Transport,
    /// The image size limit.
    pub max_image_bytes: u64,
}

impl OpenAiChat {
    /// Checks the request, loads its images (files are read now, per request) and builds the
    /// body; the loaded images are dropped before anything is sent.
    async fn body(
        &self,
        request: &VlmRequest,
        options: PayloadOptions<'_>,
    ) -> Result<Vec<u8>, VlmError> {
        request.validate()?;
        let mut images = Vec::with_capacity(request.images.len());
        for image in &request.images {
            images.push(image.load(self.max_image_bytes).await?);
        }
        build_chat_body(request, &images, options)
    }

    /// Loads the images, builds the body, posts it and parses the answer.
    pub async fn chat(
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
        let url = self.transport.endpoint("chat/completions");
        let started = Instant::now();
        let resp = self
            .transport
            .post_json_with_retries(&url, body.into())
            .await?;
        if !resp.is_success() {
            return Err(self.transport.http_error(&resp));
        }
        parse_chat_response(
            self.transport.backend(),
            &resp,
            model.unwrap_or(""),
            started.elapsed(),
            self.transport.server_text(),
        )
    }

    /// Like [`chat`](Self::chat), streamed: `"stream": true` with
    /// `stream_options.include_usage`, each wait for the next event bounded by the timeout.
    pub async fn chat_stream(
        &self,
        request: &VlmRequest,
        model: Option<&str>,
    ) -> Result<crate::stream::VlmStream, VlmError> {
        let body = self
            .body(
                request,
                PayloadOptions {
                    model,
                    stream: true,
                },
            )
            .await?;
        let url = self.transport.endpoint("chat/completions");
        let timeout = self.transport.timeout;
        // The whole answer, streamed or not, is bounded by vlm_timeout.
        let deadline = tokio::time::Instant::now() + timeout;
        let resp = self
            .transport
            .post_json_streaming(&url, body.into(), timeout)
            .await?;
        Ok(crate::stream::sse_events(
            crate::stream::StreamContext {
                backend: self.transport.backend(),
                url: url.to_string(),
                chunk_timeout: timeout,
                total_timeout: timeout,
                deadline,
                clean: self.transport.server_text().clone(),
            },
            resp.bytes_stream(),
        ))
    }

    /// `GET /v1/models`, recorded as a probe.
    pub async fn list_models(
        &self,
        probes: &mut Vec<HealthProbe>,
    ) -> Result<Vec<ServedModel>, VlmError> {
        let url = self.transport.endpoint("models");
        let resp = self.transport.get(&url, Auth::Bearer, Budget::Health).await;
        let route = format!("GET {}", url.path());
        match resp {
            Ok(resp) if resp.is_success() => {
                let models = parse_model_list(
                    self.transport.backend(),
                    &resp,
                    self.transport.server_text(),
                )?;
                let names: Vec<String> = models.iter().map(|m| shown_model(&m.id)).collect();
                probes.push(HealthProbe {
                    route,
                    status: Some(resp.status),
                    note: format!("serves {}", names.join(", ")),
                });
                Ok(models)
            }
            Ok(resp) => {
                let err = self.transport.http_error(&resp);
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
    pub async fn check_models(
        &self,
        report: &mut HealthReport,
        slot: &ModelSlot,
    ) -> Result<(), VlmError> {
        let models = match self.list_models(&mut report.probes).await {
            Ok(models) => models,
            Err(err) => {
                report.state = state_for_error(&err, "the model list");
                return Ok(());
            }
        };
        report.served_models = models.iter().map(|m| m.id.clone()).collect();
        resolve_model(report, slot)
    }
}

/// Sets the report's model and state from its served models and the configured model.
pub fn resolve_model(report: &mut HealthReport, slot: &ModelSlot) -> Result<(), VlmError> {
    let served = &report.served_models;
    match slot.configured() {
        Some(model) => {
            report.model = Some(model.to_owned());
            if served.iter().any(|m| m == model) {
                report.state = HealthState::Ready;
            } else if served.is_empty() {
                report.state = HealthState::Unhealthy {
                    reason: format!("the server serves no model, so not {model:?}"),
                };
            } else {
                report.state = HealthState::Unhealthy {
                    reason: format!(
                        "model {model:?} is not served; the server serves {}; set --vlm-model \
                         (vlm_model / vlm_{}_model) to one of them",
                        shown_models(served),
                        report.backend
                    ),
                };
            }
        }
        None => match served.as_slice() {
            [only] => {
                report.model = Some(slot.adopt(only).to_owned());
                report.state = HealthState::Ready;
            }
            [] => {
                report.state = HealthState::Unhealthy {
                    reason: "the server serves no model".to_owned(),
                };
            }
            several => {
                return Err(VlmError::config(format!(
                    "no model is configured and the {} server at {} serves several: {}; choose \
                     one with --vlm-model (or vlm_model / vlm_{}_model)",
                    report.backend,
                    report.base_url,
                    shown_models(several),
                    report.backend
                )));
            }
        },
    }
    Ok(())
}

fn shown_models(names: &[String]) -> String {
    names
        .iter()
        .map(|n| shown_model(n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A short note for a probe that failed.
pub fn err_note(err: &VlmError) -> String {
    match err {
        VlmError::Http { message, .. } => message.clone(),
        VlmError::Unreachable { reason, .. } | VlmError::Transport { reason, .. } => reason.clone(),
        VlmError::Timeout { after, .. } => format!("no answer within {:.1} s", after.as_secs_f64()),
        other => other.to_string(),
    }
}

/// The health state a failed probe implies.
pub fn state_for_error(err: &VlmError, what: &str) -> HealthState {
    match err {
        VlmError::Unreachable { .. } | VlmError::Timeout { .. } => HealthState::Unreachable {
            reason: err.to_string(),
        },
        VlmError::Http { status: 503, .. } => HealthState::Starting {
            reason: format!("{what} answered 503: {}", err_note(err)),
        },
        VlmError::Http {
            status: 401 | 403, ..
        } => HealthState::Unhealthy {
            reason: err.to_string(),
        },
        _ => HealthState::Unhealthy {
            reason: format!("{what} failed: {err}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use serde_json::json;

    use super::*;
    use crate::image::ImageMime;

    /// The reference: the same payload built the plain way, through serde_json values.
    fn reference(request: &VlmRequest, images: &[LoadedImage], model: Option<&str>) -> Value {
        let mut content = vec![json!({"type": "text", "text": request.prompt})];
        for image in images {
            let url = match image {
                LoadedImage::Inline { data, mime } => format!(
                    "data:{};base64,{}",
                    mime.as_str(),
                    base64::engine::general_purpose::STANDARD.encode(data)
                ),
                LoadedImage::Url(u) => u.clone(),
            };
            content.push(json!({"type": "image_url", "image_url": {"url": url}}));
        }
        let mut messages = Vec::new();
        if let Some(system) = &request.system_prompt {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": content}));
        let mut body = serde_json::Map::new();
        if let Some(m) = model {
            body.insert("model".into(), json!(m));
        }
        body.insert("messages".into(), Value::Array(messages));
        if let Some(n) = request.max_tokens {
            body.insert("max_tokens".into(), json!(n));
        }
        if let Some(t) = request.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(p) = request.top_p {
            body.insert("top_p".into(), json!(p));
        }
        if !request.stop.is_empty() {
            body.insert("stop".into(), json!(request.stop));
        }
        if let Some(seed) = request.seed {
            body.insert("seed".into(), json!(seed));
        }
        if let Some(f) = &request.response_format {
            body.insert("response_format".into(), f.to_json());
        }
        for (k, v) in &request.extra {
            body.insert(k.clone(), v.clone());
        }
        Value::Object(body)
    }

    /// A deterministic generator of awkward strings: quotes, backslashes, every control
    /// character, non-ASCII, astral-plane characters, and plain text.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn string(&mut self) -> String {
            let pieces = [
                "\"",
                "\\",
                "/",
                "é",
                "漢字",
                "🎞️",
                "\u{2028}",
                "\u{7f}",
                "plain text ",
                "'",
                "{}",
                "</script>",
            ];
            let len = self.next() % 40;
            let mut s = String::new();
            for _ in 0..len {
                match self.next() % 4 {
                    0 => s.push(char::from_u32((self.next() % 32) as u32).unwrap_or(' ')),
                    1 => s.push_str(pieces[(self.next() % pieces.len() as u64) as usize]),
                    _ => s.push(char::from(b'a' + (self.next() % 26) as u8)),
                }
            }
            s
        }
        fn bytes(&mut self) -> Vec<u8> {
            let len = (self.next() % 3000) as usize;
            let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
            v.extend((0..len).map(|_| self.next() as u8));
            v
        }
    }

    #[test]
    fn the_fast_builder_matches_the_reference_for_many_awkward_inputs() {
        let mut g = Gen(0x9E37_79B9_7F4A_7C15);
        for case in 0..500 {
            let mut b = VlmRequest::builder(g.string());
            if g.next().is_multiple_of(2) {
                b = b.system_prompt(g.string());
            }
            if g.next().is_multiple_of(2) {
                b = b
                    .max_tokens((g.next() % 4000 + 1) as u32)
                    .temperature((g.next() % 200) as f64 / 100.0);
            }
            if g.next().is_multiple_of(3) {
                b = b.top_p(0.5).stop(g.string()).seed(g.next() as i64 >> 1);
            }
            if g.next().is_multiple_of(4) {
                b = b.extra(
                    format!("x_{}", g.string()),
                    json!({"nested": [g.string(), 1.5, null]}),
                );
            }
            if g.next().is_multiple_of(5) {
                b = b.json_schema("out", json!({"type": "object", "title": g.string()}));
            }
            let request = b.build().unwrap();
            let images: Vec<LoadedImage> = (0..g.next() % 3)
                .map(|i| {
                    if i == 2 {
                        LoadedImage::Url(format!("https://example.com/{}.png", g.next()))
                    } else {
                        LoadedImage::Inline {
                            data: g.bytes().into(),
                            mime: ImageMime::Png,
                        }
                    }
                })
                .collect();
            let model = (g.next().is_multiple_of(2)).then(|| g.string());
            let body = build_chat_body(
                &request,
                &images,
                PayloadOptions {
                    model: model.as_deref(),
                    stream: false,
                },
            )
            .unwrap();
            let parsed: Value =
                serde_json::from_slice(&body).unwrap_or_else(|e| panic!("case {case}: {e}"));
            assert_eq!(
                parsed,
                reference(&request, &images, model.as_deref()),
                "case {case}"
            );
        }
    }

    #[test]
    fn stream_options_are_sent_only_when_streaming() {
        let request = VlmRequest::builder("x").build().unwrap();
        let plain: Value = serde_json::from_slice(
            &build_chat_body(&request, &[], PayloadOptions::default()).unwrap(),
        )
        .unwrap();
        assert!(plain.get("stream").is_none() && plain.get("stream_options").is_none());
        let streamed: Value = serde_json::from_slice(
            &build_chat_body(
                &request,
                &[],
                PayloadOptions {
                    model: None,
                    stream: true,
                },
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(streamed["stream"], true);
        assert_eq!(streamed["stream_options"], json!({"include_usage": true}));
    }
}
