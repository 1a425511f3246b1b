//! From configuration to a live (mock) server: the factory picks the backend, the per-backend
//! keys pick its URL and model, and the client it builds talks to that server.

use httpmock::prelude::*;
use serde_json::json;
use vlm_core::{ImageInput, VlmBackend, VlmRequest};
use vlm_factory::{VlmSettings, build_client};

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01";

async fn openai_server(
    owned_by: &str,
    model: &'static str,
    health_body: Option<serde_json::Value>,
) -> MockServer {
    let server = MockServer::start_async().await;
    server
        .mock_async(move |when, then| {
            when.method(GET).path("/health");
            match health_body {
                Some(body) => then.status(200).json_body(body),
                None => then.status(200),
            };
        })
        .await;
    let models =
        json!({"object": "list", "data": [{"id": model, "object": "model", "owned_by": owned_by}]});
    server
        .mock_async(move |when, then| {
            when.method(GET).path("/v1/models");
            then.status(200).json_body(models);
        })
        .await;
    server
        .mock_async(move |when, then| {
            when.method(POST).path("/v1/chat/completions").json_body_includes(format!(r#"{{"model":"{model}"}}"#));
            then.status(200).json_body(json!({
                "model": model,
                "choices": [{"message": {"content": format!("answer from {model}")}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
            }));
        })
        .await;
    server
}

#[tokio::test]
async fn the_backend_flag_alone_switches_to_that_backends_configured_url_and_model() {
    let vllm = openai_server("vllm", "Qwen2-VL-2B-Instruct", None).await;
    let lmdeploy = openai_server(
        "lmdeploy",
        "Qwen2.5-VL-7B-AWQ",
        Some(json!({"status": "healthy", "message": ""})),
    )
    .await;
    let dir = std::env::temp_dir().join(format!("vlm-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("pyproject.toml"),
        format!(
            r#"
[tool.imageworks.color_narrator]
vlm_backend = "vllm"
vlm_base_url = "{}/v1"
vlm_model = "Qwen2-VL-2B-Instruct"
vlm_lmdeploy_base_url = "{}/v1"
vlm_lmdeploy_model = "Qwen2.5-VL-7B-AWQ"
min_contamination = 0.1
"#,
            vllm.base_url(),
            lmdeploy.base_url()
        ),
    )
    .unwrap();

    for (flag, backend, model) in [
        (None, VlmBackend::Vllm, "Qwen2-VL-2B-Instruct"),
        (Some("lmdeploy"), VlmBackend::LmDeploy, "Qwen2.5-VL-7B-AWQ"),
    ] {
        let mut loader = VlmSettings::loader().cwd(&dir);
        if let Some(flag) = flag {
            loader = loader.set_override("vlm_backend", flag, "--vlm-backend");
        }
        let settings = loader.load().unwrap();
        let client = build_client(&settings).unwrap();
        assert_eq!(client.backend(), backend);
        let report = client.health().await.unwrap();
        assert!(report.is_ready(), "{report}");
        let request = VlmRequest::builder("colour?")
            .image(ImageInput::bytes(PNG.to_vec()))
            .build()
            .unwrap();
        let answer = client.infer_single(&request).await.unwrap();
        assert_eq!(answer.text, format!("answer from {model}"));
        assert_eq!(client.model(), Some(model));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
