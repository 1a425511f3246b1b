//! `VlmError`: every way a VLM call can fail, each message saying what to do next.

use std::time::Duration;

use crate::backend::{ParseBackendError, VlmBackend};

/// The cause underneath an error (a `reqwest::Error`, an `io::Error`), reachable through
/// [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from configuring a client, talking to a server, or preparing a request.
///
/// Messages follow the Rust API guidelines: lower-case, no trailing period, the value and where it
/// came from, and for configuration and connection errors what to do next. Match on the variant or
/// use the predicates ([`is_retryable`](Self::is_retryable), [`status`](Self::status)), never on
/// the message text. No variant ever holds an API key. Where a lower layer failed, the cause is
/// kept: [`std::error::Error::source`] reaches the `reqwest::Error` or `io::Error` underneath.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VlmError {
    /// The configuration is invalid: an unknown backend, a bad URL or timeout, a colliding
    /// `extra` key, an ambiguous model.
    #[error("{message}")]
    Config {
        /// What is wrong, where the value came from and how to fix it.
        message: String,
    },

    /// The backend is valid but its client was not compiled in.
    #[error(
        "backend \"{backend}\" is not compiled into this build; rebuild with `--features {feature}` \
         (compiled in: {})",
        names_or_none(compiled)
    )]
    BackendNotCompiled {
        /// The backend asked for.
        backend: VlmBackend,
        /// The cargo feature that compiles it in.
        feature: &'static str,
        /// The backends this build does have.
        compiled: Vec<VlmBackend>,
    },

    /// The server could not be reached (connection refused, DNS failure).
    #[error(
        "cannot reach the {backend} server at {url}: {reason}; if it is still loading the model, \
         wait for it (`--wait SECONDS`); otherwise start it with `{start_command}` or point \
         `--vlm-base-url` at the right host and port"
    )]
    Unreachable {
        /// The backend that was being called.
        backend: VlmBackend,
        /// The URL that was being called.
        url: String,
        /// The transport's own description.
        reason: String,
        /// The command that starts that server on that port.
        start_command: String,
        /// The transport's error.
        #[source]
        source: Option<BoxError>,
    },

    /// No (whole) answer within the timeout.
    #[error(
        "no answer from the {backend} server at {url} within {:.1} s; raise `{}` ({setting}) \
         or check the server's load", after.as_secs_f64(), flag_of(setting)
    )]
    Timeout {
        /// The backend that was being called.
        backend: VlmBackend,
        /// The URL that was being called.
        url: String,
        /// How long the client waited.
        after: Duration,
        /// The setting that governs this wait: `vlm_timeout` for inference (the whole answer,
        /// streamed or not), `vlm_health_timeout` for health probes.
        setting: &'static str,
        /// The transport's error, when it reported the timeout.
        #[source]
        source: Option<BoxError>,
    },

    /// The response headers arrived, then the connection broke before the body was whole. The
    /// server may have finished the work (a whole generation), so this is not re-sent unless
    /// `vlm_retry_timeouts` allows it.
    #[error(
        "the {backend} server at {url} answered HTTP {status}, then the connection broke before \
         the body was complete ({reason}); the server may have done the work, so an inference cut \
         off like this is re-sent only when vlm_retry_timeouts = true"
    )]
    ResponseCut {
        /// The backend that was being called.
        backend: VlmBackend,
        /// The URL that was being called.
        url: String,
        /// The status of the response whose body was cut.
        status: u16,
        /// The transport's own description.
        reason: String,
        /// The transport's error.
        #[source]
        source: Option<BoxError>,
    },

    /// A JSON answer was asked for (a JSON schema) and the answer is not valid for it, even
    /// after asking again with the reasons.
    #[error(
        "the {backend} server's answer is not valid JSON for the schema after {attempts} \
         attempt(s): {}; the answer began: {}", reasons.join("; "), crate::text::clip(raw, 300)
    )]
    InvalidJson {
        /// The backend that answered.
        backend: VlmBackend,
        /// The last answer, as the server sent it.
        raw: String,
        /// Why it is not valid: not JSON at all, or each schema violation.
        reasons: Vec<String>,
        /// How many answers were asked for.
        attempts: u32,
    },

    /// The server answered successfully but the answer has no text (`content` null or empty).
    #[error("the {backend} server returned an empty answer: {detail}")]
    EmptyAnswer {
        /// The backend that was being called.
        backend: VlmBackend,
        /// What the server sent instead (finish reason, reasoning only) and what to do.
        detail: String,
    },

    /// The server answered with an HTTP error status.
    #[error("HTTP {status} from the {backend} server at {url}: {message}{}", advice_for(*status))]
    Http {
        /// The backend that was being called.
        backend: VlmBackend,
        /// The URL that was being called.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The server's own message, decoded from whichever error body shape it used.
        message: String,
        /// The server's error type, when it gave one (e.g. `NotFoundError`).
        kind: Option<String>,
    },

    /// The server reported an error inside a successful HTTP response, such as LMDeploy
    /// <= 0.15's HTTP 200 with `finish_reason: "error"`.
    #[error("the {backend} server reported an error while generating: {message}")]
    Generation {
        /// The backend that was being called.
        backend: VlmBackend,
        /// The server's message.
        message: String,
    },

    /// The response is not what the protocol promises.
    #[error("unexpected response from the {backend} server at {url}: {message}")]
    Protocol {
        /// The backend that was being called.
        backend: VlmBackend,
        /// The URL that was being called.
        url: String,
        /// What was wrong: status, content type, the first bytes of the body.
        message: String,
    },

    /// An image could not be read or is not a supported type.
    #[error("image {source_name}: {message}")]
    Image {
        /// The path, or a description of the in-memory source.
        source_name: String,
        /// What was wrong and what was found.
        message: String,
        /// The I/O error, when reading failed.
        #[source]
        source: Option<BoxError>,
    },

    /// The operation is not supported by this backend (yet).
    #[error("{message}")]
    Unsupported {
        /// The backend.
        backend: VlmBackend,
        /// What works today and how to switch.
        message: String,
    },

    /// Any other transport failure (TLS, a body cut short, a redirect loop).
    #[error("request to the {backend} server at {url} failed: {reason}")]
    Transport {
        /// The backend that was being called.
        backend: VlmBackend,
        /// The URL that was being called.
        url: String,
        /// The transport's own description.
        reason: String,
        /// The transport's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl From<ParseBackendError> for VlmError {
    fn from(e: ParseBackendError) -> Self {
        VlmError::config(e.to_string())
    }
}

fn names_or_none(backends: &[VlmBackend]) -> String {
    if backends.is_empty() {
        "none".to_owned()
    } else {
        backends
            .iter()
            .map(|b| b.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `vlm_health_timeout` -> `--vlm-health-timeout`.
fn flag_of(setting: &str) -> String {
    format!("--{}", setting.replace('_', "-"))
}

fn advice_for(status: u16) -> &'static str {
    match status {
        401 | 403 => {
            "; set the API key the server expects (VLM_API_KEY, or vlm_<backend>_api_key in the \
             configuration)"
        }
        404 => "; check the model name (`vlm health` lists the served models) and the base URL",
        413 => "; the request is too large for the server: send fewer or smaller images",
        429 => "; the server is rate-limiting: lower the concurrency or retry later",
        _ => "",
    }
}

impl VlmError {
    /// A configuration error with the given message.
    pub fn config(message: impl Into<String>) -> Self {
        VlmError::Config {
            message: message.into(),
        }
    }

    /// The error for a backend name that is not known, with the closest valid name.
    ///
    /// `source` says where the value came from (e.g. `VLM_BACKEND`, `--vlm-backend`).
    pub fn unknown_backend(value: &str, source: Option<&str>) -> Self {
        match value.parse::<VlmBackend>() {
            Err(e) => VlmError::config(e.message(source)),
            Ok(b) => VlmError::config(format!("{b} is a valid backend")),
        }
    }

    /// An image error with no cause underneath (a wrong type, a size over the limit).
    pub fn image(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        VlmError::Image {
            source_name: source_name.into(),
            message: message.into(),
            source: None,
        }
    }

    /// The error for an answer without text ([`EmptyAnswer`](Self::EmptyAnswer)), saying what
    /// came instead (the finish reason, reasoning only) and what to do.
    ///
    /// ```
    /// use vlm_core::{VlmBackend, VlmError};
    /// let e = VlmError::empty_answer(VlmBackend::Vllm, Some("length"), 0);
    /// assert!(e.to_string().contains("raise max_tokens"));
    /// ```
    pub fn empty_answer(
        backend: VlmBackend,
        finish_reason: Option<&str>,
        reasoning_chars: usize,
    ) -> Self {
        let finish = finish_reason.map_or_else(
            || "no finish_reason".to_owned(),
            |f| format!("finish_reason {f:?}"),
        );
        let detail = match (finish_reason, reasoning_chars) {
            (Some("length"), r @ 1..) => format!(
                "{finish} after {r} characters of reasoning and no answer text; raise max_tokens \
                 (--max-tokens / vlm_max_tokens) so the model can finish thinking and answer"
            ),
            (Some("length"), 0) => format!(
                "{finish} before any answer text; raise max_tokens (--max-tokens / \
                 vlm_max_tokens)"
            ),
            (_, r @ 1..) => format!("{finish} with {r} characters of reasoning but no answer text"),
            _ => format!("{finish} with no text (content null or blank)"),
        };
        VlmError::EmptyAnswer { backend, detail }
    }

    /// The HTTP status, for [`Http`](Self::Http) errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            VlmError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether trying the same request again later may succeed: connection failures, timeouts,
    /// 408, 429 and 5xx gateway/overload statuses. Never configuration, image or other 4xx errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            VlmError::Unreachable { .. }
            | VlmError::Timeout { .. }
            | VlmError::ResponseCut { .. } => true,
            VlmError::Http { status, .. } => {
                matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
            }
            VlmError::Transport { .. } => true,
            _ => false,
        }
    }

    /// Whether the server may have run the request although no whole answer arrived: a timeout,
    /// or a response cut off after its headers. Sending it again may repeat a whole generation,
    /// so the transport does that only when `vlm_retry_timeouts` is on.
    pub fn may_have_run(&self) -> bool {
        matches!(
            self,
            VlmError::Timeout { .. } | VlmError::ResponseCut { .. }
        )
    }

    /// Whether this is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, VlmError::Timeout { .. })
    }

    /// Whether the server could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, VlmError::Unreachable { .. })
    }

    /// Whether this is a configuration error (including a backend not compiled in).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            VlmError::Config { .. } | VlmError::BackendNotCompiled { .. }
        )
    }

    /// Whether the backend does not support the operation.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, VlmError::Unsupported { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16) -> VlmError {
        VlmError::Http {
            backend: VlmBackend::Vllm,
            url: "http://127.0.0.1:1/v1/chat/completions".into(),
            status,
            message: "boom".into(),
            kind: None,
        }
    }

    #[test]
    fn retryable_statuses_follow_the_openai_contract() {
        for (status, retry) in [
            (400, false),
            (401, false),
            (404, false),
            (408, true),
            (409, false),
            (422, false),
            (429, true),
            (500, true),
            (501, false),
            (502, true),
            (503, true),
            (504, true),
        ] {
            assert_eq!(http(status).is_retryable(), retry, "status {status}");
            assert_eq!(http(status).status(), Some(status));
        }
        assert!(!VlmError::config("x").is_retryable());
    }

    #[test]
    fn http_401_says_to_set_the_api_key() {
        let msg = http(401).to_string();
        assert!(msg.contains("VLM_API_KEY"), "{msg}");
        assert!(msg.starts_with("HTTP 401 from the vllm server"), "{msg}");
    }
}
