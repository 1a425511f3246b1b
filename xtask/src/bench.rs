//! `cargo xtask bench [--quick]`: payload-building throughput (criterion), end-to-end load of
//! the project's client against raw reqwest, and the narrator's peak memory, all against a
//! fixed-answer server run as a separate process; results go to docs/performance.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image::{ImageFormat, Rgb, RgbImage};
use serde_json::Value;

use crate::{cargo, workspace_root};

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &Path) -> Result<Server, String> {
    let mut child = Command::new(bin.join("vlm-emulator"))
        .args(["--backend", "vllm", "--fast", "--model", "fast"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start vlm-emulator: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(Server {
        child,
        url: line.trim().to_owned(),
    })
}

/// A noisy photograph-like JPEG of about `target` bytes.
fn make_jpeg(path: &Path, target: usize) -> Result<usize, String> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut best = Vec::new();
    for side in (200u32..=1200).step_by(20) {
        let img = RgbImage::from_fn(side, side * 3 / 4, |x, y| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Fine grain, as in a scanned print: JPEG cannot squeeze it away.
            let n = (state & 0x7F) as u8;
            Rgb([
                ((x + y) % 128) as u8 + n,
                (y % 128) as u8 + n,
                (x % 128) as u8 + n / 2,
            ])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
            .encode_image(&img)
            .map_err(|e| e.to_string())?;
        let done = out.len() >= target;
        best = out;
        if done {
            break;
        }
    }
    std::fs::write(path, &best).map_err(|e| e.to_string())?;
    Ok(best.len())
}

fn make_small_images(dir: &Path, count: usize) -> Result<(), String> {
    if dir.join(format!("{:05}.png", count - 1)).is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for i in 0..count {
        let img = RgbImage::from_fn(32, 24, |x, y| {
            Rgb([
                (i % 251) as u8,
                (x * 8) as u8,
                (y * 10 + (i / 251) as u32) as u8,
            ])
        });
        img.save_with_format(dir.join(format!("{i:05}.png")), ImageFormat::Png)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn run_json(cmd: &mut Command) -> Result<Value, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak RSS (VmHWM) of a child process, polled until it exits.
fn peak_rss_kib(mut child: Child) -> Result<(u64, bool), String> {
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok((peak, status.success()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024 / 1024);
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores ({model}), {mem} GiB RAM, {rustc}, Linux")
}

fn criterion_gbps(root: &Path, function: &str, size: &str, bytes: f64) -> Option<f64> {
    let path = root.join(format!(
        "target/criterion/payload/{function}/{size}/new/estimates.json"
    ));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let ns = v["mean"]["point_estimate"].as_f64()?;
    Some(bytes / ns) // bytes per ns = GB/s
}

pub fn run(quick: bool) -> Result<(), String> {
    let root = workspace_root();
    let started = Instant::now();
    cargo(
        &[
            "build",
            "--release",
            "-p",
            "vlm-testkit",
            "--bin",
            "vlm-emulator",
            "-p",
            "vlm-cli",
            "--bin",
            "vlm",
            "-p",
            "vlm-bench",
            "--bin",
            "vlm-loadgen",
        ],
        &[],
    )?;
    let bin = root.join("target/release");
    let work: PathBuf = root.join("target/bench");
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let jpeg = work.join("photo.jpg");
    let jpeg_len = make_jpeg(&jpeg, 256 * 1024)?;
    let server = start_server(&bin)?;
    eprintln!("fixed-answer server: {}", server.url);

    // End-to-end load: rounds alternate the two clients so drift hits both alike; the ratio is
    // taken per round and its median reported.
    let rounds = if quick { 1 } else { 5 };
    let mut load_rows = Vec::new();
    for driver in ["task", "spawn"] {
        for (concurrency, requests) in [
            (1usize, if quick { 300 } else { 3000 }),
            (32, if quick { 1000 } else { 20000 }),
        ] {
            load_rows.push(load_row(
                &bin,
                &server.url,
                &jpeg,
                driver,
                concurrency,
                requests,
                rounds,
            )?);
        }
    }

    // Extra peak memory of building one 20 MB image's body.
    let memory = run_json(Command::new(bin.join("vlm-loadgen")).args([
        "payload-memory",
        "--size",
        &(20 * 1024 * 1024).to_string(),
    ]))?;

    // Narrator peak RSS at two library sizes.
    let mut rss_rows = Vec::new();
    for count in [2000usize, 10000] {
        let dir = work.join(format!("images-{count}"));
        make_small_images(&dir, count)?;
        let out = work.join(format!("narrate-{count}.jsonl"));
        // A megabyte is within run-to-run noise at this size: the median of three runs.
        let mut samples = Vec::new();
        for _ in 0..3 {
            let child = Command::new(bin.join("vlm"))
                .args([
                    "narrate",
                    &dir.to_string_lossy(),
                    "--concurrency",
                    "8",
                    "-q",
                    "--overwrite",
                    "-o",
                    &out.to_string_lossy(),
                    "--vlm-base-url",
                    &server.url,
                    "--vlm-model",
                    "fast",
                ])
                .env_remove("RUST_LOG")
                .spawn()
                .map_err(|e| e.to_string())?;
            let t = Instant::now();
            let (kib, ok) = peak_rss_kib(child)?;
            let lines = std::fs::read_to_string(&out)
                .map(|s| s.lines().count())
                .unwrap_or(0);
            if !ok || lines != count {
                return Err(format!("narrating {count} images failed ({lines} records)"));
            }
            eprintln!(
                "narrate {count}: peak RSS {kib} KiB in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            samples.push((kib as f64, t.elapsed().as_secs_f64()));
        }
        let kib = median(samples.iter().map(|s| s.0).collect()) as u64;
        let secs = median(samples.iter().map(|s| s.1).collect());
        rss_rows.push((count, kib, secs));
    }
    let pipeline = narrator_pipeline(&bin, &server.url, &jpeg, &work, rounds)?;
    drop(server);

    let capacity = capacity_sweep(&bin, &work, quick)?;

    // Payload building, criterion.
    let mut args = vec!["bench", "-p", "vlm-core", "--bench", "payload", "--"];
    if quick {
        args.push("--quick");
    }
    cargo(&args, &[])?;
    // Resizing, criterion (the `resize` feature).
    let mut args = vec![
        "bench",
        "-p",
        "vlm-core",
        "--features",
        "resize",
        "--bench",
        "resize",
        "--",
    ];
    if quick {
        args.push("--quick");
    }
    cargo(&args, &[])?;
    let sizes = [
        ("1KB", 1024.0),
        ("256KB", 256.0 * 1024.0),
        ("20MB", 20.0 * 1024.0 * 1024.0),
    ];

    let mut md = String::new();
    md.push_str("# Performance\n\n");
    md.push_str("Measured by `cargo xtask bench`");
    md.push_str(if quick {
        " --quick (one round, fewer requests)"
    } else {
        " (medians of five rounds)"
    });
    md.push_str(&format!(
        " on {}. Re-run it to refresh this page; ratios compare numbers from the same run.\n\n",
        machine()
    ));
    md.push_str("## W1: end-to-end requests against a fixed-answer server\n\n");
    md.push_str(&format!(
        "The server is `vlm-emulator --fast` in its own process (it reads each body and answers one fixed completion). \
         The client is `vlm-loadgen`, also its own process with a 2-thread runtime: **client** = `VllmClient::infer_single` \
         with a {} KB JPEG (the body is built from the image for every request: base64, JSON, the answer parsed), \
         **raw** = reqwest posting one pre-built body of the same request (the floor). Client CPU is user+system time of \
         the load-generator process divided by requests.\n\n",
        jpeg_len / 1024
    ));
    md.push_str("| driver | concurrency | requests | raw req/s | client req/s | client / raw (median of per-round ratios) | raw p50 / p99 ms | client p50 / p99 ms | raw CPU ms/req | client CPU ms/req |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for row in &load_rows {
        let (raw, client) = (&row.raw, &row.client);
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | **{:.2}×** | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} | {:.3} |\n",
            row.driver, row.concurrency, row.requests, raw.0, client.0, row.ratio, raw.1, raw.2, client.1, client.2, raw.3, client.3
        ));
    }
    md.push_str("\n`task`: one task polls every request with `buffer_unordered(C)`, as async-openai's and openai-python's benchmarks drive their clients. `spawn`: C spawned workers on the 2-thread runtime.\n");
    md.push_str("\n## W2: building the request body\n\n");
    md.push_str("Criterion, `cargo bench -p vlm-core --bench payload`: `build_chat_body` (prompt escaped once, the image's base64 written by base64's SIMD engine straight into one pre-sized buffer) beside a plain copy of the image's bytes. Throughput is image bytes per second.\n\n");
    md.push_str("| image | build_chat_body GB/s | memcpy GB/s |\n|---|---|---|\n");
    for (size, bytes) in sizes {
        let b = criterion_gbps(&root, "build_chat_body", size, bytes)
            .map_or("-".into(), |g| format!("{g:.2}"));
        let m =
            criterion_gbps(&root, "memcpy", size, bytes).map_or("-".into(), |g| format!("{g:.2}"));
        md.push_str(&format!("| {size} | {b} | {m} |\n"));
    }
    md.push_str(&format!(
        "\nExtra peak heap while building the body of a 20 MB image (counting allocator, `vlm-loadgen payload-memory`): \
         {} bytes for a {}-byte body = **{:.3}×** the encoded size.\n\n",
        memory["extra_peak_bytes"], memory["body_bytes"], memory["extra_over_body"].as_f64().unwrap_or(0.0)
    ));
    md.push_str("## W3: the narrator's memory\n\n");
    md.push_str("Peak RSS (VmHWM, polled; the median of three runs) of `vlm narrate DIR --concurrency 8 -o out.jsonl` (release build) over generated 32×24 PNGs, against the fixed-answer server.\n\n| images | peak RSS MiB | seconds |\n|---|---|---|\n");
    for (count, kib, secs) in &rss_rows {
        md.push_str(&format!(
            "| {count} | {:.1} | {secs:.1} |\n",
            *kib as f64 / 1024.0
        ));
    }
    if let [(_, small, _), (_, large, _)] = rss_rows.as_slice() {
        md.push_str(&format!(
            "\n10,000 images use **{:.2}×** the peak RSS of 2,000.\n",
            *large as f64 / *small as f64
        ));
        md.push_str(
            "\nWhat grows with the library: the run's list of paths, packed into one buffer (the \
             path's bytes plus one offset, about 44 bytes an image here), and glibc's per-thread \
             malloc arenas warming up over a longer run (a 4-thread blocking pool keeps them \
             few; mimalloc was tried and measured 20 MiB at 2,000 images rising to 34 MiB).\n",
        );
    }
    md.push_str("\n## W4: resizing (`--max-image-edge`)\n\n");
    let resize_ms = std::fs::read_to_string(
        root.join("target/criterion/resize/12MP_jpeg_to_1024/new/estimates.json"),
    )
    .ok()
    .and_then(|s| serde_json::from_str::<Value>(&s).ok())
    .and_then(|v| v["mean"]["point_estimate"].as_f64())
    .map(|ns| ns / 1e6);
    match resize_ms {
        Some(ms) => md.push_str(&format!(
            "Criterion, `cargo bench -p vlm-core --features resize --bench resize`: a 12-megapixel \
             JPEG (4000×3000) decoded, shrunk to a 1024 px longer edge and re-encoded as JPEG by \
             `vlm_core::shrink_image`: **{ms:.0} ms** per image, **{:.1} images/s** per core. The \
             narrator and the clients run it on the blocking pool.\n",
            1000.0 / ms
        )),
        None => md.push_str("(The resize benchmark left no estimate.)\n"),
    }
    pipeline_section(&mut md, &pipeline, jpeg_len);
    capacity_section(&mut md, &capacity);
    md.push_str(&format!(
        "\n(The whole benchmark took {:.0} s.)\n",
        started.elapsed().as_secs_f64()
    ));
    std::fs::write(root.join("docs/performance.md"), md).map_err(|e| e.to_string())?;
    eprintln!("wrote docs/performance.md");
    Ok(())
}

/// W6: `vlm narrate` over 2,000 copies of the JPEG at c=32 against the library loop
/// (`vlm-loadgen`, one task, `buffer_unordered(32)`) on the same server, the loop sending the
/// image from memory and, like for like, reading each copy and taking its SHA-256 as the
/// narrator must: images/s per round.
struct Pipeline {
    /// Library loop modes, in [`LOOP_MODES`] order, then `vlm narrate`: median images/s.
    per_s: Vec<f64>,
    /// Each against the in-memory loop: the median of the per-round ratios.
    ratios: Vec<f64>,
    /// `vlm narrate` against the loop that reads and hashes each file.
    like_for_like: f64,
    /// The loop's client CPU ms per image, in [`LOOP_MODES`] order (medians).
    cpu_ms: Vec<f64>,
}

/// The library loop's modes in W6: from memory, reading each file, reading and hashing it.
const LOOP_MODES: [&str; 3] = ["client", "client-read", "client-read-sha256"];

fn narrator_pipeline(
    bin: &Path,
    url: &str,
    jpeg: &Path,
    work: &Path,
    rounds: usize,
) -> Result<Pipeline, String> {
    const COPIES: usize = 2000;
    let dir = work.join("copies");
    if !dir.join(format!("{:04}.jpg", COPIES - 1)).is_file() {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for i in 0..COPIES {
            std::fs::copy(jpeg, dir.join(format!("{i:04}.jpg"))).map_err(|e| e.to_string())?;
        }
    }
    // Every round reads the copies from the page cache, the first one included.
    for i in 0..COPIES {
        std::fs::read(dir.join(format!("{i:04}.jpg"))).map_err(|e| e.to_string())?;
    }
    let (mut per_s, mut ratios, mut like) = (vec![Vec::new(); 4], vec![Vec::new(); 4], Vec::new());
    let mut cpu_ms = vec![Vec::new(); LOOP_MODES.len()];
    for _ in 0..rounds {
        let mut round = Vec::new();
        for (mode, cpu) in LOOP_MODES.iter().zip(&mut cpu_ms) {
            let v = run_json(Command::new(bin.join("vlm-loadgen")).args([
                "load",
                "--url",
                url,
                "--image",
                &jpeg.to_string_lossy(),
                "--files",
                &dir.to_string_lossy(),
                "--requests",
                &COPIES.to_string(),
                "--concurrency",
                "32",
                "--mode",
                mode,
                "--driver",
                "task",
            ]))?;
            round.push(v["req_per_s"].as_f64().unwrap_or(0.0));
            cpu.push(v["cpu_ms_per_req"].as_f64().unwrap_or(0.0));
        }
        round.push(narrate_copies(
            bin,
            url,
            &dir,
            &work.join("pipeline.jsonl"),
        )?);
        eprintln!(
            "pipeline (loop, loop reading, loop reading and hashing, narrate): {round:.0?} images/s"
        );
        for (i, value) in round.iter().enumerate() {
            per_s[i].push(*value);
            ratios[i].push(value / round[0]);
        }
        like.push(round[3] / round[2]);
    }
    Ok(Pipeline {
        per_s: per_s.into_iter().map(median).collect(),
        ratios: ratios.into_iter().map(median).collect(),
        like_for_like: median(like),
        cpu_ms: cpu_ms.into_iter().map(median).collect(),
    })
}

/// `vlm narrate DIR --concurrency 32`: images/s from its summary line.
fn narrate_copies(bin: &Path, url: &str, dir: &Path, out: &Path) -> Result<f64, String> {
    let run = Command::new(bin.join("vlm"))
        .args([
            "narrate",
            &dir.to_string_lossy(),
            "--concurrency",
            "32",
            "--overwrite",
            "-o",
        ])
        .arg(out)
        .args(["--vlm-base-url", url, "--vlm-model", "fast"])
        .env_remove("RUST_LOG")
        .output()
        .map_err(|e| e.to_string())?;
    let log = String::from_utf8_lossy(&run.stderr);
    log.lines()
        .find(|l| l.starts_with("narrated 2000 of 2000 image(s): 0 failed"))
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|r| r.strip_suffix(" images/s"))
        .and_then(|r| r.parse::<f64>().ok())
        .ok_or_else(|| format!("narrate did not narrate every copy: {log}"))
}

fn pipeline_section(md: &mut String, p: &Pipeline, jpeg_len: usize) {
    md.push_str("\n## W6: the narrator's pipeline\n\n");
    md.push_str(&format!(
        "`vlm narrate DIR --concurrency 32 -o out.jsonl` (release build) over 2,000 copies of the {} KB JPEG \
         (reading, hashing, building, posting, writing one record each; images/s from its summary line) against \
         the library loop (`vlm-loadgen`: `VllmClient::infer_single`, one task, `buffer_unordered(32)`), both \
         against the W1 server. The loop runs three ways: the image from memory (`ImageInput::bytes`, as in W1); \
         reading each copy on the blocking pool into a reused buffer (`--mode client-read`); and reading it and \
         taking its SHA-256 (`client-read-sha256`), the least work per image of a narrator whose records carry \
         the file's sha256. Medians over rounds, and the medians of the per-round ratios.\n\n\
         | run | images/s | ÷ library loop from memory | client CPU ms per image |\n|---|---|---|---|\n",
        jpeg_len / 1024
    ));
    let names = [
        "library loop, image from memory",
        "library loop, reading each file",
        "library loop, reading each file and taking its SHA-256",
        "**`vlm narrate`**",
    ];
    for (i, name) in names.iter().enumerate() {
        let cpu = p
            .cpu_ms
            .get(i)
            .map_or("".to_owned(), |ms| format!("{ms:.3}"));
        md.push_str(&format!(
            "| {name} | {:.0} | {:.2}× | {cpu} |\n",
            p.per_s[i], p.ratios[i]
        ));
    }
    md.push_str(&format!(
        "\n`vlm narrate` ÷ the library loop that reads and hashes each file: **{:.2}×**. Reading each file \
         and taking its SHA-256 alone bring the loop to {:.2}× of its in-memory rate: on these 2 cores, shared \
         with the server, they add {:.3} ms of client CPU per image to the loop's {:.3} ms.\n",
        p.like_for_like,
        p.ratios[2],
        p.cpu_ms[2] - p.cpu_ms[0],
        p.cpu_ms[0]
    ));
}

/// One `vlm-loadgen load` run: its JSON line.
fn loadgen(
    bin: &Path,
    url: &str,
    jpeg: &Path,
    requests: usize,
    concurrency: usize,
    mode: &str,
    driver: &str,
) -> Result<Value, String> {
    run_json(Command::new(bin.join("vlm-loadgen")).args([
        "load",
        "--url",
        url,
        "--image",
        &jpeg.to_string_lossy(),
        "--requests",
        &requests.to_string(),
        "--concurrency",
        &concurrency.to_string(),
        "--mode",
        mode,
        "--driver",
        driver,
    ]))
}

/// One W1 row: medians over rounds, and the median of the per-round client/raw ratios.
struct LoadRow {
    driver: &'static str,
    concurrency: usize,
    requests: usize,
    /// req/s, p50 ms, p99 ms, CPU ms per request.
    raw: (f64, f64, f64, f64),
    client: (f64, f64, f64, f64),
    ratio: f64,
}

fn load_row(
    bin: &Path,
    url: &str,
    jpeg: &Path,
    driver: &'static str,
    concurrency: usize,
    requests: usize,
    rounds: usize,
) -> Result<LoadRow, String> {
    let mut per_mode: [(&str, Vec<Value>); 2] = [("raw", vec![]), ("client", vec![])];
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        for (mode, results) in &mut per_mode {
            let v = loadgen(bin, url, jpeg, requests, concurrency, mode, driver)?;
            eprintln!("{v}");
            results.push(v);
        }
        let last = |i: usize| per_mode[i].1.last().and_then(|v| v["req_per_s"].as_f64());
        if let (Some(raw), Some(client)) = (last(0), last(1)) {
            ratios.push(client / raw);
        }
    }
    let med = |i: usize, key: &str| {
        median(
            per_mode[i]
                .1
                .iter()
                .filter_map(|v| v[key].as_f64())
                .collect(),
        )
    };
    let stats = |i: usize| {
        (
            med(i, "req_per_s"),
            med(i, "p50_ms"),
            med(i, "p99_ms"),
            med(i, "cpu_ms_per_req"),
        )
    };
    Ok(LoadRow {
        driver,
        concurrency,
        requests,
        raw: stats(0),
        client: stats(1),
        ratio: median(ratios),
    })
}

/// W5's server: 8 requests decoded together, each answer taking about 0.25 s.
const CAPACITY_SLOTS: usize = 8;
const TOKEN_RATE: &str = "60";
/// W5's inference timeout: short, so that overload shows as timeouts as well as 503s.
const CAPACITY_TIMEOUT: &str = "3";

/// One W5 run: `vlm narrate` at one concurrency against a fresh capacity-model emulator.
struct CapacityRun {
    concurrency: String,
    images: usize,
    per_s: f64,
    timeouts: usize,
    errors: usize,
    refused_503: u64,
    auto_note: String,
    exit: Option<i32>,
    written: usize,
}

/// Starts `vlm-emulator --capacity`, narrates `images` of `dir` at `concurrency`, stops the
/// emulator with SIGTERM and reads its count of 503s.
fn capacity_run(
    bin: &Path,
    dir: &Path,
    work: &Path,
    concurrency: &str,
    images: usize,
) -> Result<CapacityRun, String> {
    let mut child = Command::new(bin.join("vlm-emulator"))
        .args([
            "--backend",
            "vllm",
            "--capacity",
            &CAPACITY_SLOTS.to_string(),
            "--token-rate",
            TOKEN_RATE,
        ])
        .stdout(Stdio::piped())
        // To a file: a pipe nobody reads until the end would fill with its log and stall it.
        .stderr(Stdio::from(
            std::fs::File::create(work.join("capacity-emulator.log")).map_err(|e| e.to_string())?,
        ))
        .spawn()
        .map_err(|e| format!("cannot start vlm-emulator: {e}"))?;
    let mut url = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?)
        .read_line(&mut url)
        .map_err(|e| e.to_string())?;
    let out = work.join("capacity.jsonl");
    let listed: Vec<PathBuf> = (0..images)
        .map(|i| dir.join(format!("{i:05}.png")))
        .collect();
    let started = Instant::now();
    let narrated = Command::new(bin.join("vlm"))
        .args(["narrate", "--concurrency", concurrency, "--overwrite", "-o"])
        .arg(&out)
        .args([
            "--vlm-base-url",
            url.trim(),
            "--vlm-timeout",
            CAPACITY_TIMEOUT,
        ])
        .args(&listed)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let emulator_log =
        std::fs::read_to_string(work.join("capacity-emulator.log")).unwrap_or_default();
    let refused_503 = emulator_log
        .split("served, ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("the emulator did not report its 503s: {emulator_log}"))?;
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    let records: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let log = String::from_utf8_lossy(&narrated.stderr);
    if records.len() != images {
        // Said in the table, not hidden: the run stopped early (a server gone past the wait).
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        eprintln!(
            "--concurrency {concurrency}: {} records of {images} (exit {:?}); the log ended: {tail:?}",
            records.len(),
            narrated.status.code()
        );
    }
    let failed: Vec<&str> = records.iter().filter_map(|r| r["error"].as_str()).collect();
    let auto_note = log
        .lines()
        .find_map(|l| l.strip_prefix("concurrency auto: "))
        .unwrap_or_default()
        .to_owned();
    let run = CapacityRun {
        concurrency: concurrency.to_owned(),
        images,
        per_s: (records.len() - failed.len()) as f64 / secs,
        exit: narrated.status.code(),
        written: records.len(),
        timeouts: failed
            .iter()
            .filter(|e| e.contains("no answer from"))
            .count(),
        errors: failed.len(),
        refused_503,
        auto_note,
    };
    eprintln!(
        "capacity --concurrency {concurrency}: {:.1} images/s, {} errors ({} timeouts), {} 503s {}",
        run.per_s, run.errors, run.timeouts, run.refused_503, run.auto_note
    );
    Ok(run)
}

/// W5: the fixed sweep 1, 2, 4 … 64 and `auto`, each against a fresh capacity-model emulator.
fn capacity_sweep(bin: &Path, work: &Path, quick: bool) -> Result<Vec<CapacityRun>, String> {
    let dir = work.join("images-capacity");
    let most = if quick { 200 } else { 600 };
    make_small_images(&dir, most)?;
    let mut runs = Vec::new();
    for c in [1usize, 2, 4, 8, 16, 32, 64] {
        // Low levels take long per image: fewer images, the same kind of measurement.
        let images = (c * 60).min(most);
        runs.push(capacity_run(bin, &dir, work, &c.to_string(), images)?);
    }
    runs.push(capacity_run(bin, &dir, work, "auto", most)?);
    Ok(runs)
}

fn capacity_section(md: &mut String, runs: &[CapacityRun]) {
    md.push_str("\n## W5: `--concurrency auto` against a server of fixed capacity\n\n");
    md.push_str(&format!(
        "`vlm-emulator --backend vllm --capacity {CAPACITY_SLOTS} --token-rate {TOKEN_RATE}`: {CAPACITY_SLOTS} requests \
         decode together, each answer (13-17 tokens) taking about 0.25 s; past {CAPACITY_SLOTS} they queue \
         (published as `vllm:num_requests_waiting`), and {} waiting is a 503. `vlm narrate --vlm-timeout \
         {CAPACITY_TIMEOUT} images/` (release build) over generated 32×24 PNGs, a fresh emulator per row; \
         images/s counts answers only. Lower levels narrate fewer images (60 per request in flight).\n\n",
        4 * CAPACITY_SLOTS
    ));
    md.push_str("| --concurrency | images | records | exit | images/s | error records | of them timeouts | 503s answered by the server |\n|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
            r.concurrency,
            r.images,
            r.written,
            r.exit.map_or("-".to_owned(), |c| c.to_string()),
            r.per_s,
            r.errors,
            r.timeouts,
            r.refused_503
        ));
    }
    let best = runs
        .iter()
        .filter(|r| r.concurrency != "auto")
        .max_by(|a, b| a.per_s.total_cmp(&b.per_s));
    if let (Some(best), Some(auto)) = (best, runs.iter().find(|r| r.concurrency == "auto")) {
        md.push_str(&format!(
            "\n`--concurrency auto` narrated **{:.1} images/s**, **{:.0}%** of the best fixed level \
             ({} at {:.1} images/s), with {} timeouts and {} 503s (its summary: `concurrency auto: {}`).\n",
            auto.per_s,
            100.0 * auto.per_s / best.per_s,
            best.concurrency,
            best.per_s,
            auto.timeouts,
            auto.refused_503,
            auto.auto_note
        ));
    }
}
