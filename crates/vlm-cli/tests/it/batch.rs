//! `vlm run`: request files in the OpenAI Batch format, against every backend that infers.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vlm_core::VlmBackend;
use vlm_testkit::{Emulator, EmulatorConfig, TritonModel};

use crate::{records, run, sha256_prefix, stderr, vlm, workdir};

/// A request file in `dir`: one-image, two-image and JSON-schema requests and a bad line. The
/// prompt carries `placeholder` once per image (Triton's vLLM backend applies no template).
fn request_file(dir: &Path, placeholder: &str) -> std::path::PathBuf {
    let p = |n: usize| placeholder.repeat(n);
    let lines = [
        format!(
            r#"{{"custom_id":"one","method":"POST","url":"/v1/chat/completions","body":{{"max_tokens":200,"messages":[{{"role":"system","content":"Be brief."}},{{"role":"user","content":[{{"type":"text","text":"{}Describe."}},{{"type":"image_url","image_url":{{"url":"images/sepia_portrait.jpg"}}}}]}}]}}}}"#,
            p(1)
        ),
        format!(
            r#"{{"custom_id":"two","method":"POST","url":"/v1/chat/completions","body":{{"max_tokens":200,"messages":[{{"role":"user","content":[{{"type":"text","text":"{}Compare."}},{{"type":"image_url","image_url":{{"url":"images/colour_market.png"}}}},{{"type":"image_url","image_url":{{"url":"images/green_cast_field.jpg"}}}}]}}]}}}}"#,
            p(2)
        ),
        format!(
            r#"{{"custom_id":"json","method":"POST","url":"/v1/chat/completions","body":{{"max_tokens":200,"response_format":{{"type":"json_schema","json_schema":{{"name":"cast","schema":{{"type":"object","properties":{{"caption":{{"type":"string"}}}},"required":["caption"]}}}}}},"messages":[{{"role":"user","content":[{{"type":"text","text":"{}Caption."}},{{"type":"image_url","image_url":{{"url":"images/neutral_street.webp"}}}}]}}]}}}}"#,
            p(1)
        ),
        "this line is not JSON".to_owned(),
    ];
    let path = dir.join("requests.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn by_id(text: &str) -> HashMap<String, Value> {
    records(text)
        .into_iter()
        .map(|r| {
            for key in ["id", "custom_id", "response", "error"] {
                assert!(r.get(key).is_some(), "every line has {key}: {r}");
            }
            (r["custom_id"].as_str().unwrap_or("(null)").to_owned(), r)
        })
        .collect()
}

fn answer(line: &Value) -> &str {
    line["response"]["body"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{line}"))
}

#[cfg(all(
    feature = "vllm",
    feature = "lmdeploy",
    feature = "triton",
    feature = "ollama",
    feature = "openai"
))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_file_runs_against_every_backend_that_infers() {
    let configs = [
        (EmulatorConfig::new(VlmBackend::Vllm), ""),
        (EmulatorConfig::new(VlmBackend::LmDeploy), ""),
        (EmulatorConfig::new(VlmBackend::Ollama), ""),
        (EmulatorConfig::new(VlmBackend::OpenAi), ""),
        (
            EmulatorConfig::new(VlmBackend::Triton).with_triton_model(TritonModel::VllmBackend),
            "<|image|>",
        ),
    ];
    for (config, placeholder) in configs {
        let e = Emulator::start(config).await.unwrap();
        let backend = e.backend();
        let dir = workdir();
        // Relative image paths are read from the request file's folder, not the working one.
        let requests = request_file(&dir, placeholder);
        let mut cmd = vlm(Path::new("/"));
        cmd.arg("run")
            .arg(&requests)
            .args([
                "--vlm-backend",
                backend.as_str(),
                "--vlm-base-url",
                &e.base_url(),
            ])
            .args(["--vlm-model", e.model()]);
        let out = run(cmd).await;
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{backend}: the bad line fails: {err}"
        );
        let lines = by_id(&String::from_utf8(out.stdout).unwrap());
        assert_eq!(lines.len(), 4, "{backend}: {lines:?}");
        let sha = |name: &str| sha256_prefix(&dir.join("images").join(name));
        let one = answer(&lines["one"]);
        assert!(
            one.ends_with(&sha("sepia_portrait.jpg")),
            "{backend}: {one}"
        );
        let two = answer(&lines["two"]);
        assert!(
            two.contains(&sha("colour_market.png")) && two.contains(&sha("green_cast_field.jpg")),
            "{backend}: the answer names both of its images: {two}"
        );
        assert_eq!(lines["one"]["response"]["status_code"], 200);
        // Triton's vLLM backend gets the schema in its sampling parameters.
        let json: Value = serde_json::from_str(answer(&lines["json"])).unwrap();
        assert!(
            json["caption"]
                .as_str()
                .unwrap()
                .ends_with(&sha("neutral_street.webp")),
            "{backend}: {json}"
        );
        let bad = &lines["(null)"];
        assert_eq!(bad["error"]["code"], "invalid_line");
        assert!(
            bad["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("line 4:")
        );
        assert!(bad["response"].is_null());
    }
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_with_one_success_per_custom_id_and_duplicates_are_refused() {
    let e = Emulator::start(EmulatorConfig::new(VlmBackend::Vllm))
        .await
        .unwrap();
    e.set_delay(Duration::from_millis(250));
    let dir = workdir();
    let lines: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"custom_id":"r{i}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":[{{"type":"text","text":"Describe."}},{{"type":"image_url","image_url":{{"url":"images/sepia_portrait.jpg"}}}}]}}]}}}}"#
            )
        })
        .collect();
    std::fs::write(dir.join("requests.jsonl"), lines.join("\n") + "\n").unwrap();
    let out_path = dir.join("out.jsonl");
    let mut cmd = vlm(&dir);
    cmd.args([
        "run",
        "requests.jsonl",
        "-o",
        "out.jsonl",
        "--concurrency",
        "2",
    ])
    .args(["--vlm-base-url", &e.base_url()])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(&out_path).map_or(0, |s| s.lines().count()) < 3 {
        assert!(started.elapsed() < Duration::from_secs(20), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut cmd = vlm(&dir);
    cmd.args(["run", "requests.jsonl", "-o", "out.jsonl", "--resume"])
        .args(["--vlm-base-url", &e.base_url()]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut ok: HashMap<String, usize> = HashMap::new();
    for r in records(&std::fs::read_to_string(&out_path).unwrap()) {
        if r["error"].is_null() && r["response"]["status_code"] == 200 {
            *ok.entry(r["custom_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(ok.len(), 12);
    assert!(ok.values().all(|n| *n == 1), "{ok:?}");

    // The same custom_id twice: refused before anything is sent.
    std::fs::write(
        dir.join("dup.jsonl"),
        format!("{}\n{}\n", lines[0], lines[0]),
    )
    .unwrap();
    e.clear_requests();
    let mut cmd = vlm(&dir);
    cmd.args(["run", "dup.jsonl", "--vlm-base-url", &e.base_url()]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("custom_id \"r0\" is on lines 1 and 2"),
        "{}",
        stderr(&out)
    );
    assert!(e.chat_requests().is_empty());
}

#[cfg(feature = "vllm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_shards_split_a_request_file_exactly_once_between_them() {
    let e = crate::vllm_emulator().await;
    let dir = workdir();
    // Twenty one-image requests and a line with no custom_id (sharded by its line number).
    let mut lines: Vec<String> = (0..20)
        .map(|n| {
            format!(
                r#"{{"custom_id":"r{n}","method":"POST","url":"/v1/chat/completions","body":{{"max_tokens":50,"messages":[{{"role":"user","content":[{{"type":"text","text":"Describe."}},{{"type":"image_url","image_url":{{"url":"images/sepia_portrait.jpg"}}}}]}}]}}}}"#
            )
        })
        .collect();
    lines.push(r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#.to_owned());
    std::fs::write(dir.join("requests.jsonl"), lines.join("\n") + "\n").unwrap();
    let shard = |spec: &str, env: &[(&str, &str)]| {
        let mut cmd = vlm(&dir);
        cmd.args([
            "run",
            "requests.jsonl",
            "--vlm-base-url",
            &e.base_url(),
            "--shard",
            spec,
        ]);
        cmd.envs(env.iter().copied());
        cmd
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut counts = Vec::new();
    for i in 0..3 {
        let out = run(shard(&format!("{i}/3"), &[])).await;
        let err = stderr(&out);
        let ids = by_id(&String::from_utf8(out.stdout).unwrap());
        assert!(
            err.contains(&format!("shard {i}/3: {} of 21 request(s)", ids.len())),
            "{err}"
        );
        counts.push(ids.len());
        for id in ids.into_keys() {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(
        seen.len(),
        21,
        "every request in exactly one shard: {seen:?}"
    );
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert!(counts.iter().all(|n| *n > 0), "{counts:?}");
    // Slurm's variables give the same shard as I/N, on every run.
    let first = by_id(&String::from_utf8(run(shard("1/3", &[])).await.stdout).unwrap());
    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "5"),
        ("SLURM_ARRAY_TASK_MIN", "4"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ];
    let auto = by_id(&String::from_utf8(run(shard("auto", &slurm)).await.stdout).unwrap());
    let keys = |m: &HashMap<String, Value>| {
        let mut k: Vec<String> = m.keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&first), keys(&auto));
}
