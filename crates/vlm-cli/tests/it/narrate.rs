//! `vlm narrate` end to end.

use vlm_core::VlmBackend;
use vlm_testkit::{Emulator, EmulatorConfig};

use crate::{records, run, sha256_prefix, stderr, vlm, workdir};

async fn emulator(backend: VlmBackend) -> Emulator {
    Emulator::start(EmulatorConfig::new(backend).with_model("test-model"))
        .await
        .unwrap()
}

#[cfg(all(feature = "vllm", feature = "lmdeploy"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrates_the_samples_through_vllm_and_lmdeploy() {
    for backend in [VlmBackend::Vllm, VlmBackend::LmDeploy] {
        let e = emulator(backend).await;
        let dir = workdir();
        let mut cmd = vlm(&dir);
        cmd.args([
            "narrate",
            "images",
            "--vlm-backend",
            backend.as_str(),
            "--vlm-base-url",
            &e.base_url(),
        ]);
        let out = run(cmd).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{backend}: {err}");
        assert!(
            err.contains(&format!("🤖 VLM: {backend}/test-model")),
            "{err}"
        );
        let recs = records(&String::from_utf8(out.stdout).unwrap());
        assert_eq!(recs.len(), 5, "{backend}: one record per image");
        for rec in &recs {
            let path = rec["path"].as_str().unwrap();
            assert!(path.starts_with("images/"), "{path}");
            let prefix = sha256_prefix(&dir.join(path));
            assert!(rec["sha256"].as_str().unwrap().starts_with(&prefix));
            let text = rec["text"].as_str().unwrap();
            assert!(
                text.starts_with("[emulator]") && text.ends_with(&format!("sha256 {prefix}")),
                "{path}: {text}"
            );
            assert_eq!(
                (rec["backend"].as_str(), rec["model"].as_str()),
                (Some(backend.as_str()), Some("test-model"))
            );
            assert!(
                rec["error"].is_null()
                    && rec["finish_reason"] == "stop"
                    && rec["usage"]["total_tokens"].as_u64().unwrap() > 0
            );
            assert!(rec["latency_ms"].is_u64());
        }
        let mut paths: Vec<&str> = recs.iter().map(|r| r["path"].as_str().unwrap()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "images/colour_market.png",
                "images/cyanotype_harbour.png",
                "images/green_cast_field.jpg",
                "images/neutral_street.webp",
                "images/sepia_portrait.jpg"
            ]
        );
        assert_eq!(e.chat_requests().len(), 5);
    }
}

#[cfg(feature = "triton")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_narrates_through_the_generate_extension_each_record_its_own_image() {
    use vlm_testkit::TritonModel;
    for (kind, template) in [
        (TritonModel::MultimodalEnsemble, None),
        (TritonModel::VllmBackend, Some("<|image|>{prompt}")),
    ] {
        let e = Emulator::start(
            EmulatorConfig::new(VlmBackend::Triton)
                .with_model("vlm")
                .with_triton_model(kind),
        )
        .await
        .unwrap();
        let dir = workdir();
        let mut cmd = vlm(&dir);
        cmd.args([
            "narrate",
            "images",
            "--vlm-backend",
            "triton",
            "--vlm-base-url",
            &e.base_url(),
        ]);
        if let Some(t) = template {
            cmd.args(["--prompt-template", t]);
        }
        let out = run(cmd).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{kind:?}: {err}");
        assert!(err.contains("🤖 VLM: triton/vlm"), "{err}");
        let recs = records(&String::from_utf8(out.stdout).unwrap());
        assert_eq!(recs.len(), 5, "{kind:?}");
        for r in &recs {
            let path = r["path"].as_str().unwrap();
            let text = r["text"]
                .as_str()
                .unwrap_or_else(|| panic!("{kind:?}: {r}"));
            // The answer for its own image, with no echoed prompt in front.
            let prefix = sha256_prefix(&dir.join(path));
            assert!(
                text.starts_with("[emulator]") && text.ends_with(&format!("sha256 {prefix}")),
                "{kind:?} {path}: {text}"
            );
        }
    }
}

#[cfg(feature = "triton")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_streams_through_generate_stream_or_whole_when_not_decoupled() {
    use vlm_testkit::TritonModel;
    for (kind, template) in [
        (TritonModel::VllmBackend, Some("<|image|>{prompt}")),
        (TritonModel::MultimodalEnsemble, None),
    ] {
        let e = Emulator::start(
            EmulatorConfig::new(VlmBackend::Triton)
                .with_model("vlm")
                .with_triton_model(kind),
        )
        .await
        .unwrap();
        let dir = workdir();
        let mut cmd = vlm(&dir);
        cmd.args([
            "narrate",
            "images/sepia_portrait.jpg",
            "--stream",
            "-o",
            "out.jsonl",
            "--vlm-backend",
            "triton",
            "--vlm-base-url",
            &e.base_url(),
        ]);
        if let Some(t) = template {
            cmd.args(["--prompt-template", t]);
        }
        let out = run(cmd).await;
        assert_eq!(out.status.code(), Some(0), "{kind:?}: {}", stderr(&out));
        let printed = String::from_utf8(out.stdout).unwrap();
        assert!(printed.starts_with("[emulator] "), "{kind:?}: {printed}");
        let recs = records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap());
        assert_eq!(recs[0]["text"].as_str().unwrap(), printed.trim_end());
        let route = if kind == TritonModel::VllmBackend {
            "/generate_stream"
        } else {
            "/generate"
        };
        assert!(
            e.requests().iter().any(|r| r.path.ends_with(route)),
            "{kind:?}"
        );
    }
}

#[cfg(feature = "triton")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_models_that_cannot_take_images_exit_4_with_the_reason() {
    let e = Emulator::start(
        EmulatorConfig::new(VlmBackend::Triton)
            .with_model("text")
            .with_triton_model(vlm_testkit::TritonModel::TextOnly),
    )
    .await
    .unwrap();
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "triton",
        "--vlm-base-url",
        &e.base_url(),
        "--output",
        "out.jsonl",
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("state: ready") && err.contains("text-only"),
        "{err}"
    );
    assert!(!dir.join("out.jsonl").exists(), "no output is opened");
    assert!(!e.requests().iter().any(|r| r.path.ends_with("/generate")));

    // Triton's OpenAI frontend (FastAPI's 404 on /v2): text-only, exit 4.
    let frontend = Emulator::start(EmulatorConfig::new(VlmBackend::OpenAi))
        .await
        .unwrap();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "triton",
        "--vlm-base-url",
        &frontend.root_url(),
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("OpenAI-compatible frontend"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_backend_exits_2_with_a_suggestion() {
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args(["narrate", "images", "--vlm-backend", "lmdepoy"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "unknown vlm_backend \"lmdepoy\" (from --vlm-backend); did you mean \"lmdeploy\"?"
        ),
        "{err}"
    );
}

#[cfg(feature = "lmdeploy")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_exits_3_with_the_start_command() {
    let dir = workdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "lmdeploy",
        "--vlm-base-url",
        &format!("127.0.0.1:{port}"),
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "lmdeploy serve api_server <model> --server-port {port}"
        )),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// In a build without some backend, choosing it is a configuration error naming the feature.
#[cfg(not(all(feature = "vllm", feature = "lmdeploy", feature = "triton")))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_not_compiled_in_exits_2_naming_the_feature() {
    let missing: Vec<VlmBackend> = [
        (VlmBackend::Vllm, cfg!(feature = "vllm")),
        (VlmBackend::LmDeploy, cfg!(feature = "lmdeploy")),
        (VlmBackend::Triton, cfg!(feature = "triton")),
    ]
    .into_iter()
    .filter_map(|(b, on)| (!on).then_some(b))
    .collect();
    assert!(!missing.is_empty());
    let dir = workdir();
    for backend in missing {
        let mut cmd = vlm(&dir);
        cmd.args(["narrate", "images", "--vlm-backend", backend.as_str()]);
        let out = run(cmd).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{backend}: {err}");
        assert!(
            err.contains(&format!("rebuild with `--features {backend}`")),
            "{err}"
        );
    }
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_image_named_jpg_is_an_error_record_and_the_run_goes_on() {
    let e = emulator(VlmBackend::Vllm).await;
    let dir = workdir();
    std::fs::write(dir.join("images/notes.jpg"), "this is text, not a JPEG\n").unwrap();
    std::fs::copy(
        dir.join("images/sepia_portrait.jpg"),
        dir.join("images/UPPER.JPG"),
    )
    .unwrap();
    std::fs::write(dir.join("images/readme.txt"), "ignored by the walk").unwrap();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-base-url",
        &e.base_url(),
        "--concurrency",
        "2",
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(recs.len(), 7, "5 samples + UPPER.JPG + notes.jpg");
    let bad = recs
        .iter()
        .find(|r| r["path"] == "images/notes.jpg")
        .unwrap();
    assert!(bad["text"].is_null() && bad["usage"].is_null() && bad["finish_reason"].is_null());
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("not a PNG, JPEG, WebP or GIF image: found text"),
        "{bad}"
    );
    assert!(
        recs.iter()
            .any(|r| r["path"] == "images/UPPER.JPG" && r["error"].is_null())
    );
    assert!(!recs.iter().any(|r| r["path"] == "images/readme.txt"));
    assert!(err.contains("1 failed"), "{err}");
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_output_needs_resume_which_skips_what_is_done() {
    let e = emulator(VlmBackend::Vllm).await;
    let dir = workdir();
    let narrate = |extra: &[&str]| {
        let mut cmd = vlm(&dir);
        cmd.args([
            "narrate",
            "images",
            "--vlm-base-url",
            &e.base_url(),
            "--output",
            "out.jsonl",
        ])
        .args(extra);
        cmd
    };
    let first = run(narrate(&[])).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(e.chat_requests().len(), 5);

    let refused = run(narrate(&[])).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("--resume"),
        "{}",
        stderr(&refused)
    );

    // A changed image and a torn last line: both are redone, nothing else.
    std::fs::copy(
        dir.join("images/colour_market.png"),
        dir.join("images/sepia_portrait.jpg"),
    )
    .unwrap();
    let mut content = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    let last = content.trim_end().rfind('\n').unwrap() + 1;
    let torn_path = records(&content[last..])[0]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    content.truncate(last + 30);
    std::fs::write(dir.join("out.jsonl"), &content).unwrap();

    let resumed = run(narrate(&["--resume"])).await;
    let err = stderr(&resumed);
    assert_eq!(resumed.status.code(), Some(0), "{err}");
    assert!(err.contains("torn"), "{err}");
    let recs = records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap());
    let redone: Vec<&str> = recs[4..]
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    let mut want = vec!["images/sepia_portrait.jpg", torn_path.as_str()];
    want.sort_unstable();
    want.dedup();
    let mut got = redone.clone();
    got.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(e.chat_requests().len(), 5 + want.len());

    let again = run(narrate(&["--resume"])).await;
    assert_eq!(again.status.code(), Some(0));
    assert!(stderr(&again).contains("5 skipped"), "{}", stderr(&again));

    let overwrite = run(narrate(&["--overwrite"])).await;
    assert_eq!(overwrite.status.code(), Some(0));
    assert_eq!(
        records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap()).len(),
        5
    );

    // --resume needs --output: a usage error.
    let mut cmd = vlm(&dir);
    cmd.args(["narrate", "images", "--resume"]);
    assert_eq!(run(cmd).await.status.code(), Some(2));
}

#[cfg(not(feature = "emulate"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_emulate_feature_emulate_says_how_to_get_it() {
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args(["narrate", "--emulate", "images"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("built without the built-in emulator") && err.contains("--features emulate"),
        "{err}"
    );
    let mut cmd = vlm(&dir);
    cmd.args(["emulate", "--backend", "vllm"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[cfg(all(feature = "lmdeploy", feature = "emulate"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulate_flag_narrates_with_no_server_and_says_so() {
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "--emulate",
        "images",
        "--vlm-backend",
        "lmdeploy",
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("built-in lmdeploy emulator")
            && err.contains("not by a vision-language model"),
        "{err}"
    );
    assert_eq!(records(&String::from_utf8(out.stdout).unwrap()).len(), 5);
}

#[cfg(feature = "lmdeploy")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_prints_the_answer_as_it_arrives_and_records_it() {
    let e = emulator(VlmBackend::LmDeploy).await;
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "--stream",
        "images/sepia_portrait.jpg",
        "--vlm-backend",
        "lmdeploy",
        "--vlm-base-url",
        &e.base_url(),
        "-o",
        "one.jsonl",
    ]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    let prefix = sha256_prefix(&dir.join("images/sepia_portrait.jpg"));
    assert!(
        printed.starts_with("[emulator] 320x240 JPEG") && printed.trim_end().ends_with(&prefix),
        "{printed}"
    );
    let recs = records(&std::fs::read_to_string(dir.join("one.jsonl")).unwrap());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["text"].as_str(), Some(printed.trim_end()));
    assert_eq!(recs[0]["finish_reason"], "stop");
    assert!(recs[0]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(e.chat_requests()[0].json.as_ref().unwrap()["stream"], true);

    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "--stream",
        "images",
        "--vlm-backend",
        "lmdeploy",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--stream narrates exactly one image; 5 were given"));
}

#[cfg(all(feature = "vllm", feature = "lmdeploy"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_with_another_backend_or_model_is_warned_about() {
    let vllm = emulator(VlmBackend::Vllm).await;
    let lmdeploy =
        Emulator::start(EmulatorConfig::new(VlmBackend::LmDeploy).with_model("other-model"))
            .await
            .unwrap();
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images/sepia_portrait.jpg",
        "--vlm-base-url",
        &vllm.base_url(),
        "-o",
        "out.jsonl",
    ]);
    assert_eq!(run(cmd).await.status.code(), Some(0));
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "lmdeploy",
        "--vlm-base-url",
        &lmdeploy.base_url(),
        "-o",
        "out.jsonl",
        "--resume",
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(
            "the output holds records from vllm/test-model; this run uses lmdeploy/other-model"
        ),
        "{err}"
    );
    // The image done by the other model was asked differently (the model is part of the
    // request's fingerprint): it is narrated again, and the run says so.
    assert!(
        err.contains("1 image(s) in the output were narrated with a different request"),
        "{err}"
    );
    assert_eq!(lmdeploy.chat_requests().len(), 5);
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_puts_each_images_parsed_answer_in_its_record() {
    let e = emulator(VlmBackend::Vllm).await;
    let dir = workdir();
    std::fs::write(
        dir.join("cast.json"),
        r#"{"type":"object","properties":{"caption":{"type":"string"},"toned":{"type":"boolean"}},"required":["caption","toned"]}"#,
    )
    .unwrap();
    e.push_fault(vlm_testkit::Fault::NotJson); // one prose answer: asked again
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--json-schema",
        "cast.json",
        "--concurrency",
        "1",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("not valid JSON for the schema"),
        "the retry is logged: {err}"
    );
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(recs.len(), 5);
    for r in &recs {
        let prefix = sha256_prefix(&dir.join(r["path"].as_str().unwrap()));
        let caption = r["json"]["caption"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"));
        assert!(caption.ends_with(&format!("sha256 {prefix}")), "{caption}");
        assert_eq!(r["json"]["toned"], true);
    }
    assert_eq!(e.chat_requests().len(), 6);

    // Without a schema the key is there, null.
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images/sepia_portrait.jpg",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    assert!(recs[0]["json"].is_null() && recs[0].get("json").is_some());

    // A schema file that is not JSON is a usage error before anything is sent.
    std::fs::write(dir.join("bad.json"), "{not json").unwrap();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--json-schema",
        "bad.json",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[cfg(all(feature = "vllm", feature = "resize"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_image_edge_shrinks_what_is_sent_not_the_records_sha256() {
    let e = emulator(VlmBackend::Vllm).await;
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--max-image-edge",
        "64",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(recs.len(), 5);
    for r in &recs {
        let text = r["text"].as_str().unwrap();
        // The samples are 320x240: sent as 64x48 JPEGs (PNG where there is alpha).
        assert!(text.starts_with("[emulator] 64x48 "), "{text}");
        let path = dir.join(r["path"].as_str().unwrap());
        let prefix = sha256_prefix(&path);
        assert!(
            r["sha256"].as_str().unwrap().starts_with(&prefix),
            "the file's, not what was sent"
        );
        assert!(
            !text.ends_with(&prefix),
            "what was sent is another image: {text}"
        );
    }
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--max-image-edge",
        "4",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "below 16 is refused: {}",
        stderr(&out)
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cut_off_by_max_tokens_are_counted_and_redo_truncated_redoes_them() {
    let e = crate::vllm_emulator().await;
    let dir = workdir();
    let narrate = |extra: &[&str]| {
        let mut args = vec!["-o", "out.jsonl"];
        args.extend_from_slice(extra);
        crate::narrate_in(&dir, &e.base_url(), &args)
    };
    let out = run(narrate(&["--max-tokens", "3"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("5 cut off by max_tokens (finish_reason \"length\")"),
        "{}",
        stderr(&out)
    );
    // A plain resume of the same request keeps them (they are answers), and says how to redo
    // them.
    let out = run(narrate(&["--resume", "--max-tokens", "3"])).await;
    assert!(
        stderr(&out).contains("0 of 5 image(s)")
            && stderr(&out).contains("--redo-truncated redoes them"),
        "{}",
        stderr(&out)
    );
    let out = run(narrate(&[
        "--resume",
        "--redo-truncated",
        "--max-tokens",
        "3",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("narrated 5 of 5 image(s)")
            && stderr(&out).contains("--redo-truncated: redoing 5 answer(s)"),
        "{}",
        stderr(&out)
    );
    // A larger max_tokens is another request: redone without --redo-truncated, and whole.
    let out = run(narrate(&["--resume"])).await;
    assert!(
        stderr(&out).contains("narrated 5 of 5 image(s)"),
        "{}",
        stderr(&out)
    );
    let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    let last: Vec<_> = records(&text).into_iter().skip(10).collect();
    assert!(
        last.len() == 5 && last.iter().all(|r| r["finish_reason"] == "stop"),
        "{last:?}"
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photographs_of_types_no_server_takes_are_counted_by_type_in_the_summary() {
    let e = crate::vllm_emulator().await;
    let dir = workdir();
    for name in ["raw.CR2", "art.psd", "phone.heic", "notes.xmp"] {
        std::fs::write(dir.join("images").join(name), b"not sent").unwrap();
    }
    let cmd = crate::narrate_in(&dir, &e.base_url(), &[]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "3 photograph(s) of types no server takes skipped: 1 .cr2, 1 .heic, 1 .psd — not sent"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(e.chat_requests().len(), 5);
}

#[cfg(all(feature = "vllm", feature = "emulate"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vlm_emulate_rehearses_failures_and_refuses_options_it_would_ignore() {
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "emulate",
        "--backend",
        "vllm",
        "--vlm-model",
        "m",
        "--vlm-base-url",
        "http://x:1/v1",
    ]);
    let refused = run(cmd).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("--vlm-model (use --model), --vlm-base-url (use --port)"),
        "{}",
        stderr(&refused)
    );

    // Closed for a second, then two 503s: narrate rides both out.
    let mut cmd = vlm(&dir);
    cmd.args([
        "emulate",
        "--backend",
        "vllm",
        "--start-after",
        "1s",
        "--fault",
        "503x2",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut url = String::new();
    let stdout = child.stdout.take().unwrap();
    let url = tokio::task::spawn_blocking(move || {
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut url).unwrap();
        url.trim().to_owned()
    })
    .await
    .unwrap();
    let out = run(crate::narrate_in(
        &dir,
        &url,
        &["--wait", "10", "--concurrency", "1"],
    ))
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("waiting up to 10 s") && err.contains("HTTP 503"),
        "{err}"
    );
    assert_eq!(records(&String::from_utf8(out.stdout).unwrap()).len(), 5);
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_redoes_what_was_asked_differently_and_says_so() {
    let e = crate::vllm_emulator().await;
    let dir = workdir();
    let narrate = |extra: &[&str]| {
        let mut args = vec!["-o", "out.jsonl"];
        args.extend_from_slice(extra);
        crate::narrate_in(&dir, &e.base_url(), &args)
    };
    let out = run(narrate(&[])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let first = records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap());
    let fingerprint = first[0]["request_sha256"].as_str().unwrap().to_owned();
    assert_eq!(fingerprint.len(), 64);
    assert!(
        first
            .iter()
            .all(|r| r["request_sha256"] == fingerprint.as_str())
    );

    // Another prompt: nothing is passed over as done, and the run says why.
    let out = run(narrate(&["--resume", "--prompt", "List the subjects"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("narrated 5 of 5 image(s)"), "{err}");
    assert!(
        err.contains("5 image(s) in the output were narrated with a different request")
            && err.contains("--overwrite or a new --output"),
        "{err}"
    );
    let all = records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap());
    assert_eq!(all.len(), 10);
    assert_ne!(all[9]["request_sha256"], fingerprint.as_str());
    // Asked the same way again: all done.
    let out = run(narrate(&["--resume", "--prompt", "List the subjects"])).await;
    assert!(
        stderr(&out).contains("narrated 0 of 5 image(s): 0 failed, 5 skipped"),
        "{}",
        stderr(&out)
    );
    // Another max_tokens is another request too.
    let out = run(narrate(&[
        "--resume",
        "--prompt",
        "List the subjects",
        "--max-tokens",
        "50",
    ]))
    .await;
    assert!(
        stderr(&out).contains("narrated 5 of 5 image(s)"),
        "{}",
        stderr(&out)
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_matches_a_file_however_its_path_is_spelled() {
    let e = crate::vllm_emulator().await;
    let dir = workdir();
    let absolute = dir.join("images").canonicalize().unwrap();
    let mut cmd = vlm(&dir);
    cmd.arg("narrate")
        .arg(&absolute)
        .args(["--vlm-base-url", &e.base_url(), "-o", "out.jsonl"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The same folder, spelled relative to the working directory.
    let out = run(crate::narrate_in(
        &dir,
        &e.base_url(),
        &["-o", "out.jsonl", "--resume"],
    ))
    .await;
    assert!(
        stderr(&out).contains("narrated 0 of 5 image(s): 0 failed, 5 skipped"),
        "{}",
        stderr(&out)
    );
    let all = records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap());
    assert_eq!(all.len(), 5, "one record per image");
    assert!(
        all[0]["path"].as_str().unwrap().starts_with('/'),
        "the path as given is kept"
    );
}

#[cfg(all(feature = "vllm", feature = "resize"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiff_is_converted_and_its_record_keeps_the_files_sha256() {
    let e = crate::vllm_emulator().await;
    let dir = workdir();
    let tiff = dir.join("images/scan.TIF");
    image::RgbImage::from_fn(64, 48, |x, _| image::Rgb([200, 180, (x * 2) as u8]))
        .save_with_format(&tiff, image::ImageFormat::Tiff)
        .unwrap();
    let out = run(crate::narrate_in(&dir, &e.base_url(), &[])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let all = records(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(all.len(), 6, "the five samples and the TIFF");
    let scan = all.iter().find(|r| r["path"] == "images/scan.TIF").unwrap();
    assert!(scan["error"].is_null(), "{scan}");
    // The record's sha256 is the TIFF's; the server got a JPEG.
    let sum = std::process::Command::new("sha256sum")
        .arg(&tiff)
        .output()
        .unwrap();
    let expected = String::from_utf8(sum.stdout).unwrap()[..64].to_owned();
    assert_eq!(scan["sha256"], expected.as_str());
    assert!(
        scan["text"].as_str().unwrap().contains("64x48 JPEG"),
        "{scan}"
    );
}
