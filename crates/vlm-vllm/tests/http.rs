//! vLLM client against httpmock servers on 127.0.0.1 that answer as vLLM does.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use httpmock::prelude::*;
use serde_json::{Value, json};
use vlm_core::{
    ClientConfig, HealthState, ImageInput, VlmBackend, VlmClient, VlmError, VlmRequest,
};
use vlm_vllm::VllmClient;

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0\x90wS\xde";
const JPEG: &[u8] = b"\xff\xd8\xff\xe0\0\x10JFIF\0\x01\x01\0\0\x01\0\x01\0\0\xff\xd9";

fn client(server: &MockServer, model: Option<&str>, key: Option<&str>) -> VllmClient {
    let mut config = ClientConfig::new(VlmBackend::Vllm, &server.base_url()).unwrap();
    if let Some(m) = model {
        config = config.with_model(m);
    }
    if let Some(k) = key {
        config = config.with_api_key(k);
    }
    VllmClient::new(config).unwrap()
}

fn models_body(ids: &[&str]) -> Value {
    json!({"object": "list", "data": ids.iter().map(|id| json!({
        "id": id, "object": "model", "created": 1, "owned_by": "vllm", "root": id,
        "parent": null, "max_model_len": 32768, "permission": []
    })).collect::<Vec<_>>()})
}

async fn serve_health(server: &MockServer, ids: &[&str]) {
    server
        .mock_async(|when, then| {
            when.method(GET).path("/health");
            then.status(200);
        })
        .await;
    server
        .mock_async(|when, then| {
            when.method(GET).path("/version");
            then.status(200).json_body(json!({"version": "0.33.0"}));
        })
        .await;
    let body = models_body(ids);
    server
        .mock_async(move |when, then| {
            when.method(GET).path("/v1/models");
            then.status(200).json_body(body);
        })
        .await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn healthy_server_serving_the_configured_model_is_ready() {
    let server = MockServer::start_async().await;
    serve_health(&server, &["Qwen/Qwen2-VL-2B-Instruct"]).await;
    let report = client(&server, Some("Qwen/Qwen2-VL-2B-Instruct"), None)
        .health()
        .await
        .unwrap();
    assert_eq!(report.state, HealthState::Ready, "{report}");
    assert_eq!(report.server_version.as_deref(), Some("0.33.0"));
    assert_eq!(report.served_models, ["Qwen/Qwen2-VL-2B-Instruct"]);
    let routes: Vec<&str> = report.probes.iter().map(|p| p.route.as_str()).collect();
    assert_eq!(routes, ["GET /health", "GET /version", "GET /v1/models"]);
}

#[tokio::test]
async fn dead_engine_503_on_health_is_unhealthy() {
    let server = MockServer::start_async().await;
    server
        .mock_async(|when, then| {
            when.method(GET).path("/health");
            then.status(503);
        })
        .await;
    let report = client(&server, Some("m"), None).health().await.unwrap();
    assert_eq!(report.state.label(), "unhealthy");
    assert!(
        report.state.reason().unwrap().contains("engine is dead"),
        "{report}"
    );
}

#[tokio::test]
async fn closed_port_is_unreachable_with_the_start_command() {
    let port = free_port();
    let config =
        ClientConfig::new(VlmBackend::Vllm, &format!("http://127.0.0.1:{port}/v1")).unwrap();
    let client = VllmClient::new(config).unwrap();
    let report = client.health().await.unwrap();
    assert_eq!(report.state.label(), "unreachable");
    let reason = report.state.reason().unwrap();
    assert!(
        reason.contains(&format!("vllm serve <model> --port {port}")),
        "{reason}"
    );
    assert!(!client.health_check().await);
    // Inference to a closed port is an Unreachable error, retryable.
    let err = client
        .infer_single(&VlmRequest::builder("hi").build().unwrap())
        .await
        .unwrap_err();
    assert!(err.is_unreachable() && err.is_retryable(), "{err}");
}

#[tokio::test]
async fn model_not_served_is_unhealthy_naming_the_served_models() {
    let server = MockServer::start_async().await;
    serve_health(&server, &["llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2-VL-7B"]).await;
    let report = client(&server, Some("Qwen/Qwen2-VL-2B"), None)
        .health()
        .await
        .unwrap();
    let reason = report.state.reason().unwrap_or_default();
    assert_eq!(report.state.label(), "unhealthy");
    assert!(
        reason.contains("\"Qwen/Qwen2-VL-2B\" is not served"),
        "{reason}"
    );
    assert!(
        reason.contains("llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B"),
        "{reason}"
    );
}

#[tokio::test]
async fn the_only_served_model_is_adopted_when_none_is_configured() {
    let server = MockServer::start_async().await;
    serve_health(&server, &["only-model"]).await;
    let client = client(&server, None, None);
    assert_eq!(client.model(), None);
    let report = client.health().await.unwrap();
    assert!(report.is_ready(), "{report}");
    assert_eq!(report.model.as_deref(), Some("only-model"));
    assert_eq!(client.model(), Some("only-model"));
}

#[tokio::test]
async fn several_served_models_and_none_configured_is_an_error_listing_them() {
    let server = MockServer::start_async().await;
    serve_health(&server, &["a", "b"]).await;
    let err = client(&server, None, None).health().await.unwrap_err();
    assert!(err.is_config(), "{err}");
    assert!(err.to_string().contains("serves several: a, b"), "{err}");
}

#[tokio::test]
async fn api_key_goes_to_v1_routes_only_and_a_401_says_to_set_it() {
    let server = MockServer::start_async().await;
    let health = server
        .mock_async(|when, then| {
            when.method(GET)
                .path("/health")
                .header_missing("authorization");
            then.status(200);
        })
        .await;
    let models = server
        .mock_async(|when, then| {
            when.method(GET)
                .path("/v1/models")
                .header("authorization", "Bearer sk-right");
            then.status(200).json_body(models_body(&["m"]));
        })
        .await;
    server
        .mock_async(|when, then| {
            when.method(GET).path("/v1/models");
            then.status(401).json_body(json!({"error": "Unauthorized"}));
        })
        .await;
    let ok = client(&server, Some("m"), Some("sk-right"))
        .health()
        .await
        .unwrap();
    assert!(ok.is_ready(), "{ok}");
    health.assert_calls_async(1).await;
    models.assert_calls_async(1).await;

    let bad = client(&server, Some("m"), Some("sk-wrong"))
        .health()
        .await
        .unwrap();
    let reason = bad.state.reason().unwrap_or_default().to_owned();
    assert_eq!(bad.state.label(), "unhealthy");
    assert!(
        reason.contains("HTTP 401") && reason.contains("Unauthorized"),
        "{reason}"
    );
    assert!(reason.contains("VLM_API_KEY"), "{reason}");
    assert!(!reason.contains("sk-wrong"), "{reason}");
}

type Seen = Arc<Mutex<Vec<(Vec<u8>, Option<String>)>>>;

#[tokio::test]
async fn inference_sends_exactly_the_openai_payload_and_parses_the_answer() {
    let server = MockServer::start_async().await;
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let chat = server
        .mock_async(move |when, then| {
            when.method(POST)
                .path("/v1/chat/completions")
                .header("content-type", "application/json")
                .is_true(move |req| {
                    let ct = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap_or_default().to_owned());
                    sink.lock().unwrap().push((req.body_vec(), ct));
                    true
                });
            then.status(200).json_body(json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                "model": "Qwen/Qwen2-VL-2B-Instruct",
                "choices": [{"index": 0, "message": {"role": "assistant",
                    "content": "A warm sepia cast.", "reasoning": "looked at the mids"},
                    "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1200, "completion_tokens": 7, "total_tokens": 1207}
            }));
        })
        .await;
    let client = client(&server, Some("Qwen/Qwen2-VL-2B-Instruct"), Some("sk-1"));
    let request = VlmRequest::builder("Describe \"the\" colour\n\tcast — é")
        .system_prompt("You are precise.")
        .image(ImageInput::bytes(PNG.to_vec()))
        .image(ImageInput::bytes(JPEG.to_vec()))
        .max_tokens(300)
        .temperature(0.1)
        .top_p(0.9)
        .stop("###")
        .seed(7)
        .extra("top_k", 20)
        .extra("repetition_penalty", 1.05)
        .build()
        .unwrap();
    let answer = client.infer_single(&request).await.unwrap();
    chat.assert_calls_async(1).await;

    let (body, auth) = seen.lock().unwrap()[0].clone();
    assert_eq!(auth.as_deref(), Some("Bearer sk-1"));
    let sent: Value = serde_json::from_slice(&body).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let expected = json!({
        "model": "Qwen/Qwen2-VL-2B-Instruct",
        "messages": [
            {"role": "system", "content": "You are precise."},
            {"role": "user", "content": [
                {"type": "text", "text": "Describe \"the\" colour\n\tcast — é"},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(PNG))}},
                {"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{}", b64(JPEG))}}
            ]}
        ],
        "max_tokens": 300,
        "temperature": 0.1,
        "top_p": 0.9,
        "stop": ["###"],
        "seed": 7,
        "top_k": 20,
        "repetition_penalty": 1.05
    });
    assert_eq!(sent, expected);
    assert!(sent.get("stream_options").is_none() && sent.get("stream").is_none());
    // The base64 decodes back to the exact image bytes.
    let url = sent["messages"][1]["content"][1]["image_url"]["url"]
        .as_str()
        .unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(url.strip_prefix("data:image/png;base64,").unwrap())
        .unwrap();
    assert_eq!(decoded, PNG);

    assert_eq!(answer.text, "A warm sepia cast.");
    assert_eq!(answer.reasoning.as_deref(), Some("looked at the mids"));
    assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
    assert_eq!(answer.model, "Qwen/Qwen2-VL-2B-Instruct");
    assert_eq!(answer.backend, VlmBackend::Vllm);
    let usage = answer.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (1200, 7, 1207)
    );
}

#[tokio::test]
async fn model_is_omitted_while_unknown_and_adopted_from_the_answer() {
    let server = MockServer::start_async().await;
    let chat = server
        .mock_async(|when, then| {
            when.method(POST)
                .path("/v1/chat/completions")
                .is_true(|req| {
                    serde_json::from_slice::<Value>(req.body_ref())
                        .map(|v| v.get("model").is_none())
                        .unwrap_or(false)
                });
            then.status(200).json_body(json!({
                "model": "served-model",
                "choices": [{"message": {"content": "ok"}, "finish_reason": "length"}]
            }));
        })
        .await;
    let client = client(&server, None, None);
    let answer = client
        .infer_single(&VlmRequest::builder("hi").build().unwrap())
        .await
        .unwrap();
    chat.assert_calls_async(1).await;
    assert_eq!(answer.finish_reason.as_deref(), Some("length"));
    assert_eq!(client.model(), Some("served-model"));
}

#[tokio::test]
async fn every_error_body_shape_becomes_http_with_the_servers_message() {
    let cases: [(u16, &str, &str, &str); 7] = [
        (
            404,
            "application/json",
            r#"{"error":{"message":"The model `nope` does not exist.","type":"NotFoundError","param":"model","code":404}}"#,
            "The model `nope` does not exist.",
        ),
        (
            400,
            "application/json",
            r#"{"object":"error","message":"Stream options can only be defined when `stream=True`.","type":"BadRequestError","param":null,"code":400}"#,
            "Stream options can only be defined when `stream=True`.",
        ),
        (
            401,
            "application/json",
            r#"{"error":"Unauthorized"}"#,
            "Unauthorized",
        ),
        (
            422,
            "application/json",
            r#"{"detail":[{"loc":["body","messages"],"msg":"Field required","type":"missing"}]}"#,
            "body.messages: Field required",
        ),
        (
            502,
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            "non-JSON body (text/html): <html><head><title>502 Bad Gateway</title>",
        ),
        (500, "text/plain", "", "empty body (text/plain)"),
        (
            503,
            "application/json",
            r#"{"detail":"Service Unavailable"}"#,
            "Service Unavailable",
        ),
    ];
    for (status, content_type, body, want) in cases {
        let server = MockServer::start_async().await;
        server
            .mock_async(move |when, then| {
                when.method(POST).path("/v1/chat/completions");
                then.status(status)
                    .header("content-type", content_type)
                    .body(body);
            })
            .await;
        let err = client(&server, Some("m"), None)
            .infer_single(&VlmRequest::builder("hi").build().unwrap())
            .await
            .unwrap_err();
        match &err {
            VlmError::Http {
                status: s, message, ..
            } => {
                assert_eq!(*s, status, "{err}");
                assert!(
                    message.contains(want),
                    "status {status}: {message:?} lacks {want:?}"
                );
            }
            other => panic!("status {status}: expected Http, got {other:?}"),
        }
        assert_eq!(
            err.is_retryable(),
            matches!(status, 500 | 502 | 503),
            "{status}"
        );
    }
}

#[tokio::test]
async fn a_200_that_is_not_a_completion_is_a_protocol_error_with_the_first_bytes() {
    let server = MockServer::start_async().await;
    server
        .mock_async(|when, then| {
            when.method(POST).path("/v1/chat/completions");
            then.status(200)
                .header("content-type", "text/html")
                .body("<html>captive portal</html>");
        })
        .await;
    let err = client(&server, Some("m"), None)
        .infer_single(&VlmRequest::builder("hi").build().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, VlmError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("captive portal"), "{err}");
}

#[tokio::test]
async fn a_bad_image_fails_before_anything_is_sent() {
    let server = MockServer::start_async().await;
    let chat = server
        .mock_async(|when, then| {
            when.method(POST).path("/v1/chat/completions");
            then.status(200);
        })
        .await;
    let request = VlmRequest::builder("hi")
        .image(ImageInput::bytes(b"plain text".to_vec()))
        .build()
        .unwrap();
    let err = client(&server, Some("m"), None)
        .infer_single(&request)
        .await
        .unwrap_err();
    assert!(matches!(err, VlmError::Image { .. }), "{err:?}");
    chat.assert_calls_async(0).await;
}

#[tokio::test]
async fn the_api_key_is_not_carried_to_another_host_on_a_redirect() {
    let elsewhere = MockServer::start_async().await;
    let landed = elsewhere
        .mock_async(|when, then| {
            when.method(POST).path("/v1/chat/completions").header_missing("authorization");
            then.status(200).json_body(json!({"model": "m", "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}));
        })
        .await;
    let server = MockServer::start_async().await;
    let target = elsewhere.url("/v1/chat/completions");
    let redirect = server
        .mock_async(move |when, then| {
            when.method(POST)
                .path("/v1/chat/completions")
                .header("authorization", "Bearer sk-1");
            then.status(307).header("location", target);
        })
        .await;
    let answer = client(&server, Some("m"), Some("sk-1"))
        .infer_single(&VlmRequest::builder("hi").build().unwrap())
        .await
        .unwrap();
    assert_eq!(answer.text, "ok");
    redirect.assert_calls_async(1).await;
    landed.assert_calls_async(1).await;
}

/// A body with megabytes of image is encoded on the blocking pool: the async thread that drives
/// every other request keeps ticking while it is built.
#[test]
fn encoding_a_large_image_leaves_the_async_thread_free() {
    use std::time::Instant;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = MockServer::start_async().await;
        server
            .mock_async(|when, then| {
                when.method(POST).path("/v1/chat/completions");
                then.status(200).json_body(json!({"model": "m", "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}));
            })
            .await;
        let client = client(&server, Some("m"), None);
        let mut image = JPEG.to_vec();
        image.extend((0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        // What encoding it takes on this machine and build, for the comparison.
        let t = Instant::now();
        let encoded = vlm_core::encode_data_url(&image, vlm_core::ImageMime::Jpeg);
        let encoding = t.elapsed();
        drop(encoded);
        let request = VlmRequest::builder("p")
            .image(ImageInput::bytes(image))
            .build()
            .unwrap();
        let meter = vlm_testkit::StallMeter::start().await;
        let answer = client.infer_single(&request).await.unwrap();
        let stall = meter.stop().await;
        assert_eq!(answer.text, "ok");
        assert!(
            stall < encoding / 2,
            "the async thread stalled {stall:?}; encoding alone takes {encoding:?}"
        );
    });
}
