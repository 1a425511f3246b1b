//! Failures reported as what they are, nothing lost or leaked: a full disk, two runs on one
//! output, hostile prompt files, endless streams, hostile server text, gateways and firewalls.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use vlm_core::VlmBackend;
use vlm_testkit::{Emulator, EmulatorConfig, Fault};

use crate::{records, run, stderr, vlm, workdir};

async fn vllm() -> Emulator {
    Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap()
}

fn narrate(dir: &Path, e: &Emulator, extra: &[&str]) -> std::process::Command {
    let mut cmd = vlm(dir);
    cmd.args(["narrate", "images", "--vlm-base-url", &e.base_url()])
        .args(extra);
    cmd
}

/// Successes per path in an output file; every line must parse.
fn successes(out: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(out).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "a torn last line");
    let mut ok = HashMap::new();
    for r in records(&text) {
        if r["error"].is_null() {
            *ok.entry(r["path"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    ok
}

/// Twenty images: the five samples under four names each.
fn twenty_images(dir: &Path) {
    for entry in std::fs::read_dir(dir.join("images")).unwrap() {
        let path = entry.unwrap().path();
        for i in 1..4 {
            let name = format!("copy{i}_{}", path.file_name().unwrap().to_string_lossy());
            std::fs::copy(&path, dir.join("images").join(name)).unwrap();
        }
    }
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Option<Mount> {
    std::fs::create_dir_all(at).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(at.to_owned()))
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_run_with_exit_5_whole_lines_and_resume_finishes_it() {
    let dir = workdir();
    twenty_images(&dir);
    let disk = dir.join("disk");
    let Some(mount) = mount_tmpfs(&disk, "8k") else {
        println!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        return;
    };
    let e = vllm().await;
    let out_path = disk.join("out.jsonl");
    let out_arg = out_path.to_str().unwrap();
    let cmd = narrate(&dir, &e, &["-o", out_arg, "--concurrency", "1"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let written = successes(&out_path).values().sum::<usize>();
    assert!(
        written > 0 && written < 20,
        "{written} records on an 8 KiB disk"
    );
    // The summary counts what was written, never an answer that was lost.
    assert!(
        err.contains(&format!("narrated {written} of 20 image(s)"))
            && err.contains(&format!("{written} record(s) written"))
            && err.contains("not written (output error)")
            && err.contains("--resume"),
        "{err}"
    );

    // Space is freed: --resume finishes the job, one success per image.
    assert!(
        std::process::Command::new("mount")
            .args(["-o", "remount,size=1m"])
            .arg(&disk)
            .status()
            .unwrap()
            .success()
    );
    let cmd = narrate(&dir, &e, &["-o", out_arg, "--resume"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ok = successes(&out_path);
    assert_eq!(ok.len(), 20);
    assert!(ok.values().all(|n| *n == 1), "{ok:?}");
    drop(mount);
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_full_is_exit_5_and_the_summary_says_nothing_was_written() {
    let e = vllm().await;
    let dir = workdir();
    let out = run(narrate(&dir, &e, &["-o", "/dev/full"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("narrated 0 of 5 image(s)") && err.contains("0 record(s) written"),
        "{err}"
    );
    assert!(!err.contains("narrated 4 of 5"), "{err}");
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_output_is_refused_whatever_its_flags() {
    let e = vllm().await;
    e.set_delay(Duration::from_millis(400));
    let dir = workdir();
    let mut first = narrate(&dir, &e, &["-o", "out.jsonl", "--concurrency", "1"]);
    let child = first
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while e.chat_requests().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(20), "no requests");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for flags in [&[][..], &["--resume"], &["--overwrite"]] {
        let mut args = vec!["-o", "out.jsonl"];
        args.extend_from_slice(flags);
        let out = run(narrate(&dir, &e, &args)).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(
            err.contains("output out.jsonl is being written by another vlm run"),
            "{flags:?}: {err}"
        );
    }
    let status = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(status.status.code(), Some(0));
    // The first run's records are all there: nothing truncated, nothing doubled.
    let ok = successes(&dir.join("out.jsonl"));
    assert_eq!((ok.len(), ok.values().sum::<usize>()), (5, 5));
    assert_eq!(e.chat_requests().len(), 5);
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_files_must_be_small_regular_files() {
    let e = vllm().await;
    let dir = workdir();
    std::fs::write(dir.join("big.txt"), vec![b'a'; 2 * 1024 * 1024]).unwrap();
    let fifo = dir.join("prompt.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for (file, needle) in [
        ("/dev/zero", "not a regular file"),
        (fifo.to_str().unwrap(), "not a regular file"),
        (
            "big.txt",
            "2097152 bytes is over the 1048576-byte (1 MiB) limit",
        ),
    ] {
        let started = Instant::now();
        let out = run(narrate(&dir, &e, &["--prompt-file", file])).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(needle), "{file}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{file} blocked"
        );
    }
    assert!(e.chat_requests().is_empty());

    // `-`: standard input, the same limit.
    for (input, code) in [
        (b"List the subjects.".to_vec(), Some(0)),
        (vec![b'a'; 2 * 1024 * 1024], Some(2)),
    ] {
        let mut cmd = narrate(&dir, &e, &["--prompt-file", "-"]);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let _ = std::io::Write::write_all(&mut stdin, &input);
            drop(stdin);
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(out.status.code(), code, "{}", stderr(&out));
    }
    let asked = e.chat_requests();
    assert!(!asked.is_empty());
    let prompt = &asked[0].json.as_ref().unwrap()["messages"][0]["content"][0]["text"];
    assert_eq!(prompt, "List the subjects.");
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_ends_is_cut_at_vlm_timeout_into_an_error_record() {
    let e = vllm().await;
    e.push_fault(Fault::Trickle(Duration::from_millis(200)));
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images/sepia_portrait.jpg",
        "--stream",
        "--vlm-timeout",
        "1.5",
        "-o",
        "out.jsonl",
        "--vlm-base-url",
        &e.base_url(),
    ]);
    let started = Instant::now();
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let recs = records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap());
    assert_eq!(recs.len(), 1);
    let msg = recs[0]["error"].as_str().unwrap();
    assert!(
        msg.contains("within 1.5 s") && msg.contains("--vlm-timeout"),
        "{msg}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("slow slow"));
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_honours_resume_and_opens_the_output_before_inference() {
    let e = vllm().await;
    let dir = workdir();
    let stream = |output: &str, resume: bool| {
        let mut cmd = vlm(&dir);
        cmd.args([
            "narrate",
            "images/sepia_portrait.jpg",
            "--stream",
            "-o",
            output,
            "--vlm-base-url",
            &e.base_url(),
        ]);
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    let out = run(stream("out.jsonl", false)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(stream("out.jsonl", true)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already narrated"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        e.chat_requests().len(),
        1,
        "--resume skips a finished image"
    );
    assert_eq!(successes(&dir.join("out.jsonl")).values().sum::<usize>(), 1);

    // An output that cannot be opened stops the run before anything is sent.
    let out = run(stream("no-such-folder/out.jsonl", false)).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(e.chat_requests().len(), 1);

    // Two images for --stream: refused before --overwrite could empty the output.
    let before = std::fs::read(dir.join("out.jsonl")).unwrap();
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "--stream",
        "--overwrite",
        "-o",
        "out.jsonl",
    ])
    .args(["--vlm-base-url", &e.base_url()]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("exactly one image; 5 were given"));
    assert_eq!(std::fs::read(dir.join("out.jsonl")).unwrap(), before);
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_model_name_is_cut_in_records_and_log_lines() {
    let huge = "m".repeat(2 * 1024 * 1024);
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm).with_model(huge.clone()))
        .await
        .unwrap();
    let dir = workdir();
    let out = run(narrate(&dir, &e, &["-o", "out.jsonl"])).await;
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        &err[..err.len().min(2000)]
    );
    assert!(err.len() < 20_000, "stderr is {} bytes", err.len());
    assert!(
        err.contains("…[cut: 2097152 bytes]"),
        "{}",
        &err[..err.len().min(2000)]
    );
    let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    assert!(text.len() < 20_000, "the output is {} bytes", text.len());
    for r in records(&text) {
        assert!(r["error"].is_null(), "{r}");
        assert!(
            r["model"]
                .as_str()
                .unwrap()
                .ends_with("…[cut: 2097152 bytes]")
        );
    }
    // The server still got the full name: that is the model it serves.
    assert!(
        e.chat_requests()
            .iter()
            .all(|r| r.json.as_ref().unwrap()["model"] == huge.as_str())
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_echoed_by_a_server_and_forged_log_lines_never_reach_stderr_or_records() {
    const KEY: &str = "sk-echo-me-424242";
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm).with_api_key(KEY))
        .await
        .unwrap();
    e.fail_next(4, Fault::EchoAuthorization);
    e.push_fault(Fault::Status {
        status: 400,
        content_type: "application/json".into(),
        body: r#"{"error":{"message":"boom\r\nERROR forged: all images failed","type":"BadRequestError"}}"#.into(),
        headers: vec![],
    });
    let dir = workdir();
    let mut cmd = narrate(&dir, &e, &["-o", "out.jsonl", "--concurrency", "1"]);
    cmd.env("VLM_API_KEY", KEY);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    assert!(!err.contains(KEY) && !text.contains(KEY), "{err}");
    assert!(err.contains("Bearer ***"), "{err}");
    assert!(
        !err.lines().any(|l| l.starts_with("ERROR forged")),
        "a server forged a log line: {err}"
    );
    assert!(err.contains(r"boom\r\nERROR forged"), "{err}");
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_answer_is_an_error_record_that_resume_redoes_and_bad_usage_is_null() {
    let e = vllm().await;
    let completion = |content: &str, usage: &str| Fault::Status {
        status: 200,
        content_type: "application/json".into(),
        body: format!(
            r#"{{"id":"x","object":"chat.completion","model":"Qwen/Qwen2-VL-2B-Instruct","choices":[{{"index":0,"message":{{"role":"assistant","content":{content}}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        ),
        headers: vec![],
    };
    e.push_fault(completion("null", "null"));
    e.push_fault(completion(r#""Neutral.""#, r#"{"prompt_tokens":1e400}"#));
    let dir = workdir();
    let out = run(narrate(
        &dir,
        &e,
        &["-o", "out.jsonl", "--concurrency", "1"],
    ))
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("usage is not token counts"), "{err}");
    let recs = records(&std::fs::read_to_string(dir.join("out.jsonl")).unwrap());
    let empty: Vec<_> = recs.iter().filter(|r| !r["error"].is_null()).collect();
    assert_eq!(empty.len(), 1, "{recs:?}");
    assert!(empty[0]["error"].as_str().unwrap().contains("empty answer"));
    assert!(empty[0]["text"].is_null());
    let kept = recs.iter().filter(|r| r["text"] == "Neutral.").count();
    assert_eq!(kept, 1, "the answer with bad usage is kept");
    assert!(
        recs.iter()
            .any(|r| r["text"] == "Neutral." && r["usage"].is_null())
    );

    let out = run(narrate(&dir, &e, &["-o", "out.jsonl", "--resume"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("narrated 1 of 5"), "{}", stderr(&out));
    assert_eq!(successes(&dir.join("out.jsonl")).len(), 5);
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_image_named_several_ways_is_narrated_once() {
    let e = vllm().await;
    let dir = workdir();
    let absolute = dir.join("images/sepia_portrait.jpg");
    let mut cmd = vlm(&dir);
    cmd.args([
        "narrate",
        "images",
        "images/",
        "./images/sepia_portrait.jpg",
    ])
    .arg(&absolute)
    .args(["--vlm-base-url", &e.base_url()]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(recs.len(), 5, "{recs:?}");
    assert_eq!(e.chat_requests().len(), 5);
    assert!(
        recs.iter()
            .any(|r| r["path"] == "images/sepia_portrait.jpg"),
        "the first spelling is recorded"
    );
    assert!(
        err.contains("7 path(s) name a file already listed"),
        "{err}"
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_reads_a_large_output_line_by_line() {
    let e = vllm().await;
    e.set_delay(Duration::from_millis(300));
    let dir = workdir();
    // 64 MiB of earlier records for other images.
    let mut big = String::with_capacity(65 << 20);
    let text = "t".repeat(2000);
    let mut i = 0;
    while big.len() < 64 << 20 {
        big += &format!(
            "{{\"path\":\"old/{i}.jpg\",\"sha256\":\"{:064x}\",\"backend\":\"vllm\",\"model\":\"Qwen/Qwen2-VL-2B-Instruct\",\"text\":\"{text}\",\"finish_reason\":\"stop\",\"usage\":null,\"latency_ms\":1,\"error\":null}}\n",
            i
        );
        i += 1;
    }
    std::fs::write(dir.join("out.jsonl"), &big).unwrap();
    drop(big);
    let mut cmd = narrate(
        &dir,
        &e,
        &["-o", "out.jsonl", "--resume", "--concurrency", "1"],
    );
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    while !waited.is_finished() {
        if let Ok(s) = std::fs::read_to_string(&status)
            && let Some(line) = s.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            peak_kib = peak_kib.max(kib);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = waited.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    println!(
        "resuming a 64 MiB output ({i} records): peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(peak_kib > 0, "the peak was never read");
    assert!(
        peak_kib < 48 * 1024,
        "peak RSS {} MiB: the previous output was read whole",
        peak_kib / 1024
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_behind_a_gateway_prefix_passes_health_and_narrates() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm).with_prefix("/llama"))
        .await
        .unwrap();
    let dir = workdir();
    let out = run(narrate(&dir, &e, &["--vlm-backend", "vllm"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(records(&String::from_utf8(out.stdout).unwrap()).len(), 5);
    assert!(
        e.requests()
            .iter()
            .any(|r| r.path == "/health" && r.method == "GET")
    );
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_against_a_firewalled_host_names_the_connect_timeout() {
    let hole = vlm_testkit::Blackhole::start().await.unwrap();
    let dir = workdir();
    let mut cmd = vlm(&dir);
    cmd.args([
        "health",
        "--vlm-base-url",
        &format!("http://{}/v1", hole.addr()),
        "--vlm-connect-timeout",
        "0.5",
    ]);
    let out = run(cmd).await;
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(3), "{all}");
    assert!(
        all.contains("unreachable") && all.contains("no connection within 0.5 s"),
        "{all}"
    );
    assert!(
        all.contains("--vlm-connect-timeout") && !all.contains("raise `--vlm-timeout`"),
        "{all}"
    );
}
