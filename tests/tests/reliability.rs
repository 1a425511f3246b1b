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
    assert!(err.to_string().contains("--vlm-timeout"), "{err}");
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
async fn a_connection_dropped_mid_body_is_retried() {
    let e = vllm().await;
    e.push_fault(Fault::DropMidBody);
    let answer = client(&e, &[]).infer_single(&ask()).await.unwrap();
    assert!(answer.text.starts_with("[emulator]"));
    assert_eq!(e.chat_requests().len(), 2);

    e.fail_next(3, Fault::DropMidBody);
    let err = client(&e, &[]).infer_single(&ask()).await.unwrap_err();
    assert!(matches!(err, VlmError::Transport { .. }), "{err:?}");
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
