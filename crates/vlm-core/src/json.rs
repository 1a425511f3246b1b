//! JSON answers: the answer extracted tolerantly (code fences, text around it), validated
//! against the request's JSON Schema, asked for again once with the reasons, and otherwise an
//! error that keeps the raw text — never a silent default.

use serde_json::Value;

use crate::client::VlmClient;
use crate::error::VlmError;
use crate::request::{ResponseFormat, VlmRequest};
use crate::response::VlmResponse;

/// An answer that is valid JSON for the request's schema.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JsonAnswer {
    /// The parsed, validated JSON.
    pub value: Value,
    /// The answer it was read from (its text is the raw answer).
    pub response: VlmResponse,
    /// How many answers were asked for (2 when the first was invalid).
    pub attempts: u32,
}

/// The JSON in a model's answer: the whole text, or the first fenced block, or the outermost
/// object or array found in the text.
///
/// ```
/// use vlm_core::json::extract_json;
/// use serde_json::json;
/// assert_eq!(extract_json(r#"{"a": 1}"#), Some(json!({"a": 1})));
/// assert_eq!(extract_json("Sure!\n```json\n{\"a\": 2}\n```"), Some(json!({"a": 2})));
/// assert_eq!(extract_json(r#"The scores are {"a": 3}. Hope it helps"#), Some(json!({"a": 3})));
/// assert_eq!(extract_json("no json here"), None);
/// ```
pub fn extract_json(text: &str) -> Option<Value> {
    let trimmed = text.trim();
    if let Ok(v) = serde_json::from_str(trimmed) {
        return Some(v);
    }
    // A fenced block: ```json ... ``` or ``` ... ```.
    if let Some(start) = trimmed.find("```") {
        let after = &trimmed[start + 3..];
        let body = after.split_once('\n').map_or(after, |(_, rest)| rest);
        if let Some(end) = body.find("```")
            && let Ok(v) = serde_json::from_str(body[..end].trim())
        {
            return Some(v);
        }
    }
    // The outermost object or array in the text.
    for (open, close) in [('{', '}'), ('[', ']')] {
        if let (Some(a), Some(b)) = (trimmed.find(open), trimmed.rfind(close))
            && a < b
            && let Ok(v) = serde_json::from_str(&trimmed[a..=b])
        {
            return Some(v);
        }
    }
    None
}

/// Why `value` is not valid for `schema`: one reason per violation (empty when valid). A schema
/// that does not compile is one reason saying so.
///
/// ```
/// use serde_json::json;
/// let schema = json!({"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]});
/// assert!(vlm_core::json::violations(&schema, &json!({"score": 3})).is_empty());
/// assert!(!vlm_core::json::violations(&schema, &json!({"score": "high"})).is_empty());
/// ```
pub fn violations(schema: &Value, value: &Value) -> Vec<String> {
    match jsonschema::validator_for(schema) {
        Err(e) => vec![format!("the JSON schema itself is invalid: {e}")],
        Ok(validator) => validator
            .iter_errors(value)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect(),
    }
}

/// Why an answer is not what the schema asks for, or the value when it is.
fn check(schema: &Value, text: &str) -> Result<Value, Vec<String>> {
    let Some(value) = extract_json(text) else {
        return Err(vec!["the answer holds no JSON".to_owned()]);
    };
    let reasons = violations(schema, &value);
    if reasons.is_empty() {
        Ok(value)
    } else {
        Err(reasons)
    }
}

/// Sends a request that carries a JSON Schema and returns the answer validated against it.
/// An invalid answer is asked for again `retries` times (the setting `vlm_json_retries`,
/// default 1), each time with the reasons added to the prompt; if it is still invalid, the error
/// is [`VlmError::InvalidJson`] with the raw text and the reasons.
///
/// ```no_run
/// use serde_json::json;
/// use vlm_core::{ImageInput, VlmClient, VlmRequest};
///
/// # async fn run(client: &dyn VlmClient) -> Result<(), vlm_core::VlmError> {
/// let request = VlmRequest::builder("Score the image's colour cast from 0 to 10.")
///     .image(ImageInput::path("photo.jpg"))
///     .json_schema("cast", json!({"type": "object",
///         "properties": {"score": {"type": "integer"}}, "required": ["score"]}))
///     .build()?;
/// let answer = vlm_core::json::infer_json_value(client, &request, 1).await?;
/// println!("{}", answer.value["score"]);
/// # Ok(()) }
/// ```
pub async fn infer_json_value(
    client: &dyn VlmClient,
    request: &VlmRequest,
    retries: u32,
) -> Result<JsonAnswer, VlmError> {
    let Some(ResponseFormat::JsonSchema { schema, .. }) = &request.response_format else {
        return Err(VlmError::config(
            "a JSON answer needs a JSON schema on the request (VlmRequestBuilder::json_schema)",
        ));
    };
    let mut attempt = request.clone();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let response = client.infer_single(&attempt).await?;
        match check(schema, &response.text) {
            Ok(value) => {
                return Ok(JsonAnswer {
                    value,
                    response,
                    attempts,
                });
            }
            Err(reasons) if attempts > retries => {
                return Err(VlmError::InvalidJson {
                    backend: response.backend,
                    raw: response.text,
                    reasons,
                    attempts,
                });
            }
            Err(reasons) => {
                tracing::warn!(
                    "the answer is not valid JSON for the schema ({}); asking again",
                    reasons.join("; ")
                );
                attempt.prompt = format!(
                    "{}\n\nYour previous answer was not valid JSON for the required schema: {}. \
                     Answer again with only the JSON.",
                    request.prompt,
                    reasons.join("; ")
                );
            }
        }
    }
}

/// The typed call: sets `T`'s JSON Schema (by schemars) on the request, then
/// [`infer_json_value`], then reads the value as `T`.
///
/// ```no_run
/// use vlm_core::{ImageInput, VlmClient, VlmRequest};
///
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Cast { score: u8, hue: String }
///
/// # async fn run(client: &dyn VlmClient) -> Result<(), vlm_core::VlmError> {
/// let request = VlmRequest::builder("Score the colour cast.")
///     .image(ImageInput::path("photo.jpg"))
///     .build()?;
/// let cast: Cast = vlm_core::json::infer_json(client, request, 1).await?;
/// println!("{} {}", cast.score, cast.hue);
/// # Ok(()) }
/// ```
#[cfg(feature = "schemars")]
pub async fn infer_json<T>(
    client: &dyn VlmClient,
    mut request: VlmRequest,
    retries: u32,
) -> Result<T, VlmError>
where
    T: serde::de::DeserializeOwned + schemars::JsonSchema,
{
    let schema = serde_json::to_value(schemars::schema_for!(T))
        .map_err(|e| VlmError::config(format!("cannot write the schema of the type: {e}")))?;
    request.response_format = Some(ResponseFormat::JsonSchema {
        name: T::schema_name().into_owned(),
        schema,
        strict: None,
    });
    let answer = infer_json_value(client, &request, retries).await?;
    serde_json::from_value(answer.value.clone()).map_err(|e| VlmError::InvalidJson {
        backend: answer.response.backend,
        raw: answer.response.text,
        reasons: vec![format!("valid for the schema but not for the type: {e}")],
        attempts: answer.attempts,
    })
}
