//! `VlmResponse`: the model's answer and what it cost.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::VlmBackend;

/// Token counts reported by the server. A count the server left out or sent as `null` (vLLM
/// and LMDeploy declare them optional) reads as 0: an answer is never lost over its usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
