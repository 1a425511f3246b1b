//! `VlmResponse`: the model's answer and what it cost.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::VlmBackend;
use crate::text::ServerText;

/// Token counts reported by the server. A count the server left out or sent as `null` (vLLM
/// and LMDeploy declare them optional) reads as 0: an answer is never lost over its usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Tokens in the prompt, images included.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub completion_tokens: u64,
    /// The sum, as the server reported it.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub total_tokens: u64,
}

impl Usage {
    /// Token counts as a server reports them.
    ///
    /// ```
    /// let usage = vlm_core::Usage::new(5, 2, 7);
    /// assert_eq!(usage.total_tokens, 7);
    /// ```
    pub fn new(prompt_tokens: u64, completion_tokens: u64, total_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
        }
    }
}

fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_null_counts_read_as_zero() {
        let u: Usage =
            serde_json::from_str(r#"{"prompt_tokens":5,"completion_tokens":null}"#).unwrap();
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 5,
                completion_tokens: 0,
                total_tokens: 0
            }
        );
    }
}

/// The model's answer to one [`VlmRequest`](crate::VlmRequest).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct VlmResponse {
    /// The generated text (empty if the model produced only reasoning).
    pub text: String,
    /// Reasoning text, from vLLM's `reasoning` or LMDeploy's `reasoning_content`.
    pub reasoning: Option<String>,
    /// Why generation stopped (`stop`, `length`, ...), as the server said it.
    pub finish_reason: Option<String>,
    /// Token counts, when the server reported them.
    pub usage: Option<Usage>,
    /// The model that answered, as the server named it.
    pub model: String,
    /// The backend that answered.
    pub backend: VlmBackend,
    /// Wall time from sending the request to having parsed the answer.
    pub latency: Duration,
}

impl VlmResponse {
    /// An answer with only its text, for clients written outside this crate (mocks, new
    /// backends); the other fields start empty and can be set.
    ///
    /// ```
    /// use vlm_core::{VlmBackend, VlmResponse};
    /// let mut answer = VlmResponse::new(VlmBackend::Vllm, "m", "Neutral.");
    /// answer.finish_reason = Some("stop".into());
    /// assert_eq!(answer.text, "Neutral.");
    /// ```
    pub fn new(backend: VlmBackend, model: impl Into<String>, text: impl Into<String>) -> Self {
        VlmResponse {
            text: text.into(),
            reasoning: None,
            finish_reason: None,
            usage: None,
            model: model.into(),
            backend,
            latency: Duration::ZERO,
        }
    }
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
