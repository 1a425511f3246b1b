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
async fn triton_health_is_real_and_inference_says_what_to_do() {
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
    let err = client.infer_single(&ask(png(4))).await.unwrap_err();
    assert!(
        err.is_unsupported() && err.to_string().contains("trtllm-serve"),
        "{err}"
    );
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
