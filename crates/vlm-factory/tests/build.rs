//! The factory maps each backend to its client when compiled in, and names the missing feature
//! when not. This file runs under every feature combination (`cargo xtask matrix`), asserting
//! whichever branch that build must take.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vlm_core::{VlmBackend, VlmError};
use vlm_factory::{VlmSettings, build_client, compiled_backends, is_compiled};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn settings_for(backend: VlmBackend) -> VlmSettings {
    VlmSettings::loader()
        .set_override("vlm_backend", backend.as_str(), "--vlm-backend")
        .set_override("vlm_base_url", "127.0.0.1:9", "--vlm-base-url")
        .set_override("vlm_model", "m", "--vlm-model")
        .load()
        .unwrap()
}

#[test]
fn each_backend_maps_to_its_client_or_names_the_feature_to_enable() {
    let expected_type = |b: VlmBackend| match b {
        VlmBackend::Vllm => "OpenAiCompatible { server: Vllm",
        VlmBackend::LmDeploy => "OpenAiCompatible { server: LmDeploy",
        VlmBackend::Ollama => "OpenAiCompatible { server: Ollama",
        VlmBackend::OpenAi => "OpenAiCompatible { server: OpenAi",
        _ => "TritonClient",
    };
    for &backend in VlmBackend::ALL {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let result =
            tracing::subscriber::with_default(subscriber, || build_client(&settings_for(backend)));
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        if is_compiled(backend) {
            let client = result.unwrap_or_else(|e| panic!("{backend}: {e}"));
            assert_eq!(client.backend(), backend);
            assert_eq!(client.model(), Some("m"));
            assert!(
                format!("{client:?}").starts_with(expected_type(backend)),
                "{client:?}"
            );
            assert!(
                log.contains("built VLM client") && log.contains(&format!("backend={backend}")),
                "{log}"
            );
            // Building a client never warns: the CLI says what it needs to, once.
            assert!(!log.contains("WARN"), "{log}");
            if backend == VlmBackend::Triton {
                assert_eq!(client.base_url().as_str(), "http://127.0.0.1:9/");
            } else {
                assert_eq!(client.base_url().as_str(), "http://127.0.0.1:9/v1/");
            }
        } else {
            let err = result.unwrap_err();
            match &err {
                VlmError::BackendNotCompiled { compiled, .. } => {
                    assert_eq!(*compiled, compiled_backends());
                }
                other => panic!("{other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(&format!("--features {backend}")), "{msg}");
            let compiled: Vec<&str> = compiled_backends().iter().map(|b| b.as_str()).collect();
            let listed = if compiled.is_empty() {
                "none".to_owned()
            } else {
                compiled.join(", ")
            };
            assert!(msg.contains(&format!("(compiled in: {listed})")), "{msg}");
            assert!(err.is_config());
        }
    }
}
