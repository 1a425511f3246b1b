//! Routes and bodies, as each real server answers them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util_lite::collect_limited;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use vlm_core::{ImageMime, VlmBackend};

use crate::analysis::analyse;
use crate::server::{
    Body, CloseConnection, Fault, OpenAiFlavor, RecordedRequest, Resp, Shared, lock,
};

/// The largest request body accepted (vLLM's default limit is far larger; this bounds memory).
const MAX_REQUEST_BYTES: usize = 256 * 1024 * 1024;

mod http_body_util_lite {
    use bytes::{Bytes, BytesMut};
    use http_body::Body as _;
    use hyper::body::Incoming;

    /// Reads a whole request body, refusing more than `limit` bytes.
    pub(crate) async fn collect_limited(mut body: Incoming, limit: usize) -> Result<Bytes, String> {
        let mut out = BytesMut::new();
        loop {
            let frame =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
            match frame {
                None => return Ok(out.freeze()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if out.len() + data.len() > limit {
                            return Err(format!("request body over {limit} bytes"));
                        }
                        out.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

pub(crate) fn json_response(status: u16, body: &Value) -> Resp {
    raw_response(status, "application/json", body.to_string())
}

pub(crate) fn raw_response(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(CONTENT_TYPE, v);
    }
    resp
}

/// A plain-text answer (Ollama's banner, Go's 404 and 405 pages).
pub(crate) fn text(status: u16, body: &'static str) -> Resp {
    raw_response(status, "text/plain; charset=utf-8", body)
}

pub(crate) fn empty_response(status: u16) -> Resp {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

/// An error in the server's own shape.
fn error(shared: &Shared, status: u16, kind: &str, message: &str, param: Option<&str>) -> Resp {
    match shared.backend {
        VlmBackend::Ollama => json_response(status, &crate::servers::ollama_error(status, message)),
        VlmBackend::OpenAi => json_response(
            status,
            &crate::servers::openai_error(shared.flavor, status, message),
        ),
        // vLLM >= 0.10.1: nested.
        VlmBackend::Vllm => json_response(
            status,
            &json!({"error": {"message": message, "type": kind, "param": param, "code": status}}),
        ),
        // LMDeploy: flat.
        VlmBackend::LmDeploy => json_response(
            status,
            &json!({"object": "error", "message": message, "type": kind, "param": param, "code": status}),
        ),
        _ => json_response(status, &json!({"error": message})),
    }
}

/// FastAPI's request-validation answer (LMDeploy's missing required fields, bad JSON).
fn validation_error(loc: &[&str], msg: &str, kind: &str) -> Resp {
    json_response(
        422,
        &json!({"detail": [{"type": kind, "loc": loc, "msg": msg, "input": null}]}),
    )
}

/// The fast mode's one answer.
const FIXED_ANSWER: &str = r#"{"id":"chatcmpl-emulator-fast","object":"chat.completion","created":0,"model":"fast","choices":[{"index":0,"message":{"role":"assistant","content":"[emulator] fixed answer"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}"#;

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    if shared.fast
        && req.method() == hyper::Method::POST
        && req.uri().path().ends_with("/chat/completions")
    {
        return match collect_limited(req.into_body(), MAX_REQUEST_BYTES).await {
            Ok(_) => raw_response(200, "application/json", FIXED_ANSWER),
            Err(e) => error(&shared, 413, "BadRequestError", &e, None),
        };
    }
    let method = req.method().as_str().to_owned();
    let full_path = req.uri().path().to_owned();
    // Behind a gateway: only the prefix's routes exist, without the prefix for the server.
    let path = match shared.prefix.as_deref() {
        None => full_path,
        Some(prefix) => match full_path.strip_prefix(prefix) {
            Some(rest) if rest.starts_with('/') => rest.to_owned(),
            _ => {
                return raw_response(
                    404,
                    "text/html",
                    "<html><head><title>404 Not Found</title></head><body><h1>404 Not Found</h1>\
                     <hr>nginx</body></html>",
                );
            }
        },
    };
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match collect_limited(req.into_body(), MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(e) => return error(&shared, 413, "BadRequestError", &e, None),
    };
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let record = RecordedRequest {
        method: method.clone(),
        path: path.clone(),
        headers,
        json: parsed,
        body_len: body.len(),
        received_at: std::time::Instant::now(),
    };
    lock(&shared.requests).push(record.clone());
    tracing::debug!(backend = %shared.backend, "{method} {path} ({} bytes)", body.len());

    let other_delay = lock(&shared.faults).other_delay;
    if !other_delay.is_zero() && !path.ends_with("/chat/completions") {
        tokio::time::sleep(other_delay).await;
    }
    match shared.backend {
        VlmBackend::Triton => crate::triton::route(&shared, &method, &path, &body),
        VlmBackend::Ollama => match crate::servers::ollama(&shared, &method, &path) {
            Some(resp) => resp,
            None => chat(&shared, &record, &body).await,
        },
        VlmBackend::OpenAi => openai_compatible(&shared, &record, &body).await,
        _ => openai(&shared, &record, &body).await,
    }
}

fn authorized(shared: &Shared, record: &RecordedRequest) -> bool {
    let Some(key) = &shared.api_key else {
        return true;
    };
    let Some(value) = record.header("authorization") else {
        return false;
    };
    let mut parts = value.splitn(2, ' ');
    let scheme = parts.next().unwrap_or_default();
    let given = parts.next().unwrap_or_default();
    scheme.eq_ignore_ascii_case("bearer") && given == key
}

async fn openai(shared: &Shared, record: &RecordedRequest, body: &Bytes) -> Resp {
    let backend = shared.backend;
    let path = record.path.as_str();
    let protected = match backend {
        // vLLM guards the API prefixes only; /health and /version stay open.
        VlmBackend::Vllm => ["/v1", "/v2", "/inference"]
            .iter()
            .any(|p| path.starts_with(p)),
        // LMDeploy guards everything but these.
        _ => !matches!(path, "/health" | "/docs" | "/redoc" | "/nodes"),
    };
    if protected && !authorized(shared, record) {
        return match backend {
            VlmBackend::Vllm => json_response(401, &json!({"error": "Unauthorized"})),
            _ => error(shared, 401, "authentication_error", "Unauthorized.", None),
        };
    }
    match (record.method.as_str(), path) {
        ("GET", "/health") => match backend {
            VlmBackend::Vllm => empty_response(200),
            _ => json_response(200, &json!({"status": "healthy", "message": ""})),
        },
        ("GET", "/version") if backend == VlmBackend::Vllm => {
            json_response(200, &json!({"version": "0.33.0"}))
        }
        ("GET", "/v1/models") => json_response(200, &models(shared)),
        ("GET", "/metrics") if backend == VlmBackend::Vllm => raw_response(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            crate::capacity::vllm_metrics(&shared.model, shared.capacity.as_ref()),
        ),
        ("POST", "/v1/chat/completions") => chat(shared, record, body).await,
        (_, "/v1/chat/completions" | "/health" | "/v1/models") => {
            json_response(405, &json!({"detail": "Method Not Allowed"}))
        }
        _ => json_response(404, &json!({"detail": "Not Found"})),
    }
}

/// SGLang, llama.cpp or trtllm-serve: loading, the key (on `/v1`), their own routes, the model
/// list, chat.
async fn openai_compatible(shared: &Shared, record: &RecordedRequest, body: &Bytes) -> Resp {
    let path = record.path.as_str();
    if std::time::Instant::now() < shared.loading_until {
        return match shared.flavor {
            OpenAiFlavor::LlamaCpp => crate::servers::llama_loading(),
            _ if path == "/health" => empty_response(503),
            _ => error(
                shared,
                503,
                "ServiceUnavailableError",
                "the server is starting",
                None,
            ),
        };
    }
    if path.starts_with("/v1") && !authorized(shared, record) {
        return error(shared, 401, "authentication_error", "Invalid API Key", None);
    }
    match crate::servers::openai_server(shared, &record.method, path) {
        Some(resp) => resp,
        None if path == "/v1/models" => json_response(200, &crate::servers::openai_models(shared)),
        None => chat(shared, record, body).await,
    }
}

fn models(shared: &Shared) -> Value {
    let created = now();
    let mut entry = json!({
        "id": shared.model, "object": "model", "created": created,
        "owned_by": shared.backend.as_str(), "root": shared.model, "parent": null,
        "permission": [{"id": "modelperm-emulator", "object": "model_permission", "created": created,
            "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
            "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
            "organization": "*", "group": null, "is_blocking": false}]
    });
    if shared.backend == VlmBackend::Vllm {
        entry["max_model_len"] = json!(32768);
    }
    json!({"object": "list", "data": [entry]})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a valid request asked for.
struct ChatAsk {
    model: String,
    images: Vec<Vec<u8>>,
    prompt_chars: usize,
    max_tokens: Option<u64>,
    stream: bool,
    include_usage: bool,
    /// `response_format.json_schema.schema`: answer JSON valid for it.
    schema: Option<Value>,
}

/// A value valid for a (simple) JSON Schema, its strings carrying `text`: what a model under
/// structured-output decoding would answer.
pub(crate) fn sample(schema: &Value, text: &str) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema
            .get(key)
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return sample(first, text);
        }
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.first().and_then(Value::as_str).unwrap_or("string"),
        Some(Value::String(kind)) => kind.as_str(),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match kind {
        "object" => Value::Object(
            schema
                .get("properties")
                .and_then(Value::as_object)
                .map(|props| {
                    props
                        .iter()
                        .map(|(k, s)| (k.clone(), sample(s, text)))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        "array" => Value::Array(vec![sample(
            schema.get("items").unwrap_or(&Value::Null),
            text,
        )]),
        "integer" => json!(schema.get("minimum").and_then(Value::as_i64).unwrap_or(7)),
        "number" => json!(0.5),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => Value::String(text.to_owned()),
    }
}

async fn chat(shared: &Shared, record: &RecordedRequest, body: &Bytes) -> Resp {
    let backend = shared.backend;
    let bad = |message: &str| error(shared, 400, bad_kind(backend), message, None);
    let content_type = record.header("content-type").unwrap_or_default();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return bad("Unsupported Media Type: Only 'application/json' is allowed");
    }
    let Some(json) = &record.json else {
        let msg = format!(
            "JSON decode error: {}",
            serde_json::from_slice::<Value>(body)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        );
        return match backend {
            VlmBackend::LmDeploy => validation_error(&["body", "0"], &msg, "json_invalid"),
            _ => bad(&msg),
        };
    };
    let ask = match validate(shared, json) {
        Ok(ask) => ask,
        Err(resp) => return resp,
    };

    let (fault, delay) = {
        let mut faults = lock(&shared.faults);
        (faults.queue.pop_front(), faults.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut not_json = false;
    match fault {
        Some(Fault::Status {
            status,
            content_type,
            body,
            headers,
        }) => {
            let mut resp = raw_response(status, &content_type, body);
            for (k, v) in headers {
                if let (Ok(name), Ok(value)) = (
                    hyper::header::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(&v),
                ) {
                    resp.headers_mut().insert(name, value);
                }
            }
            return resp;
        }
        Some(Fault::Hang) => {
            std::future::pending::<()>().await;
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Trickle(every)) => {
            if !ask.stream {
                std::future::pending::<()>().await;
            }
            return trickle(shared, &ask, every);
        }
        Some(Fault::CloseWithoutResponse) => {
            let mut resp = empty_response(500);
            resp.extensions_mut().insert(CloseConnection);
            return resp;
        }
        Some(Fault::EchoAuthorization) => {
            let given = record.header("authorization").unwrap_or("(none)");
            return error(
                shared,
                401,
                "authentication_error",
                &format!("invalid credentials: the request had 'Authorization: {given}'"),
                None,
            );
        }
        Some(Fault::NotJson) => not_json = true,
        Some(Fault::DropMidBody) => return dropped_mid_body(),
        Some(Fault::StallAfterHeaders(status)) => return stalled(status),
        Some(Fault::FinishReasonError(message)) => {
            return json_response(
                200,
                &completion(shared, &ask.model, &message, "error", 0, 0),
            );
        }
        None => {}
    }

    let mut descriptions = Vec::with_capacity(ask.images.len());
    for (i, image) in ask.images.iter().enumerate() {
        match analyse(image) {
            Ok(summary) if ask.images.len() == 1 => descriptions.push(summary.describe()),
            Ok(summary) => descriptions.push(format!("image {}: {}", i + 1, summary.describe())),
            Err(e) => return bad(&format!("image {}: {e}", i + 1)),
        }
    }
    let answer = if descriptions.is_empty() {
        format!(
            "[emulator] no image received; the prompt had {} characters",
            ask.prompt_chars
        )
    } else {
        format!("[emulator] {}", descriptions.join(" | "))
    };
    // Under a JSON schema the answer is JSON valid for it (its strings carry the description);
    // a NotJson fault answers prose instead, as an unconstrained model may.
    let answer = match (&ask.schema, not_json) {
        (Some(_), true) => "I cannot give JSON, but the cast is warm.".to_owned(),
        (Some(schema), false) => sample(schema, &answer).to_string(),
        (None, _) => answer,
    };
    // One "token" per word: enough to exercise max_tokens and finish_reason "length".
    let words: Vec<&str> = answer.split_inclusive(' ').collect();
    let limit = ask
        .max_tokens
        .map_or(words.len(), |m| (m as usize).min(words.len()));
    let (text, finish) = if limit < words.len() {
        (words[..limit].concat(), "length")
    } else {
        (answer.clone(), "stop")
    };
    let prompt_tokens = (ask.prompt_chars as u64).div_ceil(4) + 256 * ask.images.len() as u64;
    let completion_tokens = limit as u64;
    if let Some(capacity) = &shared.capacity
        && !capacity.decode(completion_tokens).await
    {
        return error(
            shared,
            503,
            "ServiceUnavailableError",
            "The server is overloaded: too many requests are waiting; try again later",
            None,
        );
    }
    if ask.stream {
        return stream(
            shared,
            &ask,
            &words[..limit],
            finish,
            prompt_tokens,
            completion_tokens,
        );
    }
    json_response(
        200,
        &completion(
            shared,
            &ask.model,
            &text,
            finish,
            prompt_tokens,
            completion_tokens,
        ),
    )
}

fn bad_kind(backend: VlmBackend) -> &'static str {
    match backend {
        VlmBackend::Vllm => "BadRequestError",
        _ => "invalid_request_error",
    }
}

fn completion(
    shared: &Shared,
    model: &str,
    text: &str,
    finish: &str,
    prompt: u64,
    completion: u64,
) -> Value {
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    json!({
        "id": format!("chatcmpl-emulator-{n}"),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": null,
            "finish_reason": finish
        }],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    })
}

/// The model a chat request names, as each server checks it.
#[allow(clippy::result_large_err)] // built once per request; boxing buys nothing here
fn requested_model(shared: &Shared, obj: &serde_json::Map<String, Value>) -> Result<String, Resp> {
    let backend = shared.backend;
    let bad = |message: &str| error(shared, 400, bad_kind(backend), message, Some("model"));
    let model = match (obj.get("model"), backend, shared.flavor) {
        (Some(Value::String(m)), _, _) => m.clone(),
        (Some(_), _, _) => return Err(bad("model must be a string")),
        // vLLM: optional, the first served model; SGLang and llama.cpp: optional, ignored.
        (None, VlmBackend::Vllm, _)
        | (
            None,
            VlmBackend::OpenAi,
            OpenAiFlavor::Sglang | OpenAiFlavor::LlamaCpp | OpenAiFlavor::LmStudio,
        ) => shared.model.clone(),
        (None, VlmBackend::Ollama, _) => return Err(bad("model is required")),
        // trtllm-serve: pydantic's "Field required", as its {"error": "..."} body.
        (None, VlmBackend::OpenAi, _) => {
            return Err(json_response(
                400,
                &json!({"error": "1 validation error for ChatCompletionRequest\nmodel\n  Field required [type=missing, input_value={...}, input_type=dict]"}),
            ));
        }
        // LMDeploy: a required field.
        (None, _, _) => {
            return Err(validation_error(
                &["body", "model"],
                "Field required",
                "missing",
            ));
        }
    };
    let served = match backend {
        // Ollama reads an untagged name as `:latest`.
        VlmBackend::Ollama => {
            crate::servers::ollama_tagged(&model) == crate::servers::ollama_tagged(&shared.model)
        }
        // The generic servers do not check the name against what they serve.
        VlmBackend::OpenAi => true,
        _ => model == shared.model,
    };
    if served {
        return Ok(model);
    }
    Err(match backend {
        VlmBackend::Ollama => error(
            shared,
            404,
            "not_found_error",
            &format!("model '{model}' not found"),
            None,
        ),
        VlmBackend::Vllm => error(
            shared,
            404,
            "NotFoundError",
            &format!("The model `{model}` does not exist."),
            Some("model"),
        ),
        _ => error(
            shared,
            404,
            "not_found_error",
            &format!("The model '{model}' does not exist."),
            None,
        ),
    })
}

#[allow(clippy::result_large_err)] // built once per request; boxing buys nothing here
fn validate(shared: &Shared, json: &Value) -> Result<ChatAsk, Resp> {
    let backend = shared.backend;
    let bad = |message: String, param: Option<&str>| {
        error(shared, 400, bad_kind(backend), &message, param)
    };
    let Some(obj) = json.as_object() else {
        return Err(bad("the request body must be a JSON object".into(), None));
    };
    let model = requested_model(shared, obj)?;
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let stream_options = obj.get("stream_options").filter(|v| !v.is_null());
    if stream_options.is_some() && !stream && backend == VlmBackend::Vllm {
        return Err(bad(
            "Stream options can only be defined when `stream=True`.".into(),
            Some("stream_options"),
        ));
    }
    let include_usage = stream_options
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = match obj
        .get("max_tokens")
        .or_else(|| obj.get("max_completion_tokens"))
    {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(bad(
                    format!("max_tokens must be at least 1, got {v}"),
                    Some("max_tokens"),
                ));
            }
        },
    };
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return Err(match backend {
            VlmBackend::LmDeploy => {
                validation_error(&["body", "messages"], "Field required", "missing")
            }
            _ => bad(
                "messages must be a non-empty list of messages".into(),
                Some("messages"),
            ),
        });
    };
    if messages.is_empty() {
        return Err(bad(
            "messages must be a non-empty list of messages".into(),
            Some("messages"),
        ));
    }
    let mut images = Vec::new();
    let mut prompt_chars = 0;
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str);
        if !matches!(
            role,
            Some("system" | "user" | "assistant" | "developer" | "tool")
        ) {
            return Err(bad(
                format!("messages[{i}].role must be system, user, assistant, developer or tool"),
                Some("messages"),
            ));
        }
        match message.get("content") {
            Some(Value::String(text)) => prompt_chars += text.chars().count(),
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => match part.get("text").and_then(Value::as_str) {
                            Some(text) => prompt_chars += text.chars().count(),
                            None => {
                                return Err(bad(
                                    format!("messages[{i}].content[{j}].text must be a string"),
                                    Some("messages"),
                                ));
                            }
                        },
                        Some("image_url") => {
                            let url = part
                                .get("image_url")
                                .and_then(|u| u.get("url"))
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(format!("messages[{i}].content[{j}].image_url.url must be a string"), Some("messages")))?;
                            if backend == VlmBackend::Ollama {
                                // Ollama's answer is the bare message, nothing more.
                                crate::servers::ollama_image_url(url).map_err(|e| bad(e, None))?;
                            }
                            images.push(decode_data_url(url).map_err(|e| {
                                bad(format!("messages[{i}].content[{j}]: {e}"), Some("messages"))
                            })?);
                        }
                        other => {
                            return Err(bad(
                                format!(
                                    "messages[{i}].content[{j}] has unsupported type {other:?}; expected \"text\" or \"image_url\""
                                ),
                                Some("messages"),
                            ));
                        }
                    }
                }
            }
            Some(Value::Null) | None if role == Some("assistant") => {}
            _ => {
                return Err(bad(
                    format!("messages[{i}].content must be a string or a list of parts"),
                    Some("messages"),
                ));
            }
        }
    }
    if shared.flavor == OpenAiFlavor::LlamaCpp && backend == VlmBackend::OpenAi {
        crate::servers::llama_decodable(&images).map_err(|e| bad(e, None))?;
    }
    Ok(ChatAsk {
        model,
        images,
        prompt_chars,
        max_tokens,
        stream,
        include_usage,
        schema: obj
            .get("response_format")
            .filter(|f| f.get("type").and_then(Value::as_str) == Some("json_schema"))
            .and_then(|f| f.get("json_schema"))
            .and_then(|j| j.get("schema"))
            .cloned(),
    })
}

/// Decodes `data:<mime>;base64,<payload>`, checking the bytes are that image type.
fn decode_data_url(url: &str) -> Result<Vec<u8>, String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err("the emulator does not fetch remote images (it has no network); send the image as a data: URL".into());
    }
    let rest = url.strip_prefix("data:").ok_or_else(|| {
        format!(
            "invalid image URL {:?}: expected data:<mime>;base64,<data>",
            truncate(url, 40)
        )
    })?;
    let (header, payload) = rest
        .split_once(',')
        .ok_or_else(|| "invalid data URL: no ',' before the data".to_owned())?;
    let mime = header.strip_suffix(";base64").ok_or_else(|| {
        format!("invalid data URL header {header:?}: only base64 data URLs are supported")
    })?;
    let declared =
        ImageMime::from_mime_str(mime).ok_or_else(|| format!("unsupported image type {mime:?}"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| format!("invalid base64 in the image data URL: {e}"))?;
    match ImageMime::detect(&bytes) {
        Some(found) if found == declared => Ok(bytes),
        Some(found) => Err(format!(
            "declared {mime} but the bytes are {}",
            found.as_str()
        )),
        None => Err(format!(
            "cannot identify image file: the {mime} data is not an image"
        )),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Headers promising a longer body than is sent, part of it, then the connection closes.
fn dropped_mid_body() -> Resp {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let _ = tx.send(Ok(Bytes::from_static(b"{\"id\":\"chatcmpl-cut\",\"object\":\"chat.completion\",\"choices\":[{\"message\":{\"content\":\"half"))).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = tx
            .send(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "emulator dropped the connection mid-body",
            )))
            .await;
    });
    let mut resp = Response::new(Body::Channel(rx));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("4096"));
    resp
}

/// An SSE answer that never ends: one word every `every`, until the client goes away.
fn trickle(shared: &Shared, ask: &ChatAsk, every: Duration) -> Resp {
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let model = ask.model.clone();
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        loop {
            let chunk = json!({
                "id": format!("chatcmpl-emulator-{n}"), "object": "chat.completion.chunk",
                "created": now(), "model": model,
                "choices": [{"index": 0, "delta": {"content": "slow "}, "logprobs": null, "finish_reason": null}]
            });
            if tx
                .send(Ok(Bytes::from(format!("data: {chunk}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut resp = Response::new(Body::Channel(rx));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp
}

/// Headers that promise a body which never comes.
fn stalled(status: u16) -> Resp {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        // Keep the sender alive: the body neither arrives nor ends.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(tx);
    });
    let mut resp = Response::new(Body::Channel(rx));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("512"));
    resp
}

/// SSE framed as vLLM and LMDeploy frame it.
fn stream(
    shared: &Shared,
    ask: &ChatAsk,
    words: &[&str],
    finish: &str,
    prompt: u64,
    completion: u64,
) -> Resp {
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-emulator-{n}");
    let created = now();
    let model = ask.model.clone();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        })
    };
    let mut events: Vec<String> = Vec::new();
    events.push(format!(
        "data: {}\n\n",
        chunk(json!({"role": "assistant", "content": ""}), None)
    ));
    if shared.backend == VlmBackend::Vllm {
        events.push(": keep-alive\n\n".to_owned());
    }
    for (i, word) in words.iter().enumerate() {
        let last = i + 1 == words.len();
        events.push(format!(
            "data: {}\n\n",
            chunk(json!({"content": word}), last.then_some(finish))
        ));
    }
    if words.is_empty() {
        events.push(format!("data: {}\n\n", chunk(json!({}), Some(finish))));
    }
    if ask.include_usage {
        let usage = json!({
            "id": format!("chatcmpl-emulator-{n}"), "object": "chat.completion.chunk", "created": created,
            "model": ask.model, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        });
        events.push(format!("data: {usage}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        for event in events {
            if tx.send(Ok(Bytes::from(event))).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(Body::Channel(rx));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp
}
