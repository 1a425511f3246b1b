//! Triton Inference Server's KServe v2 routes and its generate extension, for three kinds of
//! model repository, each as its sources answer (triton-inference-server/server `http_server.cc`,
//! tensorrtllm_backend `all_models/multimodal`, vllm_backend `src/model.py`):
//!
//! - a TensorRT-LLM multimodal ensemble: `text_input` and `max_tokens` required, one
//!   `image_url_input` per request that must start exactly `data:image/jpeg;base64,` (anything
//!   else is fetched as a URL and fails), the prompt echoed at the start of `text_output`, not
//!   decoupled;
//! - a model on Triton's vLLM backend (mllama): raw base64 `image` strings, sampling in a
//!   `sampling_parameters` JSON string (`max_tokens` 16 by default), the prompt echoed unless
//!   `exclude_input_in_output`, no chat template (the prompt must carry `<|image|>`), always
//!   decoupled;
//! - a text-only ensemble.

// A rejected request is answered once; boxing the response buys nothing here.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::analysis::analyse;
use crate::routes::{empty_response, json_response};
use crate::server::{Body, Resp, Shared};

/// Which model repository a Triton emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TritonModel {
    /// A TensorRT-LLM multimodal ensemble (mllama, qwen2_vl, llava_onevision):
    /// `image_url_input`.
    #[default]
    MultimodalEnsemble,
    /// A model on Triton's vLLM backend (mllama): `image`, `sampling_parameters`, decoupled.
    VllmBackend,
    /// A text-only TensorRT-LLM ensemble: no image input.
    TextOnly,
}

impl std::str::FromStr for TritonModel {
    type Err = String;

    /// `multimodal`, `vllm` or `text`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "multimodal" | "ensemble" | "trtllm" => Ok(TritonModel::MultimodalEnsemble),
            "vllm" => Ok(TritonModel::VllmBackend),
            "text" | "text-only" => Ok(TritonModel::TextOnly),
            other => Err(format!(
                "unknown --triton-model {other:?}: expected multimodal, vllm or text"
            )),
        }
    }
}

/// One input as the model configuration declares it.
struct Input {
    name: &'static str,
    datatype: &'static str,
    dims: &'static [i64],
    optional: bool,
}

const fn input(
    name: &'static str,
    datatype: &'static str,
    dims: &'static [i64],
    optional: bool,
) -> Input {
    Input {
        name,
        datatype,
        dims,
        optional,
    }
}

/// The TRT-LLM ensemble's inputs (v0.19 `all_models/multimodal/ensemble/config.pbtxt`, the
/// pixel inputs left out: this emulator serves the `image_url_input` models).
const ENSEMBLE: &[Input] = &[
    input("text_input", "BYTES", &[1], false),
    input("max_tokens", "INT32", &[1], false),
    input("image_url_input", "BYTES", &[1], true),
    input("bad_words", "BYTES", &[-1], true),
    input("stop_words", "BYTES", &[-1], true),
    input("end_id", "INT32", &[1], true),
    input("pad_id", "INT32", &[1], true),
    input("top_k", "INT32", &[1], true),
    input("top_p", "FP32", &[1], true),
    input("temperature", "FP32", &[1], true),
    input("random_seed", "UINT64", &[1], true),
    input("stream", "BOOL", &[1], true),
];

/// The text-only ensemble: the same without images.
const TEXT_ONLY: &[Input] = &[
    input("text_input", "BYTES", &[1], false),
    input("max_tokens", "INT32", &[1], false),
    input("stop_words", "BYTES", &[-1], true),
    input("temperature", "FP32", &[1], true),
    input("stream", "BOOL", &[1], true),
];

/// Triton's vLLM backend (`_auto_complete_inputs_and_outputs`).
const VLLM: &[Input] = &[
    input("text_input", "BYTES", &[1], false),
    input("image", "BYTES", &[-1], true),
    input("stream", "BOOL", &[1], true),
    input("sampling_parameters", "BYTES", &[1], true),
    input("exclude_input_in_output", "BOOL", &[1], true),
    input("return_finish_reason", "BOOL", &[1], true),
    input("return_num_input_tokens", "BOOL", &[1], true),
    input("return_num_output_tokens", "BOOL", &[1], true),
];

fn inputs(kind: TritonModel) -> &'static [Input] {
    match kind {
        TritonModel::MultimodalEnsemble => ENSEMBLE,
        TritonModel::VllmBackend => VLLM,
        TritonModel::TextOnly => TEXT_ONLY,
    }
}

/// The vLLM backend sets `max_batch_size: 0`; the ensembles batch (a leading -1).
fn batched(kind: TritonModel) -> bool {
    kind != TritonModel::VllmBackend
}

fn type_name(datatype: &str) -> &'static str {
    match datatype {
        "BYTES" => "TYPE_STRING",
        "INT32" => "TYPE_INT32",
        "UINT64" => "TYPE_UINT64",
        "FP32" => "TYPE_FP32",
        _ => "TYPE_BOOL",
    }
}

fn error(status: u16, message: &str) -> Resp {
    json_response(status, &json!({"error": message}))
}

/// `GET /v2/models/{m}`: metadata (no `optional`; a leading -1 on batching models).
pub(crate) fn metadata(shared: &Shared) -> Resp {
    let kind = shared.triton_model;
    let shape = |dims: &[i64]| {
        let mut s: Vec<i64> = if batched(kind) { vec![-1] } else { vec![] };
        s.extend_from_slice(dims);
        s
    };
    let ins: Vec<Value> = inputs(kind)
        .iter()
        .map(|i| json!({"name": i.name, "datatype": i.datatype, "shape": shape(i.dims)}))
        .collect();
    let mut outs = vec![json!({"name": "text_output", "datatype": "BYTES", "shape": shape(&[-1])})];
    if kind == TritonModel::VllmBackend {
        outs.push(json!({"name": "finish_reason", "datatype": "BYTES", "shape": [-1]}));
        outs.push(json!({"name": "num_input_tokens", "datatype": "UINT32", "shape": [1]}));
        outs.push(json!({"name": "num_output_tokens", "datatype": "UINT32", "shape": [-1]}));
    }
    let platform = if kind == TritonModel::VllmBackend {
        "vllm"
    } else {
        "ensemble"
    };
    json_response(
        200,
        &json!({"name": shared.model, "versions": ["1"], "platform": platform,
            "inputs": ins, "outputs": outs}),
    )
}

/// `GET /v2/models/{m}/config`: the model configuration as JSON.
pub(crate) fn config(shared: &Shared) -> Resp {
    let kind = shared.triton_model;
    let ins: Vec<Value> = inputs(kind)
        .iter()
        .map(|i| {
            json!({"name": i.name, "data_type": type_name(i.datatype), "dims": i.dims,
                "optional": i.optional, "allow_ragged_batch": false})
        })
        .collect();
    let mut config = json!({
        "name": shared.model, "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": if batched(kind) { 8 } else { 0 }, "input": ins,
        "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]}],
    });
    if kind == TritonModel::VllmBackend {
        config["backend"] = json!("vllm");
        config["platform"] = json!("");
        config["model_transaction_policy"] = json!({"decoupled": true});
    } else {
        config["platform"] = json!("ensemble");
        config["backend"] = json!("");
    }
    json_response(200, &config)
}

/// The values of one input, flattened, after Triton's type and shape checks.
fn tensor(input: &Input, value: &Value, batched: bool) -> Result<Vec<Value>, Resp> {
    let values: Vec<Value> = match value {
        Value::Array(items) => items
            .iter()
            .flat_map(|v| match v {
                Value::Array(inner) => inner.clone(),
                other => vec![other.clone()],
            })
            .collect(),
        other => vec![other.clone()],
    };
    for v in &values {
        let ok = match input.datatype {
            "BYTES" => v.is_string(),
            "INT32" => v.is_i64(),
            "UINT64" => v.is_u64(),
            "FP32" => v.is_number(),
            _ => v.is_boolean(),
        };
        if !ok {
            // TritonJson errors are INTERNAL: a 500.
            let what = match input.datatype {
                "BYTES" => "Unable to parse JSON bytes array: attempt to access JSON non-string as string".to_owned(),
                "INT32" | "UINT64" => "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer".to_owned(),
                "FP32" => "Unable to parse 'data': attempt to access JSON non-number as number".to_owned(),
                _ => "Unable to parse 'data': attempt to access JSON non-boolean as boolean".to_owned(),
            };
            return Err(error(500, &what));
        }
    }
    let fixed: i64 = input.dims.iter().filter(|d| **d > 0).product();
    let fits = if input.dims.contains(&-1) {
        !values.is_empty() && values.len() as i64 % fixed == 0
    } else {
        values.len() as i64 == fixed || (batched && values.len() as i64 % fixed == 0)
    };
    if !fits {
        return Err(error(
            400,
            &format!(
                "The schema can not convert input '{}' to tensor with proper shape",
                input.name
            ),
        ));
    }
    Ok(values)
}

/// The request's tensors by input name; other keys are request parameters.
fn parse_request(shared: &Shared, body: &[u8]) -> Result<BTreeMap<&'static str, Vec<Value>>, Resp> {
    let kind = shared.triton_model;
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Err(error(
            400,
            "failed to parse the request JSON buffer: invalid value",
        ));
    };
    let mut candidates: Map<String, Value> = Map::new();
    for (k, v) in obj {
        if k == "parameters" {
            let Value::Object(nested) = v else {
                return Err(error(400, "Expected JSON object for keyword: 'parameters'"));
            };
            candidates.extend(nested);
        } else {
            candidates.insert(k, v);
        }
    }
    let mut tensors = BTreeMap::new();
    for (key, value) in &candidates {
        match inputs(kind).iter().find(|i| i.name == key) {
            Some(input) => {
                tensors.insert(input.name, tensor(input, value, batched(kind))?);
            }
            None if value.is_array() || value.is_object() => {
                return Err(error(
                    400,
                    &format!(
                        "parameter '{key}' has invalid type. It should be either 'int', 'bool', or 'string'."
                    ),
                ));
            }
            None => {} // a request parameter this model never reads
        }
    }
    let required = inputs(kind).iter().filter(|i| !i.optional).count();
    let missing = inputs(kind)
        .iter()
        .any(|i| !i.optional && !tensors.contains_key(i.name));
    if missing {
        return Err(error(
            400,
            &format!(
                "expected number of inputs between {required} and {} but got {} inputs for model '{}'",
                inputs(kind).len(),
                tensors.len(),
                shared.model
            ),
        ));
    }
    Ok(tensors)
}

fn first_str<'a>(tensors: &'a BTreeMap<&'static str, Vec<Value>>, name: &str) -> Option<&'a str> {
    tensors.get(name)?.first()?.as_str()
}

fn first_bool(tensors: &BTreeMap<&'static str, Vec<Value>>, name: &str) -> Option<bool> {
    tensors.get(name)?.first()?.as_bool()
}

/// What a valid request asked for.
struct Ask {
    prompt: String,
    images: Vec<Vec<u8>>,
    max_tokens: usize,
    echo: bool,
    stream: bool,
    /// The vLLM backend's `structured_outputs.json`: answer JSON valid for it.
    schema: Option<Value>,
}

/// The kind's own rules over the parsed tensors.
fn ask(shared: &Shared, tensors: &BTreeMap<&'static str, Vec<Value>>) -> Result<Ask, Resp> {
    let prompt = first_str(tensors, "text_input")
        .unwrap_or_default()
        .to_owned();
    let stream = first_bool(tensors, "stream").unwrap_or(false);
    match shared.triton_model {
        TritonModel::VllmBackend => vllm_ask(tensors, prompt, stream),
        kind => {
            let max_tokens = tensors["max_tokens"][0].as_i64().unwrap_or(0).max(0) as usize;
            let mut images = Vec::new();
            if let Some(urls) = tensors.get("image_url_input") {
                for url in urls.iter().filter_map(Value::as_str) {
                    images.push(preprocess_image_url(url)?);
                }
            }
            if stream {
                return Err(error(
                    500,
                    "Streaming is only supported if model is deployed using decoupled mode.",
                ));
            }
            let _ = kind;
            Ok(Ask {
                prompt,
                images,
                max_tokens,
                echo: true,
                stream,
                schema: None,
            })
        }
    }
}

/// The ensemble's preprocessing: only this exact prefix is decoded; anything else goes to
/// `requests.get` and fails.
fn preprocess_image_url(url: &str) -> Result<Vec<u8>, Resp> {
    let fail = |why: String| {
        error(
            500,
            &format!(
                "in ensemble 'ensemble', Failed to process the request(s) for model instance \
                 'preprocessing_0_0', message: {why}"
            ),
        )
    };
    let Some(b64) = url.strip_prefix("data:image/jpeg;base64,") else {
        let shown: String = url.chars().take(40).collect();
        return Err(fail(format!(
            "MissingSchema: Invalid URL '{shown}...': No scheme supplied. Perhaps you meant https://?"
        )));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| fail(format!("binascii.Error: {e}")))?;
    // PIL detects the real format from the bytes.
    analyse(&bytes).map_err(|e| fail(format!("PIL.UnidentifiedImageError: {e}")))?;
    Ok(bytes)
}

fn vllm_ask(
    tensors: &BTreeMap<&'static str, Vec<Value>>,
    prompt: String,
    stream: bool,
) -> Result<Ask, Resp> {
    let fail = |why: &str| error(400, &format!("Error generating stream: {why}"));
    let mut images = Vec::new();
    for b64 in tensors
        .get("image")
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| {
                fail(&format!(
                    "Incorrect base64 image ({e}); send raw base64, no data: prefix"
                ))
            })?;
        analyse(&bytes).map_err(|e| fail(&format!("cannot identify image file: {e}")))?;
        images.push(bytes);
    }
    let sampling: Value = match first_str(tensors, "sampling_parameters") {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| fail(&format!("invalid sampling_parameters: {e}")))?,
        None => json!({}),
    };
    let max_tokens = sampling
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(16) as usize;
    let exclude = first_bool(tensors, "exclude_input_in_output");
    if stream && exclude != Some(true) {
        return Err(fail(
            "When streaming, exclude_input_in_output = False is not allowed.",
        ));
    }
    // No chat template: mllama needs one <|image|> per image in the prompt itself.
    let placeholders = prompt.matches("<|image|>").count();
    if placeholders != images.len() {
        return Err(fail(&format!(
            "Attempted to assign {} = {} multimodal tokens to {placeholders} placeholders",
            images.len(),
            images.len()
        )));
    }
    Ok(Ask {
        prompt,
        images,
        max_tokens,
        echo: exclude != Some(true),
        stream,
        schema: sampling
            .get("structured_outputs")
            .and_then(|s| s.get("json"))
            .cloned(),
    })
}

/// The answer's words (one "token" each) and why generation stopped.
fn answer(ask: &Ask) -> (Vec<String>, &'static str) {
    let text = if ask.images.is_empty() {
        format!(
            "[emulator] no image received; the prompt had {} characters",
            ask.prompt.chars().count()
        )
    } else {
        let parts: Vec<String> = ask
            .images
            .iter()
            .enumerate()
            .map(|(i, img)| match analyse(img) {
                Ok(s) if ask.images.len() == 1 => s.describe(),
                Ok(s) => format!("image {}: {}", i + 1, s.describe()),
                Err(e) => format!("image {}: {e}", i + 1),
            })
            .collect();
        format!("[emulator] {}", parts.join(" | "))
    };
    let text = match &ask.schema {
        Some(schema) => crate::routes::sample(schema, &text).to_string(),
        None => text,
    };
    let words: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
    if ask.max_tokens < words.len() {
        (words[..ask.max_tokens].to_vec(), "length")
    } else {
        (words, "stop")
    }
}

/// `POST /v2/models/{m}/generate` and `/generate_stream`.
pub(crate) fn generate(shared: &Shared, body: &[u8], streaming: bool) -> Resp {
    let tensors = match parse_request(shared, body) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let ask = match ask(shared, &tensors) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let (words, finish) = answer(&ask);
    let vllm = shared.triton_model == TritonModel::VllmBackend;
    let mut reply = json!({"model_name": shared.model, "model_version": "1"});
    let extras = |reply: &mut Value, tokens: usize| {
        if vllm && first_bool(&tensors, "return_finish_reason") == Some(true) {
            reply["finish_reason"] = json!(finish);
        }
        if vllm && first_bool(&tensors, "return_num_input_tokens") == Some(true) {
            reply["num_input_tokens"] =
                json!(ask.prompt.len().div_ceil(4) + 6400 * ask.images.len());
        }
        if vllm && first_bool(&tensors, "return_num_output_tokens") == Some(true) {
            reply["num_output_tokens"] = json!(tokens);
        }
    };
    if streaming && (ask.stream || !vllm) {
        if !vllm {
            // Not decoupled: one event with the whole answer (echo included).
            reply["text_output"] = json!(format!("{}{}", ask.prompt, words.concat()));
            return sse(vec![reply.to_string()]);
        }
        let mut events: Vec<String> = words
            .iter()
            .map(|w| {
                json!({"model_name": shared.model, "model_version": "1", "text_output": w})
                    .to_string()
            })
            .collect();
        if let Some(last) = events.last_mut() {
            let mut v: Value = serde_json::from_str(last).unwrap_or_default();
            extras(&mut v, words.len());
            *last = v.to_string();
        }
        return sse(events);
    }
    let mut text = words.concat();
    if ask.echo {
        text = format!("{}{text}", ask.prompt);
    }
    reply["text_output"] = json!(text);
    extras(&mut reply, words.len());
    json_response(200, &reply)
}

fn sse(events: Vec<String>) -> Resp {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        for event in events {
            tokio::time::sleep(Duration::from_millis(2)).await;
            if tx
                .send(Ok(Bytes::from(format!("data: {event}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut resp = Response::new(Body::Channel(rx));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp
}

/// Triton's routes.
pub(crate) fn route(shared: &Shared, method: &str, path: &str, body: &[u8]) -> Resp {
    let not_found = |m: &str| {
        error(
            404,
            &format!("Request for unknown model: '{m}' is not found"),
        )
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // `/v2/models/{m}/versions/{v}/...` is the same model.
    let segments: Vec<&str> = match segments.as_slice() {
        ["v2", "models", m, "versions", _v, rest @ ..] => {
            let mut s = vec!["v2", "models", *m];
            s.extend_from_slice(rest);
            s
        }
        _ => segments,
    };
    match (method, segments.as_slice()) {
        ("GET", ["v2", "health", "live"]) | ("GET", ["v2", "health", "ready"]) => {
            empty_response(200)
        }
        ("GET", ["v2"]) => json_response(
            200,
            &json!({"name": "triton", "version": "2.62.0", "extensions": [
                "classification", "sequence", "model_repository", "model_repository(unload_dependents)",
                "schedule_policy", "model_configuration", "system_shared_memory", "cuda_shared_memory",
                "binary_tensor_data", "parameters", "statistics", "trace", "logging", "generate"]}),
        ),
        ("GET", ["v2", "models", m, rest @ ..]) | ("POST", ["v2", "models", m, rest @ ..])
            if *m != shared.model =>
        {
            let _ = rest;
            not_found(m)
        }
        ("GET", ["v2", "models", _, "ready"]) => empty_response(200),
        ("GET", ["v2", "models", _]) => metadata(shared),
        ("GET", ["v2", "models", _, "config"]) => config(shared),
        ("POST", ["v2", "models", _, "generate"]) => generate(shared, body, false),
        ("POST", ["v2", "models", _, "generate_stream"]) => generate(shared, body, true),
        ("POST", ["v2", "repository", "index"]) => json_response(
            200,
            &json!([{"name": shared.model, "version": "1", "state": "READY"}]),
        ),
        _ => error(404, "Not Found"),
    }
}
