//! LMDeploy client against httpmock servers on 127.0.0.1 that answer as LMDeploy's api_server.

use base64::Engine as _;
use httpmock::prelude::*;
use serde_json::{Value, json};
use vlm_core::{ClientConfig, ImageInput, VlmBackend, VlmClient, VlmError, VlmRequest};
use vlm_lmdeploy::LmDeployClient;

const WEBP: &[u8] =
    b"RIFF\x1a\0\0\0WEBPVP8L\x0d\0\0\0\x2f\0\0\0\x10\x07\x10\x11\x11\x88\x88\xfe\x07\0";

fn client(server: &MockServer, model: Option<&str>) -> LmDeployClient {
    let mut config = ClientConfig::new(VlmBackend::LmDeploy, &server.base_url()).unwrap();
    if let Some(m) = model {
        config = config.with_model(m);
    }
    LmDeployClient::new(config).unwrap()
}

fn models_body(ids: &[&str]) -> Value {
    json!({"object": "list", "data": ids.iter().map(|id| json!({
        "id": id, "object": "model", "created": 1, "owned_by": "lmdeploy", "root": id,
        "parent": null, "permission": []
    })).collect::<Vec<_>>()})
}

async fn serve(server: &MockServer, health_status: u16, health_body: &'static str, ids: &[&str]) {
    server
        .mock_async(move |when, then| {
            when.method(GET).path("/health");
            then.status(health_status)
                .header("content-type", "application/json")
                .body(health_body);
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

#[tokio::test]
async fn health_states_follow_each_lmdeploy_version() {
    // (/health status, body, expected state, a word the reason must contain)
    let cases: [(u16, &str, &str, &str); 7] = [
        (200, r#"{"status":"healthy","message":""}"#, "ready", ""),
        (
            200,
            r#"{"status":"sleeping","message":""}"#,
            "unhealthy",
            "wakeup",
        ),
        (
            503,
            r#"{"status":"initializing","message":""}"#,
            "starting",
            "loading",
        ),
        (
            503,
            r#"{"status":"unhealthy","message":"Engine health monitor is not initialized."}"#,
            "unhealthy",
            "Engine health monitor is not initialized.",
        ),
        // 0.5-0.13: an empty 200; then /v1/models decides.
        (200, "", "ready", ""),
        // < 0.5: no /health route at all.
        (404, r#"{"detail":"Not Found"}"#, "ready", ""),
        (500, "oops", "unhealthy", "is http://"),
    ];
    for (status, body, want, needle) in cases {
        let server = MockServer::start_async().await;
        serve(&server, status, body, &["internlm/internvl2-2b"]).await;
        let report = client(&server, Some("internlm/internvl2-2b"))
            .health()
            .await
            .unwrap();
        assert_eq!(report.state.label(), want, "{status} {body}: {report}");
        if !needle.is_empty() {
            let reason = report.state.reason().unwrap_or_default();
            assert!(reason.contains(needle), "{status} {body}: {reason}");
        }
    }
}

#[tokio::test]
async fn closed_port_is_unreachable_with_the_lmdeploy_start_command() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = ClientConfig::new(VlmBackend::LmDeploy, &format!("127.0.0.1:{port}")).unwrap();
    let report = LmDeployClient::new(config).unwrap().health().await.unwrap();
    assert_eq!(report.state.label(), "unreachable");
    let reason = report.state.reason().unwrap();
    assert!(
        reason.contains(&format!(
            "lmdeploy serve api_server <model> --server-port {port}"
        )),
        "{reason}"
    );
}

#[tokio::test]
async fn wrong_model_is_unhealthy_and_the_only_model_is_adopted() {
    let server = MockServer::start_async().await;
    serve(
        &server,
        200,
        r#"{"status":"healthy","message":""}"#,
        &["Qwen2.5-VL-7B-AWQ"],
    )
    .await;
    let report = client(&server, Some("Qwen2-VL-2B-Instruct"))
        .health()
        .await
        .unwrap();
    assert_eq!(report.state.label(), "unhealthy");
    assert!(
        report
            .state
            .reason()
            .unwrap()
            .contains("serves Qwen2.5-VL-7B-AWQ"),
        "{report}"
    );

    let unconfigured = client(&server, None);
    assert!(unconfigured.health().await.unwrap().is_ready());
    assert_eq!(unconfigured.model(), Some("Qwen2.5-VL-7B-AWQ"));
}

#[tokio::test]
async fn the_api_key_is_sent_to_models_but_never_to_health() {
    let server = MockServer::start_async().await;
    let health = server
        .mock_async(|when, then| {
            when.method(GET)
                .path("/health")
                .header_missing("authorization");
            then.status(200)
                .json_body(json!({"status": "healthy", "message": ""}));
        })
        .await;
    let models = server
        .mock_async(|when, then| {
            when.method(GET)
                .path("/v1/models")
                .header("authorization", "Bearer EMPTY");
            then.status(200).json_body(models_body(&["m"]));
        })
        .await;
    let config = ClientConfig::new(VlmBackend::LmDeploy, &server.base_url())
        .unwrap()
        .with_model("m")
        .with_api_key("EMPTY");
    let report = LmDeployClient::new(config).unwrap().health().await.unwrap();
    assert!(report.is_ready(), "{report}");
    health.assert_calls_async(1).await;
    models.assert_calls_async(1).await;
}

#[tokio::test]
async fn inference_always_sends_the_model_discovering_it_first_if_needed() {
    let server = MockServer::start_async().await;
    let models = server
        .mock_async(|when, then| {
            when.method(GET).path("/v1/models");
            then.status(200).json_body(models_body(&["InternVL2-2B"]));
        })
        .await;
    let expected = json!({
        "model": "InternVL2-2B",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What colour cast?"},
            {"type": "image_url", "image_url": {"url": format!("data:image/webp;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(WEBP))}}
        ]}],
        "max_tokens": 64,
        "temperature": 0.0
    });
    let chat = server
        .mock_async(move |when, then| {
            when.method(POST)
                .path("/v1/chat/completions")
                .header("content-type", "application/json")
                .json_body(expected);
            then.status(200).json_body(json!({
                "id": "1", "object": "chat.completion", "created": 1, "model": "InternVL2-2B",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Neutral.",
                    "reasoning_content": "checked channels"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
            }));
        })
        .await;
    let client = client(&server, None);
    let request = VlmRequest::builder("What colour cast?")
        .image(ImageInput::bytes(WEBP.to_vec()))
        .max_tokens(64)
        .temperature(0.0)
        .build()
        .unwrap();
    let answer = client.infer_single(&request).await.unwrap();
    let again = client.infer_single(&request).await.unwrap();
    models.assert_calls_async(1).await; // discovered once, then remembered
    chat.assert_calls_async(2).await;
    assert_eq!(answer.text, "Neutral.");
    assert_eq!(again.text, "Neutral.");
    assert_eq!(answer.reasoning.as_deref(), Some("checked channels"));
    assert_eq!(answer.backend, VlmBackend::LmDeploy);
}

#[tokio::test]
async fn lmdeploy_http_200_with_finish_reason_error_is_an_error() {
    let server = MockServer::start_async().await;
    server
        .mock_async(|when, then| {
            when.method(POST).path("/v1/chat/completions");
            then.status(200).json_body(json!({
                "id": "1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant",
                    "content": "internal error happened, status code ResponseType.INPUT_LENGTH_ERROR"},
                    "finish_reason": "error"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            }));
        })
        .await;
    let err = client(&server, Some("m"))
        .infer_single(&VlmRequest::builder("hi").build().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, VlmError::Generation { .. }), "{err:?}");
    assert!(err.to_string().contains("INPUT_LENGTH_ERROR"), "{err}");
}

#[tokio::test]
async fn unknown_model_is_a_404_in_lmdeploys_flat_error_shape() {
    let server = MockServer::start_async().await;
    server
        .mock_async(|when, then| {
            when.method(POST).path("/v1/chat/completions");
            then.status(404).json_body(json!({
                "object": "error", "message": "The model 'nope' does not exist.",
                "type": "invalid_request_error", "param": null, "code": 404
            }));
        })
        .await;
    let err = client(&server, Some("nope"))
        .infer_single(&VlmRequest::builder("hi").build().unwrap())
        .await
        .unwrap_err();
    match &err {
        VlmError::Http {
            status,
            message,
            kind,
            ..
        } => {
            assert_eq!(*status, 404);
            assert_eq!(message, "The model 'nope' does not exist.");
            assert_eq!(kind.as_deref(), Some("invalid_request_error"));
        }
        other => panic!("expected Http, got {other:?}"),
    }
    assert!(err.to_string().contains("check the model name"), "{err}");
}

#[tokio::test]
async fn lmdeploy_0_12_401_string_body_is_decoded() {
    let server = MockServer::start_async().await;
    server
        .mock_async(|when, then| {
            when.method(POST).path("/v1/chat/completions");
            then.status(401).json_body(json!({"error": "Unauthorized"}));
        })
        .await;
    let err = client(&server, Some("m"))
        .infer_single(&VlmRequest::builder("hi").build().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert!(err.to_string().contains("Unauthorized") && err.to_string().contains("VLM_API_KEY"));
}
