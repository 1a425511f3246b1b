//! Retries that honour the server, timeouts that fire, against the emulators' fault injection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vlm_core::{ImageInput, VlmBackend, VlmClient, VlmError, VlmRequest};
use vlm_factory::{VlmSettings, build_client};
use vlm_testkit::{Emulator, EmulatorConfig, Fault};

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(4, 4, |x, _| image::Rgb([(x * 60) as u8; 3]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn client(e: &Emulator, settings: &[(&str, &str)]) -> Arc<dyn VlmClient> {
    let mut loader = VlmSettings::loader()
        .set_override("vlm_backend", e.backend().as_str(), "--vlm-backend")
        .set_override("vlm_base_url", e.base_url(), "--vlm-base-url")
        .set_override("vlm_model", e.model(), "--vlm-model");
    for (k, v) in settings {
        loader = loader.set_override(k, *v, "test");
    }
    build_client(&loader.load().unwrap()).unwrap()
}

fn ask() -> VlmRequest {
    VlmRequest::builder("colour?")
        .image(ImageInput::bytes(png()))
        .build()
        .unwrap()
}

async fn vllm() -> Emulator {
    Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap()
}

#[tokio::test]
async fn two_503s_then_success() {
    let e = vllm().await;
    e.fail_next(2, Fault::unavailable());
    let started = Instant::now();
    let answer = client(&e, &[]).infer_single(&ask()).await.unwrap();
    assert!(answer.text.starts_with("[emulator]"));
    assert_eq!(e.chat_requests().len(), 3);
    // Backoff 0.5 s then 1 s, each less up to 25% jitter.
    assert!(
        started.elapsed() >= Duration::from_millis(1100),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn retry_after_2_is_waited_for() {
    let e = vllm().await;
    e.push_fault(Fault::rate_limited(2));
    client(&e, &[]).infer_single(&ask()).await.unwrap();
    let chats = e.chat_requests();
    assert_eq!(chats.len(), 2);
    let gap = chats[1].received_at - chats[0].received_at;
    println!(
        "Retry-After: 2 -> measured gap between attempts: {:.3} s",
        gap.as_secs_f64()
    );
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_millis(2600),
        "{gap:?}"
    );
}

#[tokio::test]
async fn a_retry_after_over_the_cap_is_not_retried_and_other_4xx_never_are() {
    let e = vllm().await;
    e.push_fault(Fault::rate_limited(600));
    let err = client(&e, &[]).infer_single(&ask()).await.unwrap_err();
    assert_eq!(err.status(), Some(429));
    assert_eq!(e.chat_requests().len(), 1);

    e.push_fault(Fault::Status {
        status: 400,
        content_type: "application/json".into(),
        body: r#"{"error":{"message":"bad","type":"BadRequestError","param":null,"code":400}}"#
            .into(),
        headers: vec![],
    });
    let err = client(&e, &[]).infer_single(&ask()).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert_eq!(e.chat_requests().len(), 2);
}

#[tokio::test]
async fn an_html_502_is_retried_and_when_retries_run_out_the_last_error_reads_well() {
    let e = vllm().await;
    e.fail_next(3, Fault::html_bad_gateway());
    let err = client(&e, &[("vlm_max_retries", "2")])
        .infer_single(&ask())
        .await
        .unwrap_err();
    assert_eq!(e.chat_requests().len(), 3);
    assert_eq!(err.status(), Some(502));
    let msg = err.to_string();
    assert!(
        msg.contains(
            "non-JSON body (text/html): <html> <head><title>502 Bad Gateway</title></head>"
        ),
        "{msg}"
    );

    // One more success once the proxy recovers; and vlm_max_retries = 0 means one attempt.
    e.push_fault(Fault::unavailable());
    let err = client(&e, &[("vlm_max_retries", "0")])
        .infer_single(&ask())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert_eq!(e.chat_requests().len(), 4);
}

#[tokio::test]
async fn a_hang_ends_at_the_timeout_and_is_not_re_sent_unless_asked() {
    let e = vllm().await;
    e.push_fault(Fault::Hang);
    let started = Instant::now();
    let err = client(&e, &[("vlm_timeout", "0.5")])
        .infer_single(&ask())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, VlmError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("raise `--vlm-timeout` (vlm_timeout)"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        e.chat_requests().len(),
        1,
        "a timed-out inference must not be re-sent"
    );

    e.push_fault(Fault::Hang);
    let answer = client(
        &e,
        &[("vlm_timeout", "0.5"), ("vlm_retry_timeouts", "true")],
    )
    .infer_single(&ask())
    .await;
    assert!(answer.is_ok(), "{answer:?}");
    assert_eq!(e.chat_requests().len(), 3);
}

#[tokio::test]
async fn a_response_cut_mid_body_is_not_re_sent_unless_asked_but_a_close_before_any_byte_is() {
    // (c) The headers arrived, then the body was cut: the server may have done the whole
    // generation, so it is not run again by default.
    let e = vllm().await;
    e.push_fault(Fault::DropMidBody);
    let err = client(&e, &[]).infer_single(&ask()).await.unwrap_err();
    assert!(
        matches!(err, VlmError::ResponseCut { status: 200, .. }),
        "{err:?}"
    );
    assert!(
        err.may_have_run() && err.to_string().contains("vlm_retry_timeouts"),
        "{err}"
    );
    assert_eq!(
        e.chat_requests().len(),
        1,
        "a finished generation must not be re-sent"
    );

    // ... unless vlm_retry_timeouts says so.
    e.clear_requests();
    e.push_fault(Fault::DropMidBody);
    let answer = client(&e, &[("vlm_retry_timeouts", "true")])
        .infer_single(&ask())
        .await
        .unwrap();
    assert!(answer.text.starts_with("[emulator]"));
    assert_eq!(e.chat_requests().len(), 2);

    // (b) Closed before any response byte: that server can no longer deliver this answer, so
    // it is retried.
    e.clear_requests();
    e.push_fault(Fault::CloseWithoutResponse);
    let answer = client(&e, &[]).infer_single(&ask()).await.unwrap();
    assert!(answer.text.starts_with("[emulator]"));
    assert_eq!(e.chat_requests().len(), 2);
    e.clear_requests();
    e.fail_next(3, Fault::CloseWithoutResponse);
    let err = client(&e, &[]).infer_single(&ask()).await.unwrap_err();
    assert!(matches!(err, VlmError::Transport { .. }), "{err:?}");
    assert_eq!(e.chat_requests().len(), 3);
}

#[tokio::test]
async fn a_connect_timeout_is_unreachable_and_names_vlm_connect_timeout() {
    let hole = vlm_testkit::Blackhole::start().await.unwrap();
    let url = format!("http://{}/v1", hole.addr());
    let settings = VlmSettings::loader()
        .set_override("vlm_base_url", url.as_str(), "--vlm-base-url")
        .set_override("vlm_model", "m", "--vlm-model")
        .set_override("vlm_connect_timeout", "0.3", "--vlm-connect-timeout")
        .set_override("vlm_timeout", "30", "--vlm-timeout")
        .set_override("vlm_max_retries", "1", "--vlm-max-retries")
        .load()
        .unwrap();
    let client = build_client(&settings).unwrap();
    let started = Instant::now();
    let report = client.health().await.unwrap();
    assert_eq!(report.state.label(), "unreachable", "{report}");
    let reason = report.state.reason().unwrap();
    assert!(
        reason.contains("no connection within 0.3 s") && reason.contains("--vlm-connect-timeout"),
        "{reason}"
    );
    assert!(!reason.contains("--vlm-timeout`"), "{reason}");
    // Nothing was sent, so an inference is retried (once here) and reported as unreachable.
    let err = client.infer_single(&ask()).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(err.to_string().contains("vlm_connect_timeout"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_slow_health_probe_names_vlm_health_timeout() {
    let e = vllm().await;
    e.delay_other_routes(Duration::from_secs(5));
    let report = client(&e, &[("vlm_health_timeout", "0.3"), ("vlm_timeout", "60")])
        .health()
        .await
        .unwrap();
    assert_eq!(report.state.label(), "unreachable", "{report}");
    let reason = report.state.reason().unwrap();
    assert!(
        reason.contains("within 0.3 s")
            && reason.contains("--vlm-health-timeout")
            && !reason.contains("--vlm-timeout`"),
        "{reason}"
    );
}

#[tokio::test]
async fn health_and_inference_stay_under_a_gateways_path_prefix() {
    for backend in [
        VlmBackend::Vllm,
        VlmBackend::LmDeploy,
        VlmBackend::Triton,
        VlmBackend::Ollama,
        VlmBackend::OpenAi,
    ] {
        let e = Emulator::start(EmulatorConfig::new(backend).with_prefix("/llama"))
            .await
            .unwrap();
        assert!(e.base_url().contains("/llama"), "{}", e.base_url());
        let c = client(&e, &[]);
        let report = c.health().await.unwrap();
        assert!(report.is_ready(), "{backend}: {report}");
        assert!(report.probes.len() >= 2, "{backend}: {report}");
        for probe in &report.probes {
            assert!(
                probe.route.contains(" /llama/"),
                "{backend}: {}",
                probe.route
            );
        }
        if backend != VlmBackend::Triton {
            let answer = c.infer_single(&ask()).await.unwrap();
            assert!(answer.text.starts_with("[emulator]"), "{backend}");
        }
    }
}

#[tokio::test]
async fn an_empty_answer_is_an_error_and_bad_usage_keeps_the_answer() {
    let e = vllm().await;
    let completion = |content: &str, finish: &str, usage: &str| Fault::Status {
        status: 200,
        content_type: "application/json".into(),
        body: format!(
            r#"{{"id":"x","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":{content}}},"finish_reason":"{finish}"}}],"usage":{usage}}}"#
        ),
        headers: vec![],
    };
    let c = client(&e, &[]);
    e.push_fault(completion("null", "stop", "null"));
    let err = c.infer_single(&ask()).await.unwrap_err();
    assert!(matches!(err, VlmError::EmptyAnswer { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(r#"finish_reason "stop" with no text"#),
        "{err}"
    );
    e.push_fault(completion(r#""  ""#, "length", "null"));
    let err = c.infer_single(&ask()).await.unwrap_err();
    assert!(err.to_string().contains("raise max_tokens"), "{err}");

    for usage in [
        r#"{"prompt_tokens":1e400,"completion_tokens":2,"total_tokens":3}"#,
        r#"{"prompt_tokens":1.5,"completion_tokens":2,"total_tokens":3}"#,
        r#""lots""#,
    ] {
        e.push_fault(completion(r#""Warm tones.""#, "stop", usage));
        let answer = c.infer_single(&ask()).await.unwrap();
        assert_eq!(
            (answer.text.as_str(), answer.usage),
            ("Warm tones.", None),
            "{usage}"
        );
    }
}

#[tokio::test]
async fn server_text_is_redacted_escaped_and_capped() {
    const KEY: &str = "sk-echoed-secret-777";
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm).with_api_key(KEY))
        .await
        .unwrap();
    let c = client(&e, &[("vlm_api_key", KEY)]);
    e.push_fault(Fault::EchoAuthorization);
    let err = c.infer_single(&ask()).await.unwrap_err().to_string();
    assert!(!err.contains(KEY) && err.contains("Bearer ***"), "{err}");

    e.push_fault(Fault::Status {
        status: 400,
        content_type: "application/json".into(),
        body: format!(
            r#"{{"error":{{"message":"bad\r\nINFO forged line \u001b[31m{}","type":"BadRequestError"}}}}"#,
            "x".repeat(100_000)
        ),
        headers: vec![],
    });
    let err = c.infer_single(&ask()).await.unwrap_err().to_string();
    assert!(
        !err.contains('\n') && !err.contains('\r') && !err.contains('\u{1b}'),
        "{err}"
    );
    assert!(err.contains(r"bad\r\nINFO forged line \u{1b}[31m"), "{err}");
    assert!(
        err.len() < 3000 && err.contains("…[cut: "),
        "{} bytes",
        err.len()
    );
}
#[tokio::test]
async fn lmdeploy_200_with_finish_reason_error_is_an_error_and_not_retried() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::LmDeploy))
        .await
        .unwrap();
    e.push_fault(Fault::FinishReasonError(
        "internal error happened, status code 6".into(),
    ));
    let err = client(&e, &[]).infer_single(&ask()).await.unwrap_err();
    assert!(
        matches!(err, VlmError::Generation { .. }) && err.to_string().contains("status code 6"),
        "{err:?}"
    );
    assert_eq!(e.chat_requests().len(), 1);
}
