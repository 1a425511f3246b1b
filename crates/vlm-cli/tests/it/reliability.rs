//! Runs that lose nothing, bad input that never stops a run, keys that never leak.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vlm_core::VlmBackend;
use vlm_testkit::{Emulator, EmulatorConfig};

use crate::{records, run, stderr, vlm, workdir};

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_run_then_resumed_leaves_exactly_one_success_per_image() {
    // Each record is one small write_all, so a SIGKILL almost never tears a line here; the
    // torn-line cut itself is tested in narrate::an_existing_output_needs_resume_which_skips_what_is_done.
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap();
    e.set_delay(Duration::from_millis(150));
    let dir = workdir();
    // 20 images: the 5 samples under 4 names each.
    for entry in std::fs::read_dir(dir.join("images")).unwrap() {
        let path = entry.unwrap().path();
        for i in 1..4 {
            let name = format!("copy{i}_{}", path.file_name().unwrap().to_string_lossy());
            std::fs::copy(&path, dir.join("images").join(name)).unwrap();
        }
    }
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-base-url",
        &e.base_url(),
        "--output",
        "out.jsonl",
        "--concurrency",
        "2",
    ]);
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = dir.join("out.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&out)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 4
    {
        assert!(started.elapsed() < Duration::from_secs(20), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    let before = records(&std::fs::read_to_string(&out).unwrap());
    assert!(
        before.len() >= 4 && before.len() < 20,
        "killed mid-run: {} records",
        before.len()
    );
    println!("SIGKILL after {} of 20 records", before.len());

    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-base-url",
        &e.base_url(),
        "--output",
        "out.jsonl",
        "--resume",
    ]);
    let resumed = run(cmd).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.ends_with('\n'));
    let all = records(&text); // every line parses
    let mut successes: HashMap<String, usize> = HashMap::new();
    for r in &all {
        assert!(r["error"].is_null(), "{r}");
        *successes
            .entry(r["path"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(successes.len(), 20);
    assert!(successes.values().all(|n| *n == 1), "{successes:?}");
    println!(
        "after --resume: {} records, one success per image",
        all.len()
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_becomes_an_error_record_and_the_run_completes() {
    use std::os::unix::ffi::OsStrExt;
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap();
    let dir = workdir();
    let img = dir.join("images");
    std::fs::write(img.join("empty.png"), b"").unwrap();
    std::fs::write(img.join("text.jpg"), "hello, not a jpeg").unwrap();
    std::os::unix::fs::symlink(img.join("nowhere.png"), img.join("dangling.png")).unwrap();
    let bad_name = std::ffi::OsStr::from_bytes(b"caf\xe9.jpg");
    std::fs::copy(img.join("sepia_portrait.jpg"), img.join(bad_name)).unwrap();
    // A FIFO named like an image: refused without waiting for a writer.
    let fifo = std::process::Command::new("mkfifo")
        .arg(img.join("pipe.jpg"))
        .status();
    assert!(fifo.unwrap().success());
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "/dev/null",
        "images/missing.webp",
        "--vlm-base-url",
        &e.base_url(),
    ])
    .env("VLM_MAX_IMAGE_BYTES", "100000");
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    let by_path: HashMap<String, &serde_json::Value> = recs
        .iter()
        .map(|r| (r["path"].as_str().unwrap().to_owned(), r))
        .collect();
    let expect_error = [
        (
            "images/empty.png",
            "image images/empty.png: not a PNG, JPEG, WebP or GIF image: the file is empty",
        ),
        (
            "images/text.jpg",
            "image images/text.jpg: not a PNG, JPEG, WebP or GIF image: found text, not an image",
        ),
        ("/dev/null", "not a regular file"),
        (
            "images/pipe.jpg",
            "image images/pipe.jpg: not a regular file",
        ),
        ("images/dangling.png", "cannot read it"),
        ("images/missing.webp", "cannot read it"),
        (
            "images/cyanotype_harbour.png",
            "over the limit of 100000 bytes (vlm_max_image_bytes)",
        ),
        ("images/caf\u{fffd}.jpg", "not valid UTF-8"),
    ];
    for (path, needle) in expect_error {
        let r = by_path
            .get(path)
            .unwrap_or_else(|| panic!("no record for {path}: {recs:?}"));
        let msg = r["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} should have failed: {r}"));
        assert!(msg.contains(needle), "{path}: {msg}");
        assert!(r["text"].is_null() && r["usage"].is_null());
    }
    // The good images still went through.
    for ok in [
        "images/sepia_portrait.jpg",
        "images/colour_market.png",
        "images/neutral_street.webp",
        "images/green_cast_field.jpg",
    ] {
        assert!(by_path[ok]["error"].is_null(), "{ok}");
    }
    assert_eq!(recs.len(), 12);
}

#[cfg(feature = "lmdeploy")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_never_appears_in_logs_output_or_config_even_at_trace() {
    const KEY: &str = "sk-very-secret-31337";
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::LmDeploy).with_api_key(KEY))
        .await
        .unwrap();
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "lmdeploy",
        "--vlm-base-url",
        &e.base_url(),
        "-o",
        "out.jsonl",
        "-vv",
    ])
    .env("VLM_API_KEY", KEY)
    .env("RUST_LOG", "trace");
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        &err[err.len().saturating_sub(3000)..]
    );
    assert!(
        err.len() > 1000,
        "trace logging was on: {} bytes",
        err.len()
    );
    assert!(!err.contains(KEY) && !String::from_utf8_lossy(&out.stdout).contains(KEY));
    assert!(
        !std::fs::read_to_string(dir.join("out.jsonl"))
            .unwrap()
            .contains(KEY)
    );
    // ...and yet it reached the server.
    assert!(
        e.chat_requests()
            .iter()
            .all(|r| r.header("authorization") == Some(&format!("Bearer {KEY}")[..]))
    );

    let mut cmd = vlm(&dir);
    cmd.args(["config", "--vlm-backend", "lmdeploy", "-vv"])
        .env("VLM_LMDEPLOY_API_KEY", KEY)
        .env("RUST_LOG", "trace");
    let out = run(cmd).await;
    let shown = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        shown.contains("vlm_api_key = ***  # VLM_LMDEPLOY_API_KEY"),
        "{shown}"
    );
    assert!(!shown.contains(KEY));

    // A wrong key: the 401 message names what to set, never the key.
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-backend",
        "lmdeploy",
        "--vlm-base-url",
        &e.base_url(),
    ])
    .env("VLM_API_KEY", "sk-wrong-4242");
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("VLM_API_KEY") && !err.contains("sk-wrong-4242"),
        "{err}"
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_lets_requests_in_flight_finish_prints_the_summary_and_exits_130() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap();
    e.set_delay(Duration::from_millis(600));
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-base-url",
        &e.base_url(),
        "-o",
        "out.jsonl",
        "--concurrency",
        "2",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let started = Instant::now();
    while e.chat_requests().len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "no requests");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: no new requests"), "{err}");
    // The two in flight finished and were written; nothing new was sent.
    let recs = records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap());
    assert_eq!(recs.len(), 2, "{err}");
    assert!(recs.iter().all(|r| r["error"].is_null()));
    assert_eq!(e.chat_requests().len(), 2);
    assert!(
        err.contains("narrated 2 of 5 image(s): 0 failed, 0 skipped (already done), 3 not started"),
        "{err}"
    );

    // A second Ctrl-C aborts what is in flight.
    e.set_delay(Duration::from_secs(30));
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--vlm-base-url",
        &e.base_url(),
        "-o",
        "out.jsonl",
        "--resume",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    while e.chat_requests().len() < 5 {
        assert!(started.elapsed() < Duration::from_secs(20), "no requests");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.id().to_string();
    for _ in 0..2 {
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let aborted = Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        aborted.elapsed() < Duration::from_secs(5),
        "the second Ctrl-C must not wait 30 s"
    );
    assert!(
        stderr(&out).contains("interrupted again"),
        "{}",
        stderr(&out)
    );
}
