//! Configuration through the binary: pyproject, flags, environment; `vlm config` / `health` /
//! `backends`.

use vlm_core::VlmBackend;
use vlm_testkit::{Emulator, EmulatorConfig};

use crate::{records, run, stderr, vlm, workdir};

#[cfg(all(feature = "vllm", feature = "lmdeploy"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyproject_per_backend_keys_are_honoured_the_flag_beats_them_and_env_beats_the_file() {
    let vllm =
        Emulator::start(EmulatorConfig::new(VlmBackend::Vllm).with_model("Qwen2-VL-2B-Instruct"))
            .await
            .unwrap();
    let lmdeploy =
        Emulator::start(EmulatorConfig::new(VlmBackend::LmDeploy).with_model("Qwen2.5-VL-7B-AWQ"))
            .await
            .unwrap();
    let dir = workdir();
    std::fs::write(
        dir.join("pyproject.toml"),
        format!(
            r#"[project]
name = "imageworks"

[tool.imageworks.vlm]
vlm_timeout = 90

[tool.imageworks.color_narrator]
vlm_backend = "vllm"
vlm_base_url = "{}"
vlm_model = "Qwen2-VL-2B-Instruct"
vlm_lmdeploy_base_url = "{}"
vlm_lmdeploy_model = "Qwen2.5-VL-7B-AWQ"
vlm_lmdeploy_api_key = "EMPTY"
min_contamination = 0.1
overlay_alpha = 0.6
"#,
            vllm.base_url(),
            lmdeploy.base_url()
        ),
    )
    .unwrap();
    let narrate = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = vlm(&dir);
        cmd.args(["narrate", "images/sepia_portrait.jpg"])
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    };
    for (extra, env, backend, model) in [
        (&[][..], &[][..], "vllm", "Qwen2-VL-2B-Instruct"),
        (
            &["--vlm-backend", "lmdeploy"][..],
            &[][..],
            "lmdeploy",
            "Qwen2.5-VL-7B-AWQ",
        ),
        (
            &[][..],
            &[("VLM_BACKEND", "lmdeploy")][..],
            "lmdeploy",
            "Qwen2.5-VL-7B-AWQ",
        ),
        (
            &["--vlm-backend", "vllm"][..],
            &[("VLM_BACKEND", "lmdeploy")][..],
            "vllm",
            "Qwen2-VL-2B-Instruct",
        ),
    ] {
        let out = run(narrate(extra, env)).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{extra:?} {env:?}: {err}");
        assert!(err.contains(&format!("🤖 VLM: {backend}/{model}")), "{err}");
        let recs = records(&String::from_utf8(out.stdout).unwrap());
        assert_eq!(
            (recs[0]["backend"].as_str(), recs[0]["model"].as_str()),
            (Some(backend), Some(model))
        );
    }
    assert_eq!(vllm.chat_requests().len(), 2);
    assert_eq!(lmdeploy.chat_requests().len(), 2);
    assert_eq!(
        lmdeploy.chat_requests()[0].header("authorization"),
        Some("Bearer EMPTY")
    );

    // `vlm config` shows where each value came from, the key redacted.
    let mut cmd = vlm(&dir);
    cmd.args(["config", "--vlm-backend", "lmdeploy"])
        .env("VLM_TIMEOUT", "15");
    let out = run(cmd).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("vlm_backend = \"lmdeploy\"  # --vlm-backend"),
        "{text}"
    );
    assert!(text.contains(&format!("vlm_base_url = \"{}/\"  # pyproject.toml [tool.imageworks.color_narrator] vlm_lmdeploy_base_url", lmdeploy.base_url())), "{text}");
    assert!(text.contains("vlm_api_key = ***  # pyproject.toml [tool.imageworks.color_narrator] vlm_lmdeploy_api_key"), "{text}");
    assert!(text.contains("vlm_timeout = 15  # VLM_TIMEOUT"), "{text}");
    assert!(!text.contains("EMPTY"), "{text}");

    // `vlm health` and `vlm backends --check`.
    let mut cmd = vlm(&dir);
    cmd.args(["health", "--vlm-backend", "lmdeploy"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("state: ready"));
    let mut cmd = vlm(&dir);
    cmd.args(["backends", "--check"]);
    let out = run(cmd).await;
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("vllm*") && l.contains("yes") && l.ends_with("ready")),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("lmdeploy")
            && l.contains("Qwen2.5-VL-7B-AWQ")
            && l.ends_with("ready")),
        "{table}"
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_of_an_unreachable_server_exits_3() {
    let dir = workdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = vlm(&dir);
    cmd.args(["health", "--vlm-base-url", &format!("127.0.0.1:{port}")]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("state: unreachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_config_file_exits_2() {
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args(["config", "--config", "missing.toml"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("missing.toml (--config) does not exist"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_found_from_a_subfolder_and_config_names_the_file() {
    let dir = workdir();
    std::fs::write(
        dir.join("pyproject.toml"),
        "[project]\nname = \"imageworks\"\n\n[tool.imageworks.color_narrator]\nvlm_model = \"from-the-project\"\n",
    )
    .unwrap();
    // A sub-package's own pyproject without ImageWorks settings is passed over.
    std::fs::create_dir_all(dir.join("pkg/photos/2024")).unwrap();
    std::fs::write(
        dir.join("pkg/pyproject.toml"),
        "[project]\nname = \"pkg\"\n",
    )
    .unwrap();
    let deep = dir.join("pkg/photos/2024");
    let mut cmd = vlm(&deep);
    cmd.arg("config");
    let out = run(cmd).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let file = dir.join("pyproject.toml").canonicalize().unwrap();
    assert!(
        text.contains(&format!("# settings file: {}", file.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "vlm_model = \"from-the-project\"  # {} [tool.imageworks.color_narrator] vlm_model",
            file.display()
        )),
        "{text}"
    );

    // Nothing above: said so, not silently defaults.
    let bare = std::env::temp_dir().join(format!("vlm-bare-{}", std::process::id()));
    std::fs::create_dir_all(&bare).unwrap();
    let mut cmd = vlm(&bare);
    cmd.arg("config");
    let out = run(cmd).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("# settings file: none found"), "{text}");
    std::fs::remove_dir_all(&bare).unwrap();
}
