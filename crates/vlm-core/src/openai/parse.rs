//! Parsing chat-completions answers and model lists.

use std::time::Duration;

use serde::Deserialize;

use crate::backend::VlmBackend;
use crate::error::VlmError;
use crate::response::{VlmResponse, lenient_usage};
use crate::text::{MAX_MESSAGE_BYTES, ServerText};
use crate::transport::RawResponse;

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
    /// Who the server says serves it (`vllm`, `lmdeploy`, `sglang`, `llamacpp`, ...), when
    /// given.
    #[serde(default)]
    pub owned_by: Option<String>,
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
