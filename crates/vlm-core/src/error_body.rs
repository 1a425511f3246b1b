//! The error bodies of vLLM, LMDeploy, Triton, FastAPI and the proxies in front of them,
//! decoded into a message and a type. HTTP-level: no OpenAI semantics.

use serde_json::Value;

use crate::text::body_snippet;

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
/// use vlm_core::support::decode_error_body;
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
