//! `VlmRequest` and its builder.

use serde_json::{Map, Value};

use crate::error::VlmError;
use crate::image::ImageInput;

/// Top-level chat-completions fields the payload builder writes itself; an `extra` key with one
/// of these names is a configuration error rather than a silent overwrite.
pub const RESERVED_FIELDS: [&str; 10] = [
    "model",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "response_format",
    "stream",
    "stream_options",
];

/// Asks the server to constrain the answer's format.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ResponseFormat {
    /// Any JSON object (`{"type":"json_object"}`).
    JsonObject,
    /// JSON matching a schema (`{"type":"json_schema","json_schema":{...}}`).
    JsonSchema {
        /// The schema's name.
        name: String,
        /// The JSON schema.
        schema: Value,
        /// Whether the server must follow the schema strictly.
        strict: Option<bool>,
    },
}

impl ResponseFormat {
    /// The JSON value sent as `response_format`.
    pub fn to_json(&self) -> Value {
        match self {
            ResponseFormat::JsonObject => serde_json::json!({"type": "json_object"}),
            ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            } => {
                let mut inner = Map::new();
                inner.insert("name".into(), Value::String(name.clone()));
                inner.insert("schema".into(), schema.clone());
                if let Some(strict) = strict {
                    inner.insert("strict".into(), Value::Bool(*strict));
                }
                serde_json::json!({"type": "json_schema", "json_schema": inner})
            }
        }
    }
}

/// One prompt with its images, and the sampling parameters to use.
///
/// Build it with [`VlmRequest::builder`]:
///
/// ```
/// use vlm_core::{ImageInput, VlmRequest};
///
/// let request = VlmRequest::builder("Describe any residual colour in this photograph.")
///     .system_prompt("You are a careful photo editor.")
///     .image(ImageInput::path("assets/samples/sepia.jpg"))
///     .max_tokens(300)
///     .temperature(0.1)
///     .extra("top_k", 20)
///     .build()
///     .unwrap();
/// assert_eq!(request.images.len(), 1);
/// assert_eq!(request.max_tokens, Some(300));
///
/// // Fields the builder writes itself cannot be smuggled in through `extra`.
/// let err = VlmRequest::builder("hi").extra("model", "other").build().unwrap_err();
/// assert!(err.to_string().contains("\"model\""));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct VlmRequest {
    /// The user's text, sent as the first content part.
    pub prompt: String,
    /// An optional system message, sent before the user message.
    pub system_prompt: Option<String>,
    /// The images, sent in order after the text part.
    pub images: Vec<ImageInput>,
    /// `max_tokens`; the server's default when `None`.
    pub max_tokens: Option<u32>,
    /// `temperature`; the server's default when `None`.
    pub temperature: Option<f64>,
    /// `top_p`; the server's default when `None`.
    pub top_p: Option<f64>,
    /// Stop sequences; not sent when empty.
    pub stop: Vec<String>,
    /// `seed`, for reproducible sampling where the server supports it.
    pub seed: Option<i64>,
    /// A structured-output constraint.
    pub response_format: Option<ResponseFormat>,
    /// Backend-specific fields passed through verbatim at the top level of the JSON
    /// (e.g. vLLM's `top_k`, `repetition_penalty`). Unknown fields are ignored by both vLLM
    /// and LMDeploy.
    pub extra: Map<String, Value>,
    /// The model for this request only; the client's model when `None`.
    pub model: Option<String>,
}

impl VlmRequest {
    /// Starts a request with the given prompt.
    pub fn builder(prompt: impl Into<String>) -> VlmRequestBuilder {
        VlmRequestBuilder {
            request: VlmRequest {
                prompt: prompt.into(),
                system_prompt: None,
                images: Vec::new(),
                max_tokens: None,
                temperature: None,
                top_p: None,
                stop: Vec::new(),
                seed: None,
                response_format: None,
                extra: Map::new(),
                model: None,
            },
        }
    }

    /// Checks what a server would reject before anything is sent.
    pub fn validate(&self) -> Result<(), VlmError> {
        if let Some(key) = self
            .extra
            .keys()
            .find(|k| RESERVED_FIELDS.contains(&k.as_str()))
        {
            return Err(VlmError::config(format!(
                "extra field {key:?} collides with a field the request builder writes; set it \
                 through the request's own setter instead (reserved: {})",
                RESERVED_FIELDS.join(", ")
            )));
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(VlmError::config(format!(
                "temperature {t} is invalid; use a number >= 0 (vlm_temperature)"
            )));
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(VlmError::config(format!(
                "top_p {p} is invalid; use a number in (0, 1]"
            )));
        }
        if self.max_tokens == Some(0) {
            return Err(VlmError::config(
                "max_tokens 0 is invalid; use at least 1 (vlm_max_tokens)",
            ));
        }
        Ok(())
    }
}

/// Builds a [`VlmRequest`]; see [`VlmRequest::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct VlmRequestBuilder {
    request: VlmRequest,
}

impl VlmRequestBuilder {
    /// The model for this request only (a batch line's `model`); the client's otherwise.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        let model = model.into();
        self.request.model = (!model.trim().is_empty()).then_some(model);
        self
    }

    /// Sets the system prompt.
    pub fn system_prompt(mut self, text: impl Into<String>) -> Self {
        self.request.system_prompt = Some(text.into());
        self
    }

    /// Adds an image.
    pub fn image(mut self, image: ImageInput) -> Self {
        self.request.images.push(image);
        self
    }

    /// Adds several images.
    pub fn images(mut self, images: impl IntoIterator<Item = ImageInput>) -> Self {
        self.request.images.extend(images);
        self
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.request.max_tokens = Some(n);
        self
    }

    /// Sets `temperature`.
    pub fn temperature(mut self, t: f64) -> Self {
        self.request.temperature = Some(t);
        self
    }

    /// Sets `top_p`.
    pub fn top_p(mut self, p: f64) -> Self {
        self.request.top_p = Some(p);
        self
    }

    /// Adds a stop sequence.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.request.stop.push(s.into());
        self
    }

    /// Sets `seed`.
    pub fn seed(mut self, seed: i64) -> Self {
        self.request.seed = Some(seed);
        self
    }

    /// Constrains the answer to JSON matching `schema`.
    pub fn json_schema(mut self, name: impl Into<String>, schema: Value) -> Self {
        self.request.response_format = Some(ResponseFormat::JsonSchema {
            name: name.into(),
            schema,
            strict: None,
        });
        self
    }

    /// Sets the response format.
    pub fn response_format(mut self, format: ResponseFormat) -> Self {
        self.request.response_format = Some(format);
        self
    }

    /// Adds a backend-specific top-level field.
    pub fn extra(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.request.extra.insert(key.into(), value.into());
        self
    }

    /// Finishes the request, checking it ([`VlmRequest::validate`]).
    pub fn build(self) -> Result<VlmRequest, VlmError> {
        self.request.validate()?;
        Ok(self.request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_parameters_are_config_errors() {
        let cases = [
            (VlmRequest::builder("x").temperature(-1.0), "temperature"),
            (
                VlmRequest::builder("x").temperature(f64::NAN),
                "temperature",
            ),
            (VlmRequest::builder("x").top_p(0.0), "top_p"),
            (VlmRequest::builder("x").top_p(1.5), "top_p"),
            (VlmRequest::builder("x").max_tokens(0), "max_tokens"),
            (VlmRequest::builder("x").extra("stream", true), "\"stream\""),
            (
                VlmRequest::builder("x").extra("messages", 1),
                "\"messages\"",
            ),
        ];
        for (builder, needle) in cases {
            let err = builder.build().unwrap_err();
            assert!(err.is_config(), "{err}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        assert!(
            VlmRequest::builder("x")
                .temperature(0.0)
                .top_p(1.0)
                .build()
                .is_ok()
        );
    }
}
