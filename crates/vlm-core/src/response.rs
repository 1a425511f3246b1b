//! `VlmResponse`: the model's answer and what it cost.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::VlmBackend;

/// Token counts reported by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt, images included.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// The sum, as the server reported it.
    pub total_tokens: u64,
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
