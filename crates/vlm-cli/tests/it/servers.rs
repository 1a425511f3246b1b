//! The servers users run: Ollama as ImageWorks configures it, any OpenAI-compatible server, and
//! `--vlm-backend auto` against each.

use vlm_core::VlmBackend;
use vlm_testkit::{Emulator, EmulatorConfig, OpenAiFlavor};

use crate::{narrate_in, records, run, stderr, vlm, workdir};

#[cfg(feature = "ollama")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imageworks_color_narrator_table_narrates_through_ollama() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Ollama).with_model("qwen2.5vl:7b"))
        .await
        .unwrap();
    let dir = workdir();
    // As ImageWorks' own pyproject.toml has it: the URL without /v1.
    std::fs::write(
        dir.join("pyproject.toml"),
        format!(
            "[tool.imageworks.color_narrator]\nvlm_backend = \"ollama\"\nvlm_base_url = \"{}\"\nvlm_model = \"qwen2.5vl:7b\"\nmin_contamination = 0.1\n",
            e.root_url()
        ),
    )
    .unwrap();
    let mut cmd = vlm(&dir);
    cmd.args(["narrate", "images"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("🤖 VLM: ollama/qwen2.5vl:7b"), "{err}");
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(recs.len(), 5);
    for r in &recs {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(
            (r["backend"].as_str(), r["model"].as_str()),
            (Some("ollama"), Some("qwen2.5vl:7b"))
        );
    }
}

#[cfg(all(
    feature = "vllm",
    feature = "lmdeploy",
    feature = "triton",
    feature = "ollama",
    feature = "openai"
))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_names_the_backend_it_found_in_health_and_narrate() {
    let cases = [
        (EmulatorConfig::new(VlmBackend::Vllm), "vllm"),
        (EmulatorConfig::new(VlmBackend::LmDeploy), "lmdeploy"),
        (EmulatorConfig::new(VlmBackend::Triton), "triton"),
        (EmulatorConfig::new(VlmBackend::Ollama), "ollama"),
        (
            EmulatorConfig::new(VlmBackend::OpenAi).with_flavor(OpenAiFlavor::LlamaCpp),
            "openai",
        ),
    ];
    for (config, name) in cases {
        let e = Emulator::start(config).await.unwrap();
        let dir = workdir();
        let mut cmd = vlm(&dir);
        cmd.args([
            "health",
            "--vlm-backend",
            "auto",
            "--vlm-base-url",
            &e.base_url(),
        ]);
        let out = run(cmd).await;
        let text = String::from_utf8(out.stdout.clone()).unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {text}{}", stderr(&out));
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some(format!("backend: {name}").as_str()),
            "{text}"
        );
        let detected = lines.next().unwrap_or_default();
        assert!(
            detected.starts_with(&format!("detected: {name} from GET /")),
            "{text}"
        );
        if name == "openai" {
            // The llama-cpp flavour cannot decode WebP, as llama.cpp cannot.
            std::fs::remove_file(dir.join("images/neutral_street.webp")).unwrap();
        }
        let mut cmd = vlm(&dir);
        cmd.args([
            "narrate",
            "images",
            "--vlm-backend",
            "auto",
            "--vlm-base-url",
            &e.base_url(),
        ]);
        let out = run(cmd).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{name}: {err}");
        assert!(err.contains(&format!("🤖 VLM: {name}/")), "{err}");
        let recs = records(&String::from_utf8(out.stdout).unwrap());
        assert!(recs.iter().all(|r| r["backend"] == name), "{recs:?}");
    }
}

#[cfg(feature = "openai")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generic_backend_narrates_behind_a_prefix_and_waits_out_a_loading_llama_cpp() {
    let e = Emulator::start(
        EmulatorConfig::new(VlmBackend::OpenAi)
            .with_flavor(OpenAiFlavor::Sglang)
            .with_prefix("/llama"),
    )
    .await
    .unwrap();
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "openai",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(records(&String::from_utf8(out.stdout).unwrap()).len(), 5);

    let loading = Emulator::start(
        EmulatorConfig::new(VlmBackend::OpenAi)
            .with_flavor(OpenAiFlavor::LlamaCpp)
            .loading_for(std::time::Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "openai",
        "--vlm-base-url",
        &loading.base_url(),
    ]);
    let out = run(cmd).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "without --wait: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("Loading model"), "{}", stderr(&out));
    // llama.cpp cannot decode WebP: narrate the other four.
    std::fs::remove_file(dir.join("images/neutral_street.webp")).unwrap();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "openai",
        "--vlm-base-url",
        &loading.base_url(),
        "--wait",
        "15",
    ]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Said at the default log level: that it waits, why, and for how long.
    assert!(
        stderr(&out).contains("is starting; waiting up to 15 s for it (--wait)"),
        "{}",
        stderr(&out)
    );

    // No URL for the generic backend: a configuration error naming the settings.
    let mut cmd = vlm(&dir);
    cmd.args(["narrate", "images", "--vlm-backend", "openai"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("vlm_openai_base_url"),
        "{}",
        stderr(&out)
    );
}

#[cfg(all(feature = "ollama", feature = "openai"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_lists_ollama_and_openai_and_auto_says_what_it_found() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Ollama))
        .await
        .unwrap();
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "backends",
        "--check",
        "--vlm-backend",
        "auto",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(
        text.lines()
            .any(|l| l.starts_with("ollama ") && l.contains("http://localhost:11434/v1")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("openai ") && l.contains("(none: configure one)")),
        "{text}"
    );
    assert!(
        text.contains("(vlm_backend = auto: detected: ollama from GET / "),
        "{text}"
    );
}

#[cfg(all(feature = "vllm", not(feature = "ollama")))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detected_backend_that_is_not_compiled_in_is_refused_by_name() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Ollama))
        .await
        .unwrap();
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "health",
        "--vlm-backend",
        "auto",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("backend \"ollama\" is not compiled into this build")
            && err.contains("--features ollama"),
        "{err}"
    );
}

#[cfg(feature = "ollama")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gif_for_ollama_is_an_error_record_naming_the_file_and_nothing_is_sent() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Ollama))
        .await
        .unwrap();
    let dir = workdir();
    // A 1x1 GIF.
    std::fs::write(
        dir.join("images/tiny.gif"),
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;",
    )
    .unwrap();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "ollama",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    let gif = recs
        .iter()
        .find(|r| r["path"] == "images/tiny.gif")
        .unwrap();
    let msg = gif["error"].as_str().unwrap();
    assert!(
        msg.starts_with("image images/tiny.gif: Ollama takes only JPEG, PNG and WebP"),
        "{msg}"
    );
    assert!(gif["sha256"].is_string(), "the bytes were read and hashed");
    assert_eq!(e.chat_requests().len(), 5, "the GIF was never sent");
}

#[cfg(feature = "openai")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webp_for_llama_cpp_is_an_error_record_and_nothing_is_sent_for_it() {
    let e = Emulator::start(
        EmulatorConfig::new(VlmBackend::OpenAi).with_flavor(OpenAiFlavor::LlamaCpp),
    )
    .await
    .unwrap();
    let dir = workdir();
    let cmd = narrate_in(&dir, &e.base_url(), &["--vlm-backend", "openai"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    let (webp, others): (Vec<_>, Vec<_>) = recs
        .iter()
        .partition(|r| r["path"].as_str().is_some_and(|p| p.ends_with(".webp")));
    assert_eq!(webp.len(), 1, "{recs:?}");
    let msg = webp[0]["error"].as_str().unwrap();
    assert!(
        msg.contains("llama.cpp's llama-server cannot decode WebP"),
        "{msg}"
    );
    assert!(msg.contains("convert it to PNG or JPEG"), "{msg}");
    assert!(others.iter().all(|r| r["error"].is_null()), "{others:?}");
    assert_eq!(
        e.chat_requests().len(),
        others.len(),
        "the WebP was never sent"
    );
}

#[cfg(feature = "openai")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_wait_rides_out_a_loading_server() {
    let e = Emulator::start(
        EmulatorConfig::new(VlmBackend::OpenAi)
            .with_flavor(OpenAiFlavor::LlamaCpp)
            .loading_for(std::time::Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "health",
        "--vlm-backend",
        "auto",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("Loading model") && err.contains("--wait"),
        "{err}"
    );
    let mut cmd = vlm(&dir);
    cmd.args([
        "health",
        "--vlm-backend",
        "auto",
        "--vlm-base-url",
        &e.base_url(),
        "--wait",
        "15",
    ]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("backend: openai\ndetected: openai"));
}

#[cfg(all(feature = "vllm", feature = "lmdeploy"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_check_probes_a_given_url_with_the_chosen_backend_only_and_says_so() {
    let e = crate::vllm_emulator().await;
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args(["backends", "--check", "--vlm-base-url", &e.base_url()]);
    let out = run(cmd).await;
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in {text}"))
            .to_owned()
    };
    assert!(
        row("vllm*").contains(&e.base_url()) && row("vllm*").ends_with("ready"),
        "{text}"
    );
    let lmdeploy = row("lmdeploy ");
    assert!(
        !lmdeploy.contains(&e.base_url()) && lmdeploy.ends_with(" -"),
        "{text}"
    );
    assert!(
        text.contains("checked with the chosen backend, vllm, only; the other rows show their own configured URLs, unchecked"),
        "{text}"
    );
    // Only the chosen backend's probes reached the server.
    assert!(
        e.requests().iter().all(|r| !r.path.starts_with("/v1/chat")),
        "no inference"
    );
}
