//! Triton client against httpmock servers on 127.0.0.1 that answer as Triton's HTTP frontend.

use httpmock::prelude::*;
use serde_json::json;
use vlm_core::{ClientConfig, HealthState, VlmBackend, VlmClient, VlmError, VlmRequest};
use vlm_triton::TritonClient;

fn client(server: &MockServer, model: Option<&str>) -> TritonClient {
    // ImageWorks configs hold Triton URLs in the OpenAI form; the client strips them to the root.
    let mut config =
        ClientConfig::new(VlmBackend::Triton, &format!("{}/v1", server.base_url())).unwrap();
    if let Some(m) = model {
        config = config.with_model(m);
    }
    TritonClient::new(config).unwrap()
}

/// Mounts the Triton routes with the given statuses and bodies for the model-ready route.
async fn serve(
    server: &MockServer,
    live: u16,
    ready: u16,
    model_status: u16,
    model_body: &'static str,
) {
    server
        .mock_async(move |when, then| {
            when.method(GET).path("/v2/health/live");
            then.status(live);
        })
        .await;
    server
        .mock_async(|when, then| {
            when.method(GET).path("/v2");
            then.status(200).json_body(json!({
                "name": "triton", "version": "2.62.0",
                "extensions": ["classification", "sequence", "model_repository", "generate"]
            }));
        })
        .await;
    server
        .mock_async(move |when, then| {
            when.method(GET).path("/v2/health/ready");
            then.status(ready);
        })
        .await;
    server
        .mock_async(move |when, then| {
            when.method(GET).path("/v2/models/ensemble/ready");
            then.status(model_status)
                .header("content-type", "application/json")
                .body(model_body);
        })
        .await;
}

#[tokio::test]
async fn each_triton_answer_maps_to_its_health_state() {
    // (live, ready, model status, model body, state, a word the reason must contain)
    let cases: [(u16, u16, u16, &str, &str, &str); 6] = [
        (200, 200, 200, "", "ready", ""),
        (400, 200, 200, "", "unhealthy", "not live"),
        (200, 400, 200, "", "starting", "not ready yet"),
        (
            200,
            200,
            404,
            r#"{"error":"Request for unknown model: 'ensemble' is not found"}"#,
            "unhealthy",
            "Request for unknown model: 'ensemble' is not found",
        ),
        (
            200,
            200,
            400,
            r#"{"error":"Model version not ready"}"#,
            "starting",
            "Model version not ready",
        ),
        (
            200,
            200,
            503,
            r#"{"error":"Server not ready"}"#,
            "starting",
            "Server not ready",
        ),
    ];
    for (live, ready, model_status, body, want, needle) in cases {
        let server = MockServer::start_async().await;
        serve(&server, live, ready, model_status, body).await;
        let report = client(&server, Some("ensemble")).health().await.unwrap();
        assert_eq!(
            report.state.label(),
            want,
            "{live}/{ready}/{model_status}: {report}"
        );
        if !needle.is_empty() {
            let reason = report.state.reason().unwrap_or_default();
            assert!(reason.contains(needle), "{reason}");
        }
        if want == "ready" {
            assert_eq!(report.server_version.as_deref(), Some("2.62.0"));
            let routes: Vec<&str> = report.probes.iter().map(|p| p.route.as_str()).collect();
            assert_eq!(
                routes,
                [
                    "GET /v2/health/live",
                    "GET /v2",
                    "GET /v2/health/ready",
                    "GET /v2/models/ensemble/ready"
                ]
            );
        }
    }
}

#[tokio::test]
async fn the_openai_frontend_is_recognised_and_pointed_away_from() {
    let server = MockServer::start_async().await;
    server
        .mock_async(|when, then| {
            when.method(GET).path("/v2/health/live");
            then.status(404).json_body(json!({"detail": "Not Found"}));
        })
        .await;
    let report = client(&server, Some("m")).health().await.unwrap();
    let reason = report.state.reason().unwrap_or_default();
    assert_eq!(report.state.label(), "unhealthy");
    assert!(
        reason.contains("OpenAI frontend") && reason.contains("trtllm-serve"),
        "{reason}"
    );
}

#[tokio::test]
async fn closed_port_is_unreachable_with_the_tritonserver_command() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config =
        ClientConfig::new(VlmBackend::Triton, &format!("http://127.0.0.1:{port}")).unwrap();
    let report = TritonClient::new(config).unwrap().health().await.unwrap();
    assert_eq!(report.state.label(), "unreachable");
    assert!(
        report
            .state
            .reason()
            .unwrap()
            .contains("tritonserver --model-repository"),
        "{report}"
    );
}

#[tokio::test]
async fn without_a_model_the_only_ready_one_in_the_repository_is_checked() {
    let server = MockServer::start_async().await;
    serve(&server, 200, 200, 200, "").await;
    let index = server
        .mock_async(|when, then| {
            when.method(POST)
                .path("/v2/repository/index")
                .json_body(json!({"ready": true}));
            then.status(200)
                .json_body(json!([{"name": "ensemble", "version": "1", "state": "READY"}]));
        })
        .await;
    let client = client(&server, None);
    let report = client.health().await.unwrap();
    index.assert_calls_async(1).await;
    assert_eq!(report.state, HealthState::Ready, "{report}");
    assert_eq!(client.model(), Some("ensemble"));
}

#[tokio::test]
async fn generate_sends_only_the_models_inputs_and_reads_its_answer_and_errors() {
    let server = MockServer::start_async().await;
    server
        .mock_async(|when, then| {
            when.method(GET).path("/v2/models/ensemble");
            then.status(200).json_body(json!({
                "name": "ensemble", "versions": ["1"], "platform": "ensemble",
                "inputs": [
                    {"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
                    {"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]},
                    {"name": "image_url_input", "datatype": "BYTES", "shape": [-1, 1]}],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]}]
            }));
        })
        .await;
    server
        .mock_async(|when, then| {
            when.method(GET).path("/v2/models/ensemble/config");
            then.status(200)
                .json_body(json!({"name": "ensemble", "platform": "ensemble"}));
        })
        .await;
    // Exactly this body: no temperature (not an input), max_tokens as an integer.
    let generate = server
        .mock_async(|when, then| {
            when.method(POST)
                .path("/v2/models/ensemble/generate")
                .json_body(json!({"text_input": "describe", "max_tokens": 40}));
            then.status(200).json_body(json!({
                "model_name": "ensemble", "model_version": "1",
                "text_output": ["describe A warm cast."]
            }));
        })
        .await;
    let request = VlmRequest::builder("describe")
        .max_tokens(40)
        .temperature(0.3)
        .build()
        .unwrap();
    let answer = client(&server, Some("ensemble"))
        .infer_single(&request)
        .await
        .unwrap();
    assert_eq!(answer.text, "A warm cast.", "the echoed prompt is cut");
    assert_eq!(answer.model, "ensemble");
    generate.assert_calls_async(1).await;

    // Triton's own error body, with the server's words.
    let server = MockServer::start_async().await;
    server
        .mock_async(|when, then| {
            when.method(GET).path("/v2/models/ensemble");
            then.status(200)
                .json_body(json!({"name": "ensemble", "inputs": [
                {"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]}]}));
        })
        .await;
    server
        .mock_async(|when, then| {
            when.method(POST).path("/v2/models/ensemble/generate");
            then.status(400)
                .json_body(json!({"error": "expected number of inputs between 2 and 3 but got 1 inputs for model 'ensemble'"}));
        })
        .await;
    let err = client(&server, Some("ensemble"))
        .infer_single(&VlmRequest::builder("x").build().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(
        err.to_string().contains("expected number of inputs"),
        "{err}"
    );
    assert!(matches!(
        err,
        VlmError::Http {
            backend: VlmBackend::Triton,
            ..
        }
    ));
}

#[tokio::test]
async fn several_ready_models_and_none_configured_is_a_report_listing_them() {
    let server = MockServer::start_async().await;
    serve(&server, 200, 200, 200, "").await;
    server
        .mock_async(|when, then| {
            when.method(POST).path("/v2/repository/index");
            then.status(200).json_body(json!([
                {"name": "ensemble", "version": "1", "state": "READY"},
                {"name": "llava", "version": "1", "state": "READY"}
            ]));
        })
        .await;
    let report = client(&server, None).health().await.unwrap();
    assert_eq!(report.state.label(), "unhealthy");
    assert!(
        report
            .state
            .reason()
            .unwrap()
            .contains("several ready: ensemble, llava"),
        "{report}"
    );
    assert_eq!(report.served_models, ["ensemble", "llava"]);
}
