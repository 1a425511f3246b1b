//! The generate extension: the request body for a model (only the inputs it has) and its
//! answers, whole or streamed.
//!
//! Triton maps each top-level key that names an input to a tensor and turns every other key
//! into a request parameter, which a model that does not read it silently ignores. So this
//! client sends a setting only as an input the model lists, and refuses what the model cannot
//! take rather than dropping it.

use serde_json::{Map, Value, json};
use vlm_core::text::{MAX_MESSAGE_BYTES, ServerText};
use vlm_core::{LoadedImage, ResponseFormat, StreamEvent, Usage, VlmBackend, VlmError, VlmRequest};

use crate::model::{ImageWay, ModelInfo};

/// `max_tokens` when the request gives none (Triton's vLLM backend would stop at 16).
const DEFAULT_MAX_TOKENS: u32 = 512;

/// The prompt as sent: the system prompt and a blank line before the prompt, that whole text
/// put in the template's `{prompt}` when there is a template.
pub(crate) fn text_input(request: &VlmRequest, template: Option<&str>) -> String {
    let prompt = match &request.system_prompt {
        Some(system) => format!("{system}\n\n{}", request.prompt),
        None => request.prompt.clone(),
    };
    match template {
        Some(t) => t.replace("{prompt}", &prompt),
        None => prompt,
    }
}

/// The base64 of an image, and whether it came as an http(s) URL to pass through.
fn image_payload(image: &LoadedImage) -> Result<(String, bool), String> {
    match image {
        LoadedImage::Inline { data, .. } => Ok((vlm_core::support::encode_base64(data), false)),
        LoadedImage::Url(url) => match url.split_once(";base64,") {
            Some((head, b64)) if head.starts_with("data:") => Ok((b64.to_owned(), false)),
            _ if url.starts_with("http://") || url.starts_with("https://") => {
                Ok((url.clone(), true))
            }
            _ => Err("an image URL must be a base64 data: URL or an http(s) URL".to_owned()),
        },
        _ => Err("an image of an unknown kind".to_owned()),
    }
}

/// The images as the model takes them.
fn image_values(
    info: &ModelInfo,
    images: &[LoadedImage],
) -> Result<Option<(&'static str, Value)>, VlmError> {
    if images.is_empty() {
        return Ok(None);
    }
    let (input, several) = match &info.image {
        ImageWay::Url { several } => ("image_url_input", *several),
        ImageWay::Raw { several } => ("image", *several),
        ImageWay::Unsupported(why) => {
            return Err(VlmError::Unsupported {
                backend: VlmBackend::Triton,
                message: why.clone(),
            });
        }
    };
    if images.len() > 1 && !several {
        return Err(VlmError::image(
            "<request>",
            format!(
                "model {:?} takes one image per request ({input} has shape {:?}); send the {} \
                 images in separate requests",
                info.name,
                info.inputs
                    .get(input)
                    .map(|i| i.shape.clone())
                    .unwrap_or_default(),
                images.len()
            ),
        ));
    }
    let mut values = Vec::with_capacity(images.len());
    for image in images {
        let (payload, is_url) =
            image_payload(image).map_err(|e| VlmError::image("<request>", e))?;
        values.push(match (input, is_url) {
            // The only prefix the ensemble's preprocessing decodes; PIL finds the real format.
            ("image_url_input", false) => format!("data:image/jpeg;base64,{payload}"),
            ("image_url_input", true) => payload,
            (_, true) => {
                return Err(VlmError::image(
                    "<request>",
                    "Triton's vLLM backend takes images as base64 only, not URLs; give a file \
                     or bytes",
                ));
            }
            (_, false) => payload,
        });
    }
    let value = if values.len() == 1 && !several {
        Value::String(values.remove(0))
    } else {
        Value::from(values)
    };
    Ok(Some((input, value)))
}

/// A generate request: the body, and what `text_output` will hold.
pub(crate) struct Generate {
    /// The JSON body.
    pub(crate) body: Value,
    /// The `text_input` sent.
    pub(crate) sent: String,
    /// Whether `exclude_input_in_output` was sent (otherwise the prompt is echoed first).
    pub(crate) excluded: bool,
}

/// The body for `request` with its `images` loaded: only inputs `info` lists.
pub(crate) fn body(
    info: &ModelInfo,
    request: &VlmRequest,
    images: &[LoadedImage],
    template: Option<&str>,
    stream: bool,
) -> Result<Generate, VlmError> {
    let sent = text_input(request, template);
    let mut body = Map::new();
    body.insert("text_input".into(), Value::String(sent.clone()));
    if let Some((input, value)) = image_values(info, images)? {
        body.insert(input.into(), value);
    }
    let max_tokens = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let mut set = |name: &str, datatype: &str, value: Value| {
        if info.has(name, datatype) {
            body.insert(name.to_owned(), value);
        }
    };
    set("max_tokens", "INT32", json!(max_tokens));
    if let Some(t) = request.temperature {
        set("temperature", "FP32", json!(t));
    }
    if let Some(p) = request.top_p {
        set("top_p", "FP32", json!(p));
    }
    if let Some(seed) = request.seed.and_then(|s| u64::try_from(s).ok()) {
        set("random_seed", "UINT64", json!(seed));
    }
    if !request.stop.is_empty() {
        set("stop_words", "BYTES", json!(request.stop));
    }
    set("stream", "BOOL", json!(stream));
    set("exclude_input_in_output", "BOOL", json!(true));
    for flag in [
        "return_finish_reason",
        "return_num_input_tokens",
        "return_num_output_tokens",
    ] {
        set(flag, "BOOL", json!(true));
    }
    if info.has("sampling_parameters", "BYTES") {
        let mut sampling = Map::new();
        sampling.insert("max_tokens".into(), json!(max_tokens));
        if let Some(t) = request.temperature {
            sampling.insert("temperature".into(), json!(t));
        }
        if let Some(p) = request.top_p {
            sampling.insert("top_p".into(), json!(p));
        }
        if !request.stop.is_empty() {
            sampling.insert("stop".into(), json!(request.stop));
        }
        if let Some(seed) = request.seed {
            sampling.insert("seed".into(), json!(seed));
        }
        // The vLLM backend reads structured-output constraints from its sampling parameters.
        if let Some(ResponseFormat::JsonSchema { schema, .. }) = &request.response_format {
            sampling.insert("structured_outputs".into(), json!({"json": schema}));
        }
        body.insert(
            "sampling_parameters".into(),
            Value::String(Value::Object(sampling).to_string()),
        );
    }
    let guided = info.has("guided_decoding_guide_type", "BYTES")
        && info.has("guided_decoding_guide", "BYTES");
    match &request.response_format {
        // TensorRT-LLM's guided decoding, where the ensemble has its inputs.
        Some(ResponseFormat::JsonSchema { schema, .. }) if guided => {
            body.insert("guided_decoding_guide_type".into(), json!("json_schema"));
            body.insert("guided_decoding_guide".into(), json!(schema.to_string()));
        }
        Some(ResponseFormat::JsonSchema { .. }) if info.has("sampling_parameters", "BYTES") => {}
        _ => {}
    }
    let takes_schema = guided || info.has("sampling_parameters", "BYTES");
    if request.response_format.is_some()
        && !(takes_schema
            && matches!(
                request.response_format,
                Some(ResponseFormat::JsonSchema { .. })
            ))
    {
        return Err(VlmError::Unsupported {
            backend: VlmBackend::Triton,
            message: format!(
                "model {:?} on Triton takes no structured-output input (TensorRT-LLM's \
                 guided_decoding_guide inputs, or the vLLM backend's sampling_parameters); drop \
                 the JSON schema or use an OpenAI-compatible server",
                info.name
            ),
        });
    }
    for (key, value) in &request.extra {
        if !info.inputs.contains_key(key) {
            return Err(VlmError::config(format!(
                "extra field {key:?} is not an input of Triton model {:?} (its inputs: {}): \
                 Triton would pass it on as a parameter the model never reads",
                info.name,
                info.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        body.insert(key.clone(), value.clone());
    }
    let excluded = info.has("exclude_input_in_output", "BOOL");
    Ok(Generate {
        body: Value::Object(body),
        sent,
        excluded,
    })
}

/// A BYTES output as text: a bare string, or the first element of an array.
fn text_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items.first().and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn count_of(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n.as_u64(),
        Value::Array(items) => items.first().and_then(Value::as_u64),
        _ => None,
    }
}

/// The answer of `/generate`: text (the echoed prompt cut off), finish reason, usage.
pub(crate) fn answer(
    reply: &Value,
    request: &Generate,
    clean: &ServerText,
) -> Result<(String, Option<String>, Option<Usage>), VlmError> {
    if let Some(error) = reply.get("error") {
        let message = error
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned);
        return Err(VlmError::Generation {
            backend: VlmBackend::Triton,
            message: clean.clean(&message, MAX_MESSAGE_BYTES),
        });
    }
    let mut text = text_of(reply.get("text_output")).ok_or_else(|| VlmError::Protocol {
        backend: VlmBackend::Triton,
        url: String::new(),
        message: clean.clean(
            &format!(
                "the reply has no text_output: {}",
                vlm_core::text::clip(&reply.to_string(), 300)
            ),
            MAX_MESSAGE_BYTES,
        ),
    })?;
    if !request.excluded
        && let Some(rest) = text.strip_prefix(&request.sent)
    {
        // The model echoed the prompt first (TensorRT-LLM ensembles do).
        text = rest.trim_start().to_owned();
    }
    let finish = text_of(reply.get("finish_reason"));
    let usage = match (
        count_of(reply.get("num_input_tokens")),
        count_of(reply.get("num_output_tokens")),
    ) {
        (Some(i), Some(o)) => Some(Usage::new(i, o, i + o)),
        _ => None,
    };
    Ok((clean.redact(&text).into_owned(), finish, usage))
}

/// One `generate_stream` event: `data: {...}` with the new text, or `{"error": ...}`; Triton
/// sends no `[DONE]` (the body's end ends the stream).
pub(crate) fn stream_chunk(
    backend: VlmBackend,
    data: &str,
    clean: &ServerText,
) -> Result<Option<Vec<StreamEvent>>, VlmError> {
    let value: Value = serde_json::from_str(data.trim()).map_err(|e| VlmError::Protocol {
        backend,
        url: String::new(),
        message: clean.clean(
            &format!("a stream event is not JSON ({e})"),
            MAX_MESSAGE_BYTES,
        ),
    })?;
    if let Some(error) = value.get("error") {
        let message = error
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned);
        return Err(VlmError::Generation {
            backend,
            message: clean.clean(&message, MAX_MESSAGE_BYTES),
        });
    }
    let mut events = Vec::new();
    if let Some(text) = text_of(value.get("text_output")).filter(|t| !t.is_empty()) {
        events.push(StreamEvent::Text(clean.redact(&text).into_owned()));
    }
    if let Some(finish) = text_of(value.get("finish_reason")) {
        events.push(StreamEvent::Finish(clean.clean(&finish, 64)));
    }
    if let (Some(i), Some(o)) = (
        count_of(value.get("num_input_tokens")),
        count_of(value.get("num_output_tokens")),
    ) {
        events.push(StreamEvent::Usage(Usage::new(i, o, i + o)));
    }
    Ok(Some(events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelInfo;

    fn ensemble() -> ModelInfo {
        ModelInfo::parse(
            &json!({"name": "ensemble", "platform": "ensemble", "inputs": [
                {"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
                {"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]},
                {"name": "image_url_input", "datatype": "BYTES", "shape": [-1, 1]},
                {"name": "temperature", "datatype": "FP32", "shape": [-1, 1]}]}),
            None,
        )
        .unwrap()
    }

    fn vllm() -> ModelInfo {
        ModelInfo::parse(
            &json!({"name": "mllama", "platform": "vllm", "inputs": [
                {"name": "text_input", "datatype": "BYTES", "shape": [1]},
                {"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1]},
                {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1]},
                {"name": "stream", "datatype": "BOOL", "shape": [1]}]}),
            Some(&json!({"model_transaction_policy": {"decoupled": true}})),
        )
        .unwrap()
    }

    fn png() -> LoadedImage {
        LoadedImage::Url("data:image/png;base64,iVBORw0KGgo=".into())
    }

    #[test]
    fn only_inputs_the_model_lists_are_sent_each_in_its_type() {
        let request = VlmRequest::builder("Describe.")
            .max_tokens(50)
            .temperature(0.2)
            .top_p(0.9)
            .seed(7)
            .build()
            .unwrap();
        let g = body(&ensemble(), &request, &[png()], None, false).unwrap();
        assert_eq!(
            g.body,
            json!({"text_input": "Describe.", "max_tokens": 50, "temperature": 0.2,
                "image_url_input": "data:image/jpeg;base64,iVBORw0KGgo="})
        );
        assert!(!g.excluded);
        let g = body(
            &vllm(),
            &request,
            &[png(), png()],
            Some("<|image|><|image|>{prompt}"),
            true,
        )
        .unwrap();
        assert_eq!(g.body["text_input"], "<|image|><|image|>Describe.");
        assert_eq!(g.body["image"], json!(["iVBORw0KGgo=", "iVBORw0KGgo="]));
        assert_eq!(g.body["exclude_input_in_output"], true);
        assert_eq!(g.body["stream"], true);
        let sampling: Value =
            serde_json::from_str(g.body["sampling_parameters"].as_str().unwrap()).unwrap();
        assert_eq!(
            sampling,
            json!({"max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "seed": 7})
        );
        assert!(g.body.get("temperature").is_none() && g.body.get("max_tokens").is_none());
    }

    #[test]
    fn what_the_model_cannot_take_is_refused_not_dropped() {
        let two = body(
            &ensemble(),
            &VlmRequest::builder("x").build().unwrap(),
            &[png(), png()],
            None,
            false,
        )
        .err()
        .unwrap();
        assert!(two.to_string().contains("one image per request"), "{two}");
        let extra = VlmRequest::builder("x").extra("top_k", 5).build().unwrap();
        let err = body(&ensemble(), &extra, &[], None, false).err().unwrap();
        assert!(
            err.is_config() && err.to_string().contains("\"top_k\""),
            "{err}"
        );
    }

    #[test]
    fn an_echoed_prompt_is_cut_and_errors_and_arrays_are_read() {
        let request = VlmRequest::builder("Describe.").build().unwrap();
        let g = body(&ensemble(), &request, &[], None, false).unwrap();
        let clean = ServerText::default();
        let (text, _, _) = answer(
            &json!({"model_name": "ensemble", "model_version": "1", "text_output": "Describe. A warm cast."}),
            &g,
            &clean,
        )
        .unwrap();
        assert_eq!(text, "A warm cast.");
        let (text, _, _) =
            answer(&json!({"text_output": ["Describe. Cool."]}), &g, &clean).unwrap();
        assert_eq!(text, "Cool.");
        let err = answer(
            &json!({"error": "generate expects model to produce exactly 1 response"}),
            &g,
            &clean,
        )
        .unwrap_err();
        assert!(matches!(err, VlmError::Generation { .. }), "{err:?}");
        let events = stream_chunk(
            VlmBackend::Triton,
            r#"{"text_output":"warm ","finish_reason":"stop"}"#,
            &clean,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            events,
            [
                StreamEvent::Text("warm ".into()),
                StreamEvent::Finish("stop".into())
            ]
        );
        assert!(stream_chunk(VlmBackend::Triton, r#"{"error":"engine died"}"#, &clean).is_err());
    }
}
