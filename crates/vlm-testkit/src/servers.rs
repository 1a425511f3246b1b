//! The routes of Ollama and of the OpenAI-compatible servers the `openai` backend covers
//! (SGLang, llama.cpp's `llama-server`, `trtllm-serve`), as their sources answer them. Chat
//! completions go through the shared handler in `routes`, with each server's model and image
//! rules from here.

use std::time::SystemTime;

use hyper::header::{HeaderValue, SERVER};
use serde_json::{Value, json};
use vlm_core::VlmBackend;

use crate::server::{OpenAiFlavor, Resp, Shared};

/// What Ollama's version route reports.
pub(crate) const OLLAMA_VERSION: &str = "0.12.6";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `name` with Ollama's default tag (`qwen2.5vl` → `qwen2.5vl:latest`).
pub(crate) fn ollama_tagged(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// Ollama's OpenAI-layer error: `{"error":{"message","type","param":null,"code":null}}`, the
/// type from the status (`middleware/openai.go`).
pub(crate) fn ollama_error(status: u16, message: &str) -> Value {
    let kind = match status {
        400 => "invalid_request_error",
        404 => "not_found_error",
        _ => "api_error",
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

/// Ollama's own routes; `None` for chat completions (handled by the shared handler).
pub(crate) fn ollama(shared: &Shared, method: &str, path: &str) -> Option<Resp> {
    let model = ollama_tagged(&shared.model);
    Some(match (method, path) {
        ("GET" | "HEAD", "/") => super::routes::text(200, "Ollama is running"),
        ("GET" | "HEAD", "/api/version") => {
            super::routes::json_response(200, &json!({"version": OLLAMA_VERSION}))
        }
        ("GET", "/api/tags") => super::routes::json_response(
            200,
            &json!({"models": [{
                "name": model, "model": model, "modified_at": "2026-11-02T10:00:00Z",
                "size": 5_969_245_856u64,
                "digest": "5ced39dfa4bac325dc183dd1e4febaa1c46b3ea28bce48896c8e69c1e79611cc",
                "details": {"parent_model": "", "format": "gguf", "family": "qwen25vl",
                    "families": ["qwen25vl"], "parameter_size": "8.3B",
                    "quantization_level": "Q4_K_M"}
            }]}),
        ),
        ("GET", "/v1/models") => super::routes::json_response(
            200,
            &json!({"object": "list", "data": [
                {"id": model, "object": "model", "created": unix_now(), "owned_by": "library"}
            ]}),
        ),
        ("POST", "/v1/chat/completions") => return None,
        (_, "/" | "/api/version" | "/api/tags" | "/v1/models" | "/v1/chat/completions") => {
            super::routes::text(405, "405 method not allowed")
        }
        _ => super::routes::text(404, "404 page not found"),
    })
}

/// Ollama's data-URL rule (`openai/openai.go`): exactly `data:image/{jpeg,jpg,png,webp};base64,`;
/// remote URLs are refused.
pub(crate) fn ollama_image_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(
            "image URLs are not currently supported, please use base64 encoded data instead"
                .to_owned(),
        );
    }
    let accepted = ["jpeg", "jpg", "png", "webp"]
        .iter()
        .any(|t| url.starts_with(&format!("data:image/{t};base64,")));
    if accepted {
        Ok(())
    } else {
        Err("invalid image input".to_owned())
    }
}

/// llama.cpp decodes images with stb_image (`mtmd_helper_bitmap_init_from_buf`), whatever
/// the data URL's type says: JPEG, PNG, GIF, BMP and a few others, but not WebP. A WebP is a
/// 400 "Failed to load image or audio file".
pub(crate) fn llama_decodable(images: &[Vec<u8>]) -> Result<(), String> {
    let webp =
        |image: &Vec<u8>| vlm_core::ImageMime::detect(image) == Some(vlm_core::ImageMime::Webp);
    if images.iter().any(webp) {
        Err("Failed to load image or audio file".to_owned())
    } else {
        Ok(())
    }
}

/// An OpenAI-compatible server's error body, in its own shape.
pub(crate) fn openai_error(flavor: OpenAiFlavor, status: u16, message: &str) -> Value {
    match flavor {
        // llama.cpp's format_error_response.
        OpenAiFlavor::LlamaCpp => {
            let kind = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                404 => "not_found_error",
                503 => "unavailable_error",
                _ => "server_error",
            };
            json!({"error": {"code": status, "message": message, "type": kind}})
        }
        // LM Studio: OpenAI's nested shape.
        OpenAiFlavor::LmStudio => json!({"error": {
            "message": message,
            "type": if status == 401 { "invalid_request" } else { "invalid_request_error" },
            "param": null,
            "code": match status { 401 => json!("invalid_api_key"), 404 => json!("model_not_found"), _ => Value::Null },
        }}),
        // SGLang's and trtllm-serve's flat ErrorResponse.
        OpenAiFlavor::Sglang | OpenAiFlavor::TrtllmServe => json!({
            "object": "error", "message": message, "type": "BadRequestError", "param": null,
            "code": status
        }),
    }
}

/// What llama.cpp answers on every route while it loads the model.
pub(crate) fn llama_loading() -> Resp {
    let mut resp = super::routes::json_response(
        503,
        &json!({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}),
    );
    resp.headers_mut()
        .insert(SERVER, HeaderValue::from_static("llama.cpp"));
    resp
}

/// The `owned_by` of each server's model list.
pub(crate) fn owner(shared: &Shared) -> &'static str {
    match (shared.backend, shared.flavor) {
        (VlmBackend::Ollama, _) => "library",
        (VlmBackend::OpenAi, OpenAiFlavor::Sglang) => "sglang",
        (VlmBackend::OpenAi, OpenAiFlavor::LlamaCpp) => "llamacpp",
        (VlmBackend::OpenAi, OpenAiFlavor::TrtllmServe) => "tensorrt_llm",
        (VlmBackend::OpenAi, OpenAiFlavor::LmStudio) => "organization_owner",
        (backend, _) => backend.as_str(),
    }
}

/// The flavour's own routes besides `/v1/models` and chat; `None` for those.
pub(crate) fn openai_server(shared: &Shared, method: &str, path: &str) -> Option<Resp> {
    use super::routes::{empty_response, json_response};
    let model = &shared.model;
    let flavor = shared.flavor;
    let resp = match (flavor, method, path) {
        (_, "POST", "/v1/chat/completions") | (_, "GET", "/v1/models") => return None,
        (OpenAiFlavor::LmStudio, "GET", "/lmstudio-greeting") => {
            json_response(200, &json!({"lmstudio": true}))
        }
        // An Express app that answers every unknown route 200, "Returning 200 anyway".
        (OpenAiFlavor::LmStudio, method, path) => json_response(
            200,
            &json!({"error": format!("Unexpected endpoint or method. ({method} {path})")}),
        ),
        (OpenAiFlavor::LlamaCpp, "GET", "/health" | "/v1/health") => {
            json_response(200, &json!({"status": "ok"}))
        }
        (_, "GET", "/health") => empty_response(200),
        // With a capacity model, as SGLang started with --enable-metrics.
        (OpenAiFlavor::Sglang, "GET", "/metrics") if shared.capacity.is_some() => {
            super::routes::raw_response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::capacity::sglang_metrics(model, shared.capacity.as_ref()),
            )
        }
        (OpenAiFlavor::Sglang, "GET", "/get_model_info" | "/model_info") => json_response(
            200,
            &json!({"model_path": model, "tokenizer_path": model, "is_generation": true,
                "preferred_sampling_params": null, "weight_version": "default"}),
        ),
        (OpenAiFlavor::LlamaCpp, "GET", "/props") => json_response(
            200,
            &json!({"default_generation_settings": {"n_ctx": 8192}, "total_slots": 1,
                "model_alias": model, "model_path": format!("/models/{model}.gguf"),
                "modalities": {"vision": true, "audio": false}, "build_info": "b6500"}),
        ),
        (OpenAiFlavor::TrtllmServe, "GET", "/version") => {
            json_response(200, &json!({"version": "1.1.0"}))
        }
        (OpenAiFlavor::LlamaCpp, _, _) => json_response(
            404,
            &json!({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}),
        ),
        _ => json_response(404, &json!({"detail": "Not Found"})),
    };
    Some(resp)
}

/// The model list, with llama.cpp's Ollama-style `models` array beside `data`.
pub(crate) fn openai_models(shared: &Shared) -> Value {
    let entry = json!({"id": shared.model, "object": "model", "created": unix_now(),
        "owned_by": owner(shared)});
    match shared.flavor {
        OpenAiFlavor::LlamaCpp => json!({"object": "list", "data": [entry],
            "models": [{"name": shared.model, "model": shared.model,
                "capabilities": ["completion", "multimodal"]}]}),
        // No `created`: only id, object and owned_by.
        OpenAiFlavor::LmStudio => json!({"data": [{"id": shared.model, "object": "model",
            "owned_by": owner(shared)}], "object": "list"}),
        _ => json!({"object": "list", "data": [entry]}),
    }
}
