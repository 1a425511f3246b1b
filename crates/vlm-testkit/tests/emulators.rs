//! Each emulator's routes, bodies, validation, streaming and faults, through plain HTTP.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use vlm_core::VlmBackend;
use vlm_testkit::{Emulator, EmulatorConfig, Fault};

fn png(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(f(x, y)));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn sepia() -> Vec<u8> {
    png(16, 12, |x, _| {
        let v = 40 + x as u8 * 12;
        [v + 18, v + 6, v.saturating_sub(8)]
    })
}

fn grey() -> Vec<u8> {
    png(10, 10, |x, y| [((x + y) * 12) as u8; 3])
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn chat_body(model: Option<&str>, images: &[String]) -> Value {
    let mut content = vec![json!({"type": "text", "text": "Describe the colour."})];
    for url in images {
        content.push(json!({"type": "image_url", "image_url": {"url": url}}));
    }
    let mut body = json!({"messages": [{"role": "user", "content": content}], "max_tokens": 300});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    body
}

async fn start(backend: VlmBackend) -> Emulator {
    Emulator::start(EmulatorConfig::new(backend).with_model("m"))
        .await
        .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let resp = http().post(url).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(url: &str) -> (u16, String) {
    let resp = http().get(url).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn vllm_routes_answer_as_vllm_does() {
    let e = start(VlmBackend::Vllm).await;
    let root = e.root_url();
    assert_eq!(get(&format!("{root}/health")).await, (200, String::new()));
    let (status, version) = get(&format!("{root}/version")).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&version).unwrap()),
        (200, json!({"version": "0.33.0"}))
    );
    let (status, models) = get(&format!("{}/models", e.base_url())).await;
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "m");
    assert_eq!(models["data"][0]["max_model_len"], 32768);
    assert_eq!(models["data"][0]["owned_by"], "vllm");

    // `model` is optional for vLLM.
    let url = format!("{}/chat/completions", e.base_url());
    let (status, answer) = post(&url, &chat_body(None, &[data_url("image/png", &sepia())])).await;
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("[emulator] 16x12 PNG"), "{text}");
    assert!(text.contains("monochrome with an orange cast"), "{text}");
    assert_eq!(answer["model"], "m");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap() > 256);

    // Unknown model: 404 in vLLM's nested shape.
    let (status, err) = post(&url, &chat_body(Some("nope"), &[])).await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["message"], "The model `nope` does not exist.");
    assert_eq!(err["error"]["type"], "NotFoundError");

    // An undecodable image: 400.
    let (status, err) = post(
        &url,
        &chat_body(
            Some("m"),
            &[data_url("image/png", b"\x89PNG\r\n\x1a\nbroken")],
        ),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot decode PNG image"),
        "{err}"
    );
    let (status, err) = post(
        &url,
        &chat_body(Some("m"), &[data_url("image/jpeg", &grey())]),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("declared image/jpeg but the bytes are image/png"),
        "{err}"
    );
    let (status, _) = post(
        &url,
        &chat_body(Some("m"), &["data:image/png;base64,@@@".to_owned()]),
    )
    .await;
    assert_eq!(status, 400);
    let (status, err) = post(
        &url,
        &chat_body(Some("m"), &["https://example.com/x.png".to_owned()]),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not fetch remote images")
    );

    // stream_options without stream: 400.
    let mut body = chat_body(Some("m"), &[]);
    body["stream_options"] = json!({"include_usage": true});
    let (status, err) = post(&url, &body).await;
    assert_eq!(status, 400);
    assert_eq!(
        err["error"]["message"],
        "Stream options can only be defined when `stream=True`."
    );

    // Malformed messages.
    for bad in [
        json!({"model": "m", "messages": []}),
        json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
    ] {
        assert_eq!(post(&url, &bad).await.0, 400, "{bad}");
    }
    // Content-Type must be JSON.
    let resp = http()
        .post(&url)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test]
async fn vllm_api_key_guards_v1_only() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm).with_api_key("sk-1"))
        .await
        .unwrap();
    assert_eq!(get(&format!("{}/health", e.root_url())).await.0, 200);
    assert_eq!(get(&format!("{}/version", e.root_url())).await.0, 200);
    let (status, body) = get(&format!("{}/models", e.base_url())).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (401, json!({"error": "Unauthorized"}))
    );
    let ok = http()
        .get(format!("{}/models", e.base_url()))
        .bearer_auth("sk-1")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let wrong = http()
        .get(format!("{}/models", e.base_url()))
        .bearer_auth("sk-2")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
}

#[tokio::test]
async fn lmdeploy_routes_answer_as_lmdeploy_does() {
    let e = Emulator::start(
        EmulatorConfig::new(VlmBackend::LmDeploy)
            .with_model("m")
            .with_api_key("EMPTY"),
    )
    .await
    .unwrap();
    let (status, health) = get(&format!("{}/health", e.root_url())).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&health).unwrap()),
        (200, json!({"status": "healthy", "message": ""}))
    );
    // Everything but /health is protected when a key is set, in the flat shape.
    let (status, body) = get(&format!("{}/models", e.base_url())).await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, body["object"].as_str(), body["type"].as_str()),
        (401, Some("error"), Some("authentication_error"))
    );

    let client = http();
    let url = format!("{}/chat/completions", e.base_url());
    let send = |body: Value| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let resp = client
                .post(url)
                .bearer_auth("EMPTY")
                .json(&body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    // `model` is required: FastAPI's 422.
    let (status, err) = send(chat_body(None, &[])).await;
    assert_eq!(status, 422);
    assert_eq!(err["detail"][0]["loc"], json!(["body", "model"]));
    // Unknown model: 404, flat.
    let (status, err) = send(chat_body(Some("nope"), &[])).await;
    assert_eq!(status, 404);
    assert_eq!(err["object"], "error");
    assert_eq!(err["message"], "The model 'nope' does not exist.");
    // Undecodable image: 400, flat.
    let (status, err) = send(chat_body(
        Some("m"),
        &[data_url("image/gif", b"GIF89a\x01")],
    ))
    .await;
    assert_eq!(status, 400);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("cannot decode GIF image"),
        "{err}"
    );
    // A good one.
    let (status, ok) = send(chat_body(Some("m"), &[data_url("image/png", &grey())])).await;
    assert_eq!(status, 200, "{ok}");
    assert!(
        ok["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("neutral monochrome"),
        "{ok}"
    );
    // Content-Type must be application/json.
    let resp = client
        .post(&url)
        .bearer_auth("EMPTY")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test]
async fn triton_routes_answer_as_triton_does() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Triton))
        .await
        .unwrap();
    assert_eq!(e.base_url(), e.root_url());
    let root = e.root_url();
    assert_eq!(
        get(&format!("{root}/v2/health/live")).await,
        (200, String::new())
    );
    assert_eq!(
        get(&format!("{root}/v2/health/ready")).await,
        (200, String::new())
    );
    assert_eq!(
        get(&format!("{root}/v2/models/ensemble/ready")).await,
        (200, String::new())
    );
    let (status, body) = get(&format!("{root}/v2/models/x/ready")).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (
            404,
            json!({"error": "Request for unknown model: 'x' is not found"})
        )
    );
    let (status, meta) = get(&format!("{root}/v2")).await;
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!((status, meta["name"].as_str()), (200, Some("triton")));
    assert!(meta["version"].is_string() && meta["extensions"].is_array());
    let (status, model) = get(&format!("{root}/v2/models/ensemble")).await;
    let model: Value = serde_json::from_str(&model).unwrap();
    assert_eq!((status, model["name"].as_str()), (200, Some("ensemble")));
    assert!(
        model["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "image_url_input")
    );
    assert_eq!(get(&format!("{root}/v2/nothing")).await.0, 404);
}

/// Splits an SSE body into its `data:` payloads and comment lines.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn streaming_is_framed_as_the_servers_frame_it() {
    for backend in [VlmBackend::Vllm, VlmBackend::LmDeploy] {
        let e = start(backend).await;
        let url = format!("{}/chat/completions", e.base_url());
        for include_usage in [false, true] {
            let mut body = chat_body(Some("m"), &[data_url("image/png", &sepia())]);
            body["stream"] = json!(true);
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let resp = http().post(&url).json(&body).send().await.unwrap();
            assert_eq!(
                resp.headers()["content-type"],
                "text/event-stream; charset=utf-8"
            );
            let events = sse_events(&resp.text().await.unwrap());
            assert_eq!(
                events.last().map(String::as_str),
                Some("data: [DONE]"),
                "{backend}"
            );
            assert_eq!(
                events.iter().any(|e| e == ": keep-alive"),
                backend == VlmBackend::Vllm,
                "{backend}"
            );
            let chunks: Vec<Value> = events
                .iter()
                .filter_map(|e| e.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            let usage_chunks: Vec<&Value> = chunks
                .iter()
                .filter(|c| c["choices"] == json!([]))
                .collect();
            assert_eq!(
                usage_chunks.len(),
                usize::from(include_usage),
                "{backend} {include_usage}"
            );
            if include_usage {
                assert!(
                    usage_chunks[0]["usage"]["completion_tokens"]
                        .as_u64()
                        .unwrap()
                        > 0
                );
            }
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert!(text.starts_with("[emulator] 16x12 PNG"), "{text}");
            let finishes: Vec<&Value> = chunks
                .iter()
                .map(|c| &c["choices"][0]["finish_reason"])
                .filter(|f| !f.is_null())
                .collect();
            assert_eq!(finishes, [&json!("stop")]);
        }
    }
}

#[tokio::test]
async fn answers_differ_per_image_and_name_each_sha256_prefix() {
    let e = start(VlmBackend::Vllm).await;
    let url = format!("{}/chat/completions", e.base_url());
    let mut texts = Vec::new();
    for image in [sepia(), grey()] {
        let (_, answer) = post(
            &url,
            &chat_body(Some("m"), &[data_url("image/png", &image)]),
        )
        .await;
        let text = answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        let prefix = vlm_testkit::analysis::sha256_prefix(&image);
        assert!(text.ends_with(&format!("sha256 {prefix}")), "{text}");
        texts.push(text);
    }
    assert_ne!(texts[0], texts[1]);
    // max_tokens cuts the answer and says so.
    let mut body = chat_body(Some("m"), &[data_url("image/png", &grey())]);
    body["max_tokens"] = json!(3);
    let (_, cut) = post(&url, &body).await;
    assert_eq!(cut["choices"][0]["finish_reason"], "length");
    assert_eq!(cut["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn each_fault_does_what_it_promises() {
    let e = start(VlmBackend::Vllm).await;
    let url = format!("{}/chat/completions", e.base_url());
    let body = chat_body(Some("m"), &[]);

    e.fail_next(2, Fault::unavailable());
    assert_eq!(post(&url, &body).await.0, 503);
    assert_eq!(post(&url, &body).await.0, 503);
    assert_eq!(post(&url, &body).await.0, 200);

    e.push_fault(Fault::rate_limited(2));
    let resp = http().post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "2");

    e.push_fault(Fault::html_bad_gateway());
    let resp = http().post(&url).json(&body).send().await.unwrap();
    assert_eq!(
        (
            resp.status().as_u16(),
            resp.headers()["content-type"].to_str().unwrap()
        ),
        (502, "text/html")
    );
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("<h1>502 Bad Gateway</h1>")
    );

    e.push_fault(Fault::FinishReasonError("internal error happened".into()));
    let (status, answer) = post(&url, &body).await;
    assert_eq!(
        (status, &answer["choices"][0]["finish_reason"]),
        (200, &json!("error"))
    );
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "internal error happened"
    );

    e.push_fault(Fault::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(post(&url, &body).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    e.push_fault(Fault::Hang);
    let hung = http()
        .post(&url)
        .json(&body)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());

    e.push_fault(Fault::DropMidBody);
    let resp = http().post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.bytes().await.is_err(), "the body must be cut short");

    e.set_delay(Duration::from_millis(100));
    let started = Instant::now();
    assert_eq!(post(&url, &body).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(100));

    let recorded = e.chat_requests();
    assert_eq!(recorded.len(), 10);
    assert_eq!(recorded[0].json.as_ref().unwrap()["model"], "m");
    assert_eq!(recorded[0].header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn a_server_still_loading_refuses_connections_then_comes_up() {
    let e = Emulator::start_after(
        EmulatorConfig::new(VlmBackend::LmDeploy),
        Duration::from_millis(400),
    )
    .await
    .unwrap();
    let url = format!("{}/health", e.root_url());
    let early = http().get(&url).send().await;
    assert!(
        early.unwrap_err().is_connect(),
        "the port must be closed while loading"
    );
    let started = Instant::now();
    loop {
        if let Ok(resp) = http().get(&url).send().await {
            assert_eq!(resp.status().as_u16(), 200);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn dropping_the_emulator_closes_its_port() {
    let e = start(VlmBackend::Vllm).await;
    let url = format!("{}/health", e.root_url());
    assert_eq!(get(&url).await.0, 200);
    drop(e);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(http().get(&url).send().await.unwrap_err().is_connect());
}

#[test]
fn the_emulator_binary_prints_its_base_url_serves_and_exits_0_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    for (backend, health, suffix) in [
        ("vllm", "/health", "/v1"),
        ("lmdeploy", "/health", "/v1"),
        ("triton", "/v2/health/ready", ""),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vlm-emulator"))
            .args(["--backend", backend, "--model", "my-model"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line.trim().to_owned();
        assert!(
            base.starts_with("http://127.0.0.1:") && base.ends_with(suffix),
            "{base}"
        );
        let root = base.trim_end_matches("/v1");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(get(&format!("{root}{health}")).await.0, 200, "{backend}");
            if backend != "triton" {
                let (status, models) = get(&format!("{root}/v1/models")).await;
                assert!(status == 200 && models.contains("my-model"), "{models}");
            }
        });
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{backend}");
    }
    // A busy port is an error.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_vlm-emulator"))
        .args(["--backend", "vllm", "--port", &port])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen on 127.0.0.1"),
        "{out:?}"
    );
}

#[tokio::test]
async fn llama_cpp_cannot_decode_webp_as_stb_image_cannot() {
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples");
    let webp = std::fs::read(samples.join("neutral_street.webp")).unwrap();
    let llama = Emulator::start(
        EmulatorConfig::new(VlmBackend::OpenAi)
            .with_flavor(vlm_testkit::OpenAiFlavor::LlamaCpp)
            .with_model("m"),
    )
    .await
    .unwrap();
    let chat = format!("{}/chat/completions", llama.base_url());
    let (status, body) = post(
        &chat,
        &chat_body(Some("m"), &[data_url("image/webp", &webp)]),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body,
        json!({"error": {"code": 400, "message": "Failed to load image or audio file", "type": "invalid_request_error"}})
    );
    let (status, body) = post(
        &chat,
        &chat_body(Some("m"), &[data_url("image/png", &sepia())]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // SGLang decodes WebP.
    let sglang = start(VlmBackend::OpenAi).await;
    let chat = format!("{}/chat/completions", sglang.base_url());
    let (status, body) = post(
        &chat,
        &chat_body(Some("m"), &[data_url("image/webp", &webp)]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn lm_studio_answers_unknown_routes_200_and_lists_models_as_lm_studio_does() {
    let lms = Emulator::start(
        EmulatorConfig::new(VlmBackend::OpenAi)
            .with_flavor(vlm_testkit::OpenAiFlavor::LmStudio)
            .with_model("qwen2.5-vl-7b"),
    )
    .await
    .unwrap();
    let root = lms.root_url();
    let root = root.trim_end_matches('/');
    let (status, body) = get(&format!("{root}/health")).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        r#"{"error":"Unexpected endpoint or method. (GET /health)"}"#
    );
    let (status, body) = get(&format!("{root}/lmstudio-greeting")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"lmstudio":true}"#));
    let (status, body) = get(&format!("{}/models", lms.base_url())).await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        list,
        json!({"data": [{"id": "qwen2.5-vl-7b", "object": "model", "owned_by": "organization_owner"}], "object": "list"})
    );
    // `model` may be left out with one model loaded; errors are OpenAI's nested shape.
    let chat = format!("{}/chat/completions", lms.base_url());
    let (status, body) = post(&chat, &chat_body(None, &[data_url("image/png", &sepia())])).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&chat, &json!({"messages": "not a list"})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}
