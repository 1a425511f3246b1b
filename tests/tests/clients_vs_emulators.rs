//! The project's own clients against the testkit emulators: the second suite beside each
//! backend's httpmock one, where the emulator says the same thing more simply.

use std::time::Duration;

use vlm_core::{HealthState, ImageInput, VlmBackend, VlmClient, VlmError, VlmRequest};
use vlm_factory::{VlmSettings, build_client};
use vlm_testkit::{Emulator, EmulatorConfig, Fault};

fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(12, 9, |x, y| {
        let v = (x * 18 + y * 5) as u8;
        image::Rgb([v.saturating_add(seed), v, v.saturating_sub(seed / 2)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn client_for(
    e: &Emulator,
    model: Option<&str>,
    key: Option<&str>,
) -> std::sync::Arc<dyn VlmClient> {
    let mut loader = VlmSettings::loader()
        .set_override("vlm_backend", e.backend().as_str(), "--vlm-backend")
        .set_override("vlm_base_url", e.base_url(), "--vlm-base-url");
    if let Some(m) = model {
        loader = loader.set_override("vlm_model", m, "--vlm-model");
    }
    if let Some(k) = key {
        loader = loader.env([("VLM_API_KEY", k)]);
    }
    build_client(&loader.load().unwrap()).unwrap()
}

fn ask(image: Vec<u8>) -> VlmRequest {
    VlmRequest::builder("Describe the colour cast.")
        .image(ImageInput::bytes(image))
        .max_tokens(300)
        .temperature(0.1)
        .build()
        .unwrap()
}

#[tokio::test]
async fn openai_backends_health_and_inference_round_trip() {
    for backend in [VlmBackend::Vllm, VlmBackend::LmDeploy] {
        let e = Emulator::start(EmulatorConfig::new(backend).with_model("Qwen2-VL"))
            .await
            .unwrap();
        let client = client_for(&e, None, None);
        let report = client.health().await.unwrap();
        assert!(report.is_ready(), "{backend}: {report}");
        assert_eq!(
            client.model(),
            Some("Qwen2-VL"),
            "{backend}: the only model is adopted"
        );

        let (a, b) = (png(40), png(0));
        let answer_a = client.infer_single(&ask(a.clone())).await.unwrap();
        let answer_b = client.infer_single(&ask(b.clone())).await.unwrap();
        assert!(answer_a.text.starts_with("[emulator]"), "{}", answer_a.text);
        assert!(
            answer_a
                .text
                .contains(&vlm_testkit::analysis::sha256_prefix(&a))
        );
        assert!(
            answer_b
                .text
                .contains(&vlm_testkit::analysis::sha256_prefix(&b))
        );
        assert_ne!(answer_a.text, answer_b.text);
        assert_eq!(answer_a.finish_reason.as_deref(), Some("stop"));
        assert!(answer_a.usage.is_some());

        // What crossed the wire: the model, the text part first, the image as a data URL.
        let sent = e.chat_requests().remove(0).json.unwrap();
        assert_eq!(sent["model"], "Qwen2-VL");
        assert_eq!(sent["messages"][0]["content"][0]["type"], "text");
        assert!(
            sent["messages"][0]["content"][1]["image_url"]["url"]
                .as_str()
                .unwrap()
                .starts_with("data:image/png;base64,")
        );
        assert!(sent.get("stream_options").is_none());
    }
}

#[tokio::test]
async fn unknown_model_and_undecodable_image_come_back_as_http_errors_with_the_servers_words() {
    for (backend, quote) in [(VlmBackend::Vllm, "`"), (VlmBackend::LmDeploy, "'")] {
        let e = Emulator::start(EmulatorConfig::new(backend).with_model("m"))
            .await
            .unwrap();
        let client = client_for(&e, Some("typo"), None);
        let report = client.health().await.unwrap();
        assert_eq!(report.state.label(), "unhealthy", "{backend}");
        let err = client.infer_single(&ask(png(1))).await.unwrap_err();
        assert_eq!(err.status(), Some(404), "{backend}: {err}");
        assert!(
            err.to_string()
                .contains(&format!("The model {quote}typo{quote} does not exist.")),
            "{err}"
        );

        // PNG magic, broken body: our client sends it (it only sniffs), the server refuses it.
        let client = client_for(&e, Some("m"), None);
        let broken = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRbroken".to_vec();
        let err = client.infer_single(&ask(broken)).await.unwrap_err();
        assert_eq!(err.status(), Some(400), "{backend}: {err}");
        assert!(err.to_string().contains("cannot decode PNG image"), "{err}");
    }
}

#[tokio::test]
async fn api_keys_are_sent_where_the_server_checks_them() {
    for backend in [VlmBackend::Vllm, VlmBackend::LmDeploy] {
        let e = Emulator::start(
            EmulatorConfig::new(backend)
                .with_model("m")
                .with_api_key("sk-emu"),
        )
        .await
        .unwrap();
        let good = client_for(&e, None, Some("sk-emu"));
        assert!(good.health().await.unwrap().is_ready(), "{backend}");
        assert!(good.infer_single(&ask(png(2))).await.is_ok());
        let bad = client_for(&e, None, Some("sk-wrong"))
            .health()
            .await
            .unwrap();
        assert_eq!(bad.state.label(), "unhealthy");
        assert!(bad.state.reason().unwrap().contains("HTTP 401"), "{bad}");
        let none = client_for(&e, None, None).health().await.unwrap();
        assert_eq!(none.state.label(), "unhealthy", "{backend}: no key");
    }
}

#[tokio::test]
async fn lmdeploy_legacy_finish_reason_error_is_an_error() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::LmDeploy).with_model("m"))
        .await
        .unwrap();
    e.push_fault(Fault::FinishReasonError(
        "internal error happened, status code 2".into(),
    ));
    let err = client_for(&e, Some("m"), None)
        .infer_single(&ask(png(3)))
        .await
        .unwrap_err();
    assert!(matches!(err, VlmError::Generation { .. }), "{err:?}");
}

#[tokio::test]
async fn wait_ready_rides_through_a_server_still_loading() {
    let e = Emulator::start_after(
        EmulatorConfig::new(VlmBackend::Vllm),
        Duration::from_millis(600),
    )
    .await
    .unwrap();
    let client = client_for(&e, None, None);
    let first = client.health().await.unwrap();
    assert_eq!(first.state.label(), "unreachable");
    assert!(
        first
            .state
            .reason()
            .unwrap()
            .contains("vllm serve <model> --port"),
        "{first}"
    );
    let report = client.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert!(report.is_ready(), "{report}");
    // And a deadline that passes while it is down returns the last (unreachable) report.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = vlm_vllm_like(port);
    let started = std::time::Instant::now();
    let report = down.wait_ready(Duration::from_millis(700)).await.unwrap();
    assert!(matches!(report.state, HealthState::Unreachable { .. }));
    assert!(started.elapsed() >= Duration::from_millis(700));
}

fn vlm_vllm_like(port: u16) -> std::sync::Arc<dyn VlmClient> {
    let settings = VlmSettings::loader()
        .set_override(
            "vlm_base_url",
            format!("127.0.0.1:{port}"),
            "--vlm-base-url",
        )
        .load()
        .unwrap();
    build_client(&settings).unwrap()
}

#[tokio::test]
async fn triton_health_is_real_and_the_multimodal_ensemble_infers() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Triton))
        .await
        .unwrap();
    let client = client_for(&e, Some("ensemble"), None);
    let report = client.health().await.unwrap();
    assert!(report.is_ready(), "{report}");
    assert_eq!(report.server_version.as_deref(), Some("2.62.0"));
    let unknown = client_for(&e, Some("llava"), None).health().await.unwrap();
    assert!(
        unknown
            .state
            .reason()
            .unwrap()
            .contains("Request for unknown model: 'llava' is not found"),
        "{unknown}"
    );
    let adopted = client_for(&e, None, None);
    assert!(adopted.health().await.unwrap().is_ready());
    assert_eq!(adopted.model(), Some("ensemble"));
    assert!(
        report
            .image_input
            .as_deref()
            .unwrap_or_default()
            .starts_with("image_url_input"),
        "{report}"
    );
    e.clear_requests();
    let answer = client.infer_single(&ask(png(4))).await.unwrap();
    // The answer for the image, the echoed prompt cut off.
    assert!(
        answer.text.starts_with("[emulator] 12x9 PNG"),
        "{}",
        answer.text
    );
    let sent = e
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/generate"))
        .unwrap()
        .json
        .unwrap();
    // Only the ensemble's inputs, each in its type; a PNG goes under the one prefix its
    // preprocessing decodes.
    assert!(
        sent["image_url_input"]
            .as_str()
            .unwrap()
            .starts_with("data:image/jpeg;base64,iVBOR")
    );
    assert_eq!(sent["max_tokens"], 300);
    assert_eq!(sent["temperature"], 0.1);
    assert_eq!(sent["stream"], false);
    assert!(
        sent.get("exclude_input_in_output").is_none() && sent.get("sampling_parameters").is_none()
    );
}

fn triton(kind: vlm_testkit::TritonModel) -> EmulatorConfig {
    EmulatorConfig::new(VlmBackend::Triton)
        .with_model("m")
        .with_triton_model(kind)
}

fn triton_client(e: &Emulator, template: Option<&str>) -> std::sync::Arc<dyn VlmClient> {
    let mut loader = VlmSettings::loader()
        .set_override("vlm_backend", "triton", "--vlm-backend")
        .set_override("vlm_base_url", e.base_url(), "--vlm-base-url")
        .set_override("vlm_model", e.model(), "--vlm-model");
    if let Some(t) = template {
        loader = loader.set_override("vlm_prompt_template", t, "--prompt-template");
    }
    build_client(&loader.load().unwrap()).unwrap()
}

#[tokio::test]
async fn triton_vllm_backend_gets_raw_base64_its_sampling_json_and_the_placeholder() {
    use futures_util::StreamExt as _;
    let e = Emulator::start(triton(vlm_testkit::TritonModel::VllmBackend))
        .await
        .unwrap();
    // No chat template on the server: without the placeholder the model refuses the image.
    let err = triton_client(&e, None)
        .infer_single(&ask(png(6)))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("0 placeholders"), "{err}");

    let client = triton_client(&e, Some("<|image|>{prompt}"));
    let report = client.health().await.unwrap();
    assert!(
        report
            .image_input
            .as_deref()
            .unwrap_or_default()
            .starts_with("image (raw base64"),
        "{report}"
    );
    e.clear_requests();
    let answer = client.infer_single(&ask(png(6))).await.unwrap();
    assert!(
        answer.text.starts_with("[emulator] 12x9 PNG"),
        "{}",
        answer.text
    );
    assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
    assert!(answer.usage.is_some());
    let sent = e
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/generate"))
        .unwrap()
        .json
        .unwrap();
    assert_eq!(sent["text_input"], "<|image|>Describe the colour cast.");
    assert!(
        sent["image"][0].as_str().unwrap().starts_with("iVBOR"),
        "raw base64, no data: prefix"
    );
    assert_eq!(sent["exclude_input_in_output"], true);
    let sampling: serde_json::Value =
        serde_json::from_str(sent["sampling_parameters"].as_str().unwrap()).unwrap();
    assert_eq!(sampling["max_tokens"], 300);
    assert!(
        sent.get("max_tokens").is_none(),
        "not an input of this model"
    );

    // Decoupled: generate_stream, SSE with no [DONE]; the body's end is the end.
    let events: Vec<_> = client
        .infer_stream(&ask(png(6)))
        .await
        .unwrap()
        .collect()
        .await;
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            Ok(vlm_core::StreamEvent::Text(t)) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert!(events.iter().all(Result::is_ok), "{events:?}");
    assert_eq!(text, answer.text);
}

#[tokio::test]
async fn triton_models_that_cannot_take_images_and_the_openai_frontend_are_unsupported() {
    let e = Emulator::start(triton(vlm_testkit::TritonModel::TextOnly))
        .await
        .unwrap();
    let client = triton_client(&e, None);
    let report = client.health().await.unwrap();
    assert!(report.is_ready() && report.image_input.as_deref().unwrap().contains("text-only"));
    let err = client.image_support().await.unwrap_err();
    assert!(
        err.is_unsupported() && err.to_string().contains("text-only"),
        "{err}"
    );
    let err = client.infer_single(&ask(png(7))).await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");

    // Triton's OpenAI frontend answers /v2 with FastAPI's 404.
    let frontend = Emulator::start(EmulatorConfig::new(VlmBackend::OpenAi))
        .await
        .unwrap();
    let config = vlm_core::ClientConfig::new(VlmBackend::Triton, &frontend.root_url())
        .unwrap()
        .with_model("m");
    let err = vlm_triton::TritonClient::new(config)
        .unwrap()
        .image_support()
        .await
        .unwrap_err();
    assert!(
        err.is_unsupported() && err.to_string().contains("only text message"),
        "{err}"
    );
}

#[tokio::test]
async fn the_triton_emulator_is_strict_as_triton_is() {
    let e = Emulator::start(triton(vlm_testkit::TritonModel::MultimodalEnsemble))
        .await
        .unwrap();
    let post = |body: serde_json::Value| {
        let url = format!("{}/v2/models/m/generate", e.root_url());
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
            (
                status,
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    let (status, error) = post(serde_json::json!({"text_input": "x", "max_tokens": "50"})).await;
    assert_eq!(status, 500);
    assert!(error.contains("non-signed-integer"), "{error}");
    let (status, error) = post(serde_json::json!({"text_input": "x"})).await;
    assert_eq!(status, 400);
    assert!(
        error.contains("expected number of inputs between 2 and"),
        "{error}"
    );
    let (status, error) = post(serde_json::json!({"text_input": "x", "max_tokens": 5,
        "image_url_input": "data:image/png;base64,iVBORw0KGgo="}))
    .await;
    assert_eq!(status, 500);
    assert!(error.contains("MissingSchema"), "{error}");
    let (status, error) =
        post(serde_json::json!({"text_input": "x", "max_tokens": 5, "stream": true})).await;
    assert_eq!(status, 500);
    assert!(error.contains("decoupled mode"), "{error}");
    // The client reads Triton's {"error": ...} bodies.
    let client = triton_client(&e, None);
    let two = VlmRequest::builder("x")
        .image(ImageInput::bytes(png(1)))
        .image(ImageInput::bytes(png(2)))
        .build()
        .unwrap();
    let err = client.infer_single(&two).await.unwrap_err();
    assert!(err.to_string().contains("one image per request"), "{err}");
}

#[tokio::test]
async fn errors_keep_their_cause_underneath() {
    use std::error::Error as _;
    // A port nothing listens on: refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = vlm_core::ClientConfig::new(VlmBackend::Vllm, &format!("127.0.0.1:{port}"))
        .unwrap()
        .with_model("m")
        .with_max_retries(0);
    let client = vlm_vllm::VllmClient::new(config).unwrap();
    let err = client.infer_single(&ask(png(1))).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    let cause = err.source().expect("the transport's error is kept");
    assert!(
        cause.downcast_ref::<reqwest::Error>().is_some(),
        "{cause:?}"
    );

    let missing = VlmRequest::builder("x")
        .image(ImageInput::path("/nonexistent/photo.jpg"))
        .build()
        .unwrap();
    let err = client.infer_single(&missing).await.unwrap_err();
    let cause = err.source().expect("the io::Error is kept");
    assert!(
        cause.downcast_ref::<std::io::Error>().is_some(),
        "{cause:?}"
    );

    // A backend name that does not parse converts into a configuration error.
    let parse = || -> Result<VlmBackend, VlmError> { Ok("lmdepoy".parse::<VlmBackend>()?) };
    let err = parse().unwrap_err();
    assert!(err.is_config() && err.to_string().contains("did you mean \"lmdeploy\""));
}

#[tokio::test]
async fn clones_share_one_pool_and_one_adopted_model() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm).with_model("only"))
        .await
        .unwrap();
    let config = vlm_core::ClientConfig::new(VlmBackend::Vllm, &e.base_url()).unwrap();
    let client = vlm_vllm::VllmClient::new(config).unwrap();
    let clone = client.clone();
    assert_eq!(clone.model(), None, "not known yet");
    assert!(client.health().await.unwrap().is_ready());
    assert_eq!(
        clone.model(),
        Some("only"),
        "adopted once, seen by every clone"
    );
}

#[tokio::test]
async fn a_callers_own_http_client_is_used_and_zero_timeouts_are_refused() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::LmDeploy))
        .await
        .unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-proxy-tag", "caller".parse().unwrap());
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .build()
        .unwrap();
    let config = vlm_core::ClientConfig::new(VlmBackend::LmDeploy, &e.base_url())
        .unwrap()
        .with_model(e.model())
        .with_http_client(http);
    let client = vlm_lmdeploy::LmDeployClient::new(config).unwrap();
    client.infer_single(&ask(png(2))).await.unwrap();
    assert_eq!(e.chat_requests()[0].header("x-proxy-tag"), Some("caller"));

    let zero = vlm_core::ClientConfig::new(VlmBackend::LmDeploy, &e.base_url())
        .unwrap()
        .with_timeout(Duration::ZERO);
    let err = vlm_lmdeploy::LmDeployClient::new(zero).unwrap_err();
    assert!(
        err.is_config() && err.to_string().contains("vlm_timeout"),
        "{err}"
    );
}

fn with_model(backend: VlmBackend, model: &str) -> EmulatorConfig {
    EmulatorConfig::new(backend).with_model(model)
}

fn client_at(backend: VlmBackend, url: &str, model: Option<&str>) -> std::sync::Arc<dyn VlmClient> {
    let mut loader = VlmSettings::loader()
        .set_override("vlm_backend", backend.as_str(), "--vlm-backend")
        .set_override("vlm_base_url", url, "--vlm-base-url");
    if let Some(m) = model {
        loader = loader.set_override("vlm_model", m, "--vlm-model");
    }
    build_client(&loader.load().unwrap()).unwrap()
}

#[tokio::test]
async fn ollama_health_reads_its_own_routes_and_its_tagged_names() {
    let e = Emulator::start(with_model(VlmBackend::Ollama, "qwen2.5vl:7b"))
        .await
        .unwrap();
    // ImageWorks writes the URL without /v1.
    let root = e.root_url();
    let client = client_at(VlmBackend::Ollama, &root, Some("qwen2.5vl:7b"));
    assert_eq!(client.base_url().as_str(), format!("{root}/v1/"));
    let report = client.health().await.unwrap();
    assert!(report.is_ready(), "{report}");
    let routes: Vec<&str> = report.probes.iter().map(|p| p.route.as_str()).collect();
    assert_eq!(
        routes,
        ["GET /", "GET /api/version", "GET /api/tags"],
        "{report}"
    );
    assert_eq!(report.server_version.as_deref(), Some("0.12.6"));
    let answer = client.infer_single(&ask(png(3))).await.unwrap();
    assert!(answer.text.starts_with("[emulator]"));
    assert_eq!(
        e.chat_requests()[0].json.as_ref().unwrap()["model"],
        "qwen2.5vl:7b"
    );

    // Not pulled: the fix is named; and inference gets Ollama's own 404.
    let not_pulled = client_at(VlmBackend::Ollama, &root, Some("llava:13b"));
    let err = not_pulled.infer_single(&ask(png(3))).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert!(
        err.to_string().contains("model 'llava:13b' not found"),
        "{err}"
    );
    let report = not_pulled.health().await.unwrap();
    let reason = report.state.reason().unwrap_or_default();
    assert!(
        report.state.label() == "unhealthy" && reason.contains("`ollama pull llava:13b`"),
        "{report}"
    );
    // None configured: the only pulled model is adopted.
    let adopted = client_at(VlmBackend::Ollama, &root, None);
    assert!(adopted.health().await.unwrap().is_ready());
    assert_eq!(adopted.model(), Some("qwen2.5vl:7b"));

    // An untagged name is `:latest`, both ways.
    let latest = Emulator::start(with_model(VlmBackend::Ollama, "qwen2.5vl"))
        .await
        .unwrap();
    for configured in ["qwen2.5vl", "qwen2.5vl:latest"] {
        let c = client_at(VlmBackend::Ollama, &latest.root_url(), Some(configured));
        assert!(c.health().await.unwrap().is_ready(), "{configured}");
        assert!(c.infer_single(&ask(png(4))).await.is_ok(), "{configured}");
    }
}

#[tokio::test]
async fn ollama_takes_no_gif_and_says_what_to_do_before_sending() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Ollama))
        .await
        .unwrap();
    let client = client_at(VlmBackend::Ollama, &e.base_url(), Some(e.model()));
    let gif = VlmRequest::builder("x")
        .image(ImageInput::bytes(
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
        ))
        .build()
        .unwrap();
    let err = client.infer_single(&gif).await.unwrap_err();
    assert!(matches!(err, VlmError::Image { .. }), "{err:?}");
    assert!(err.to_string().contains("JPEG, PNG and WebP"), "{err}");
    assert!(e.chat_requests().is_empty(), "nothing was sent");
    assert!(client.check_image_type(vlm_core::ImageMime::Gif).is_err());

    // The emulator answers a GIF as Ollama does: a bare "invalid image input".
    let body = serde_json::json!({"model": e.model(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlh"}}]}]});
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", e.base_url()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let said: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(said["error"]["message"], "invalid image input");
    assert_eq!(said["error"]["type"], "invalid_request_error");

    // Another server at the URL is not taken for Ollama.
    let vllm = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap();
    let report = client_at(VlmBackend::Ollama, &vllm.root_url(), Some("m"))
        .health()
        .await
        .unwrap();
    assert!(
        report
            .state
            .reason()
            .unwrap_or_default()
            .contains("an Ollama server?"),
        "{report}"
    );
}

#[tokio::test]
async fn any_openai_compatible_server_passes_health_and_infers_even_behind_a_prefix() {
    use vlm_testkit::OpenAiFlavor;
    for (flavor, prefix) in [
        (OpenAiFlavor::Sglang, Some("/llama")),
        (OpenAiFlavor::LlamaCpp, None),
        (OpenAiFlavor::TrtllmServe, Some("/trt")),
        (OpenAiFlavor::LmStudio, None),
    ] {
        let mut config = EmulatorConfig::new(VlmBackend::OpenAi).with_flavor(flavor);
        if let Some(p) = prefix {
            config = config.with_prefix(p);
        }
        let e = Emulator::start(config).await.unwrap();
        let client = client_at(VlmBackend::OpenAi, &e.base_url(), None);
        let report = client.health().await.unwrap();
        assert!(report.is_ready(), "{flavor:?}: {report}");
        let routes: Vec<&str> = report.probes.iter().map(|p| p.route.as_str()).collect();
        let p = prefix.unwrap_or("");
        assert_eq!(
            routes,
            [format!("GET {p}/health"), format!("GET {p}/v1/models")],
            "{flavor:?}"
        );
        let answer = client.infer_single(&ask(png(5))).await.unwrap();
        assert!(answer.text.starts_with("[emulator]"), "{flavor:?}");
        // Each server's own error shape is decoded to its message.
        let not_an_image = VlmRequest::builder("x")
            .image(ImageInput::url("data:image/png;base64,aGVsbG8="))
            .build()
            .unwrap();
        let err = client.infer_single(&not_an_image).await.unwrap_err();
        assert_eq!(err.status(), Some(400), "{flavor:?}");
        assert!(
            err.to_string().contains("not an image"),
            "{flavor:?}: {err}"
        );
        // `model` is always sent.
        assert_eq!(
            e.chat_requests()[0].json.as_ref().unwrap()["model"],
            e.model(),
            "{flavor:?}"
        );
    }
}

#[tokio::test]
async fn a_loading_llama_cpp_is_starting_and_wait_ready_rides_it_out() {
    let e = Emulator::start(
        EmulatorConfig::new(VlmBackend::OpenAi)
            .with_flavor(vlm_testkit::OpenAiFlavor::LlamaCpp)
            .loading_for(Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let client = client_at(VlmBackend::OpenAi, &e.base_url(), None);
    let report = client.health().await.unwrap();
    assert_eq!(report.state.label(), "starting", "{report}");
    assert!(
        report.state.reason().unwrap().contains("Loading model"),
        "{report}"
    );
    let report = client.wait_ready(Duration::from_secs(15)).await.unwrap();
    assert!(report.is_ready(), "{report}");
}

#[test]
fn the_openai_backend_has_no_default_url() {
    let err = VlmSettings::loader()
        .set_override("vlm_backend", "openai", "--vlm-backend")
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vlm_openai_base_url") && err.contains("--vlm-base-url"),
        "{err}"
    );
    let err = VlmSettings::loader()
        .set_override("vlm_backend", "auto", "--vlm-backend")
        .load()
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs the URL to probe"), "{err}");
}

#[tokio::test]
async fn auto_detects_every_server_and_then_its_own_keys_apply() {
    use vlm_testkit::OpenAiFlavor;
    let cases = [
        (
            EmulatorConfig::new(VlmBackend::Vllm),
            VlmBackend::Vllm,
            "GET /v1/models",
        ),
        (
            EmulatorConfig::new(VlmBackend::LmDeploy),
            VlmBackend::LmDeploy,
            "GET /v1/models",
        ),
        (
            EmulatorConfig::new(VlmBackend::Triton),
            VlmBackend::Triton,
            "GET /v2",
        ),
        (
            EmulatorConfig::new(VlmBackend::Ollama),
            VlmBackend::Ollama,
            "GET /",
        ),
        (
            EmulatorConfig::new(VlmBackend::OpenAi).with_flavor(OpenAiFlavor::Sglang),
            VlmBackend::OpenAi,
            "GET /v1/models",
        ),
        (
            EmulatorConfig::new(VlmBackend::OpenAi).with_flavor(OpenAiFlavor::LlamaCpp),
            VlmBackend::OpenAi,
            "GET /v1/models",
        ),
        (
            EmulatorConfig::new(VlmBackend::OpenAi).with_flavor(OpenAiFlavor::TrtllmServe),
            VlmBackend::OpenAi,
            "GET /v1/models",
        ),
        // LM Studio answers GET /, /v2, /api/version and /health 200 with an error body.
        (
            EmulatorConfig::new(VlmBackend::OpenAi).with_flavor(OpenAiFlavor::LmStudio),
            VlmBackend::OpenAi,
            "GET /v1/models",
        ),
    ];
    for (config, want, route) in cases {
        let e = Emulator::start(config).await.unwrap();
        let settings = VlmSettings::loader()
            .set_override("vlm_backend", "auto", "--vlm-backend")
            .set_override("vlm_base_url", e.base_url(), "--vlm-base-url")
            .env([(
                format!("VLM_{}_MODEL", want.as_str().to_ascii_uppercase()),
                e.model().to_owned(),
            )])
            .load()
            .unwrap();
        assert!(settings.is_auto());
        assert!(build_client(&settings).is_err(), "not before detection");
        let (settings, found) = vlm_factory::resolve_backend(settings).await.unwrap();
        let found = found.unwrap();
        assert_eq!(
            (found.backend, found.route.as_str()),
            (want, route),
            "{found}"
        );
        assert_eq!(settings.backend, want);
        // The detected backend's own keys apply, as if it had been named.
        assert_eq!(settings.model.as_deref(), Some(e.model()), "{want}");
        assert!(
            settings
                .source("vlm_backend")
                .unwrap()
                .to_string()
                .starts_with("auto: "),
            "{:?}",
            settings.source("vlm_backend")
        );
        let client = build_client(&settings).unwrap();
        assert!(client.health().await.unwrap().is_ready(), "{want}");
    }

    // Nothing there: unreachable, not a guess.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = VlmSettings::loader()
        .set_override("vlm_backend", "auto", "--vlm-backend")
        .set_override(
            "vlm_base_url",
            format!("127.0.0.1:{port}"),
            "--vlm-base-url",
        )
        .load()
        .unwrap();
    let err = vlm_factory::resolve_backend(settings).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
}

fn cast_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {"caption": {"type": "string"}, "score": {"type": "integer", "minimum": 0}},
        "required": ["caption", "score"]
    })
}

#[tokio::test]
async fn json_answers_are_validated_asked_again_once_then_an_error_with_the_raw_text() {
    for backend in [
        VlmBackend::Vllm,
        VlmBackend::LmDeploy,
        VlmBackend::Ollama,
        VlmBackend::OpenAi,
    ] {
        let e = Emulator::start(EmulatorConfig::new(backend)).await.unwrap();
        let client = client_at(backend, &e.base_url(), Some(e.model()));
        let request = VlmRequest::builder("Caption and score the cast.")
            .image(ImageInput::bytes(png(8)))
            .json_schema("cast", cast_schema())
            .build()
            .unwrap();
        let answer = vlm_core::json::infer_json_value(&*client, &request, 1)
            .await
            .unwrap();
        assert_eq!(answer.attempts, 1, "{backend}");
        assert!(
            answer.value["caption"]
                .as_str()
                .unwrap()
                .starts_with("[emulator] 12x9 PNG"),
            "{backend}: {}",
            answer.value
        );
        // The schema went as response_format, the way these servers read it.
        let sent = e.chat_requests().pop().unwrap().json.unwrap();
        assert_eq!(sent["response_format"]["type"], "json_schema", "{backend}");
        assert_eq!(
            sent["response_format"]["json_schema"]["schema"],
            cast_schema()
        );

        // Prose once: asked again with the reasons, then valid.
        e.clear_requests();
        e.push_fault(Fault::NotJson);
        let answer = vlm_core::json::infer_json_value(&*client, &request, 1)
            .await
            .unwrap();
        assert_eq!(answer.attempts, 2);
        let asks = e.chat_requests();
        assert_eq!(asks.len(), 2);
        let second = asks[1].json.as_ref().unwrap()["messages"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(second.contains("was not valid JSON"), "{second}");

        // Prose twice: an error carrying the raw text and why; never a silent default.
        e.fail_next(2, Fault::NotJson);
        let err = vlm_core::json::infer_json_value(&*client, &request, 1)
            .await
            .unwrap_err();
        match &err {
            VlmError::InvalidJson {
                raw,
                reasons,
                attempts,
                ..
            } => {
                assert_eq!(*attempts, 2);
                assert!(raw.contains("cannot give JSON") && reasons[0].contains("no JSON"));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn infer_json_returns_the_type() {
    #[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
    struct Cast {
        caption: String,
        score: u32,
    }
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap();
    let client = client_at(VlmBackend::Vllm, &e.base_url(), Some(e.model()));
    let request = VlmRequest::builder("Caption and score the cast.")
        .image(ImageInput::bytes(png(9)))
        .build()
        .unwrap();
    let cast: Cast = vlm_core::json::infer_json(&*client, request.clone(), 1)
        .await
        .unwrap();
    assert!(
        cast.caption.starts_with("[emulator]") && cast.score == 0,
        "{cast:?}"
    );
    e.fail_next(2, Fault::NotJson);
    let err = vlm_core::json::infer_json::<Cast>(&*client, request, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, VlmError::InvalidJson { .. }), "{err:?}");
}

#[tokio::test]
async fn a_client_with_max_image_edge_shrinks_files_and_bytes_off_the_async_threads() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::LmDeploy))
        .await
        .unwrap();
    let config = vlm_core::ClientConfig::new(VlmBackend::LmDeploy, &e.base_url())
        .unwrap()
        .with_model(e.model())
        .with_max_image_edge(8);
    let client = vlm_lmdeploy::LmDeployClient::new(config).unwrap();
    let answer = client.infer_single(&ask(png(10))).await.unwrap();
    // 12x9 in, 8x6 JPEG sent.
    assert!(
        answer.text.starts_with("[emulator] 8x6 JPEG"),
        "{}",
        answer.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_queue_is_read_from_its_metrics_once_the_server_is_known() {
    use vlm_testkit::{Capacity, OpenAiFlavor};
    let e = Emulator::start(
        EmulatorConfig::new(VlmBackend::OpenAi)
            .with_flavor(OpenAiFlavor::Sglang)
            .with_capacity(Capacity::new(1, 20.0)),
    )
    .await
    .unwrap();
    let client = client_at(VlmBackend::OpenAi, &e.base_url(), None);
    assert_eq!(
        client.queue_depth().await,
        None,
        "not before the model list says the server is SGLang"
    );
    assert!(client.health().await.unwrap().is_ready());
    assert_eq!(client.queue_depth().await, Some(0.0));
    // One request decodes, two wait: SGLang's sglang:num_queue_reqs says 2.
    let busy: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.infer_single(&ask(png(5))).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client.queue_depth().await != Some(2.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never showed 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for request in busy {
        request.await.unwrap().unwrap();
    }
}
