//! Streaming against the emulators: the same answer as a whole response, framed as each
//! server frames it.

use std::time::Duration;

use futures_util::StreamExt as _;
use vlm_core::{ImageInput, StreamEvent, VlmBackend, VlmError, VlmRequest};
use vlm_factory::{VlmSettings, build_client};
use vlm_testkit::{Emulator, EmulatorConfig, Fault};

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(6, 5, |x, y| {
        image::Rgb([(x * 40) as u8, (y * 40) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn client(e: &Emulator, timeout: &str) -> std::sync::Arc<dyn vlm_core::VlmClient> {
    let settings = VlmSettings::loader()
        .set_override("vlm_backend", e.backend().as_str(), "--vlm-backend")
        .set_override("vlm_base_url", e.base_url(), "--vlm-base-url")
        .set_override("vlm_timeout", timeout, "--vlm-timeout")
        .load()
        .unwrap();
    build_client(&settings).unwrap()
}

#[tokio::test]
async fn streamed_text_equals_the_whole_answer_with_finish_and_usage() {
    for backend in [VlmBackend::Vllm, VlmBackend::LmDeploy] {
        let e = Emulator::start(EmulatorConfig::new(backend)).await.unwrap();
        let client = client(&e, "30");
        let request = VlmRequest::builder("colour?")
            .image(ImageInput::bytes(png()))
            .max_tokens(300)
            .build()
            .unwrap();
        let whole = client.infer_single(&request).await.unwrap();
        let events: Vec<StreamEvent> = client
            .infer_stream(&request)
            .await
            .unwrap()
            .map(|e| e.unwrap())
            .collect()
            .await;
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, whole.text, "{backend}");
        assert!(events.len() > 5, "{backend}: the answer arrives in pieces");
        assert!(events.contains(&StreamEvent::Finish("stop".into())));
        assert!(
            matches!(events.last(), Some(StreamEvent::Usage(u)) if u.completion_tokens > 0),
            "{events:?}"
        );
        let sent = e.chat_requests().pop().unwrap().json.unwrap();
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }
}

#[tokio::test]
async fn a_stream_whose_server_never_answers_times_out_and_triton_streams_once() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap();
    e.push_fault(Fault::Hang);
    let request = VlmRequest::builder("x").build().unwrap();
    let started = std::time::Instant::now();
    let err = client(&e, "0.4")
        .infer_stream(&request)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, VlmError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    e.push_fault(Fault::unavailable());
    let err = client(&e, "5").infer_stream(&request).await.err().unwrap();
    assert_eq!(err.status(), Some(503));

    // A proxy that sends 502 headers, then stalls: bounded by the timeout too.
    e.push_fault(Fault::StallAfterHeaders(502));
    let started = std::time::Instant::now();
    let err = client(&e, "0.4")
        .infer_stream(&request)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, VlmError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let t = Emulator::start(EmulatorConfig::new(VlmBackend::Triton))
        .await
        .unwrap();
    // A multimodal ensemble is not decoupled: the whole answer comes as one text event.
    let events: Vec<_> = client(&t, "5")
        .infer_stream(&request)
        .await
        .unwrap()
        .collect()
        .await;
    assert!(
        matches!(events.first(), Some(Ok(StreamEvent::Text(t))) if t.starts_with("[emulator]")),
        "{events:?}"
    );
}
