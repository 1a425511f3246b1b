//! `vlm-loadgen`: the client side of `cargo xtask bench`, run as its own process so its CPU time
//! and memory are the client's alone.
//!
//! - `load --url U --image F --requests N --concurrency C --mode client|raw|client-read|client-read-sha256 [--files DIR] [--driver task|spawn]`:
//!   N requests, C in flight; `client` is `VllmClient::infer_single` with `ImageInput::bytes`
//!   (reads nothing from disk per request but encodes the image into a fresh body every time,
//!   posts it, parses the answer); `raw` is reqwest posting one pre-built body, the floor.
//!   `--driver task` (the default) polls every request from one task with `buffer_unordered(C)`,
//!   as async-openai's and openai-python's benchmarks drive their clients; `spawn` runs C spawned
//!   workers. Prints one JSON line.
//!   `client-read` (with `--files DIR`) reads the next file of DIR on the blocking pool, into a
//!   reused buffer, for each request and sends that; `client-read-sha256` takes its SHA-256 too: the least a program
//!   narrating a folder does per image, and what `vlm narrate` does before building the body.
//! - `payload-memory --size BYTES`: the peak memory that building one body adds, against the
//!   size of the encoded body. Prints one JSON line.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use vlm_core::openai::{PayloadOptions, build_chat_body};
use vlm_core::{
    ClientConfig, ImageInput, ImageMime, LoadedImage, VlmBackend, VlmClient, VlmRequest,
};

/// Counts live heap bytes and their peak, for `payload-memory`.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; the counters are only
// bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const PROMPT: &str =
    "Describe any residual colour in this photograph, which is meant to be monochrome.";

fn arg(args: &[String], name: &str) -> Result<String, String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("missing {name}"))
}

fn number(args: &[String], name: &str) -> Result<usize, String> {
    arg(args, name)?
        .parse()
        .map_err(|_| format!("{name} must be a whole number"))
}

/// CPU time (user + system) of this process so far, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10) // USER_HZ is 100 on Linux
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn load(args: &[String]) -> Result<(), String> {
    let url = arg(args, "--url")?;
    let image = Bytes::from(std::fs::read(arg(args, "--image")?).map_err(|e| e.to_string())?);
    let requests = number(args, "--requests")?;
    let concurrency = number(args, "--concurrency")?.max(1);
    let mode = arg(args, "--mode")?;
    let mime = ImageMime::detect(&image).ok_or("--image is not an image")?;

    let config = ClientConfig::new(VlmBackend::Vllm, &url)
        .map_err(|e| e.to_string())?
        .with_model("fast")
        .with_max_retries(0);
    let endpoint = format!("{}chat/completions", config.base_url);
    let client = vlm_vllm::VllmClient::new(config).map_err(|e| e.to_string())?;
    let raw = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .map_err(|e| e.to_string())?;
    let request = image_request(image.clone(), mime)?;
    let prebuilt = Bytes::from(
        build_chat_body(
            &request,
            &[LoadedImage::Inline {
                data: image.clone(),
                mime,
            }],
            PayloadOptions::new(Some("fast")),
        )
        .map_err(|e| e.to_string())?,
    );
    let files = match arg(args, "--files") {
        Ok(dir) => copies(&dir)?,
        Err(_) if mode.starts_with("client-read") => return Err("--files DIR is needed".into()),
        Err(_) => Vec::new(),
    };
    let load = Arc::new(Load {
        client,
        raw,
        request,
        prebuilt: prebuilt.clone(),
        endpoint,
        mode: mode.clone(),
        mime,
        files,
        next: AtomicUsize::new(0),
        reads: Arc::default(),
    });
    let one = move || {
        let load = load.clone();
        async move { load.one().await }
    };

    // Warm up the connection pool: C connections, as the measured run keeps C in flight.
    let mut warm = futures_util::stream::iter(0..concurrency.min(requests))
        .map(|_| one())
        .buffer_unordered(concurrency);
    while let Some(result) = warm.next().await {
        result?;
    }
    let driver = arg(args, "--driver").unwrap_or_else(|_| "task".to_owned());
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(requests);
    match driver.as_str() {
        "task" => {
            let timed = |_| {
                let one = one.clone();
                async move {
                    let t = Instant::now();
                    one().await.map(|()| t.elapsed())
                }
            };
            let mut done = futures_util::stream::iter(0..requests)
                .map(timed)
                .buffer_unordered(concurrency);
            while let Some(result) = done.next().await {
                latencies.push(result?);
            }
        }
        "spawn" => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut workers = Vec::new();
            for _ in 0..concurrency {
                let (next, one) = (next.clone(), one.clone());
                workers.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < requests {
                        let t = Instant::now();
                        one().await?;
                        latencies.push(t.elapsed());
                    }
                    Ok::<_, String>(latencies)
                }));
            }
            for w in workers {
                latencies.extend(w.await.map_err(|e| e.to_string())??);
            }
        }
        other => return Err(format!("--driver {other}: expected task or spawn")),
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_before);
    latencies.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "driver": driver,
            "concurrency": concurrency,
            "requests": requests,
            "seconds": seconds,
            "req_per_s": requests as f64 / seconds,
            "p50_ms": percentile(&latencies, 0.5),
            "p99_ms": percentile(&latencies, 0.99),
            "cpu_ms_per_req": cpu.as_secs_f64() * 1000.0 / requests as f64,
            "body_bytes": prebuilt.len(),
        })
    );
    Ok(())
}

/// The benchmark's request: the prompt and one image.
fn image_request(image: Bytes, mime: ImageMime) -> Result<VlmRequest, String> {
    VlmRequest::builder(PROMPT)
        .image(ImageInput::bytes_with_mime(image, mime))
        .max_tokens(300)
        .build()
        .map_err(|e| e.to_string())
}

/// The files of `dir`, sorted: `--files`.
fn copies(dir: &str) -> Result<Vec<std::path::PathBuf>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("--files {dir}: {e}"))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("--files {dir}: no files"));
    }
    Ok(files)
}

/// What one request of `load` does, by `--mode`.
struct Load {
    client: vlm_vllm::VllmClient,
    raw: reqwest::Client,
    request: VlmRequest,
    prebuilt: Bytes,
    endpoint: String,
    mode: String,
    mime: ImageMime,
    files: Vec<std::path::PathBuf>,
    next: AtomicUsize,
    reads: Arc<vlm_core::support::BufferPool>,
}

impl Load {
    async fn one(&self) -> Result<(), String> {
        match self.mode.as_str() {
            "raw" => self.raw().await,
            "client" => self.send(&self.request).await,
            "client-read" | "client-read-sha256" => {
                let request = image_request(self.read_next().await?, self.mime)?;
                self.send(&request).await
            }
            other => Err(format!(
                "--mode {other}: expected raw, client, client-read or client-read-sha256"
            )),
        }
    }

    /// reqwest posting the pre-built body: the floor.
    async fn raw(&self) -> Result<(), String> {
        let resp = self
            .raw
            .post(&self.endpoint)
            .header("content-type", "application/json")
            .body(self.prebuilt.clone())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let ok = resp.status().is_success();
        resp.bytes().await.map_err(|e| e.to_string())?;
        if !ok {
            return Err("non-2xx".to_owned());
        }
        Ok(())
    }

    async fn send(&self, request: &VlmRequest) -> Result<(), String> {
        self.client
            .infer_single(request)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The next file of `--files` read on the blocking pool into a reused buffer (a fresh one
    /// per file costs more than the read: page faults and zero-fill) and its SHA-256 taken under
    /// `client-read-sha256`: the least a program narrating a folder does per image.
    async fn read_next(&self) -> Result<Bytes, String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.files.len();
        let (path, reads) = (self.files[i].clone(), self.reads.clone());
        let hash = self.mode.ends_with("sha256");
        let read = tokio::task::spawn_blocking(move || {
            let failed = |e: std::io::Error| format!("{}: {e}", path.display());
            let mut file = std::fs::File::open(&path).map_err(failed)?;
            let mut bytes = reads.take(0);
            bytes.clear();
            std::io::Read::read_to_end(&mut file, &mut bytes).map_err(failed)?;
            if hash {
                std::hint::black_box(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            }
            Ok::<_, String>(reads.freeze(bytes))
        });
        read.await.map_err(|e| e.to_string())?
    }
}

fn payload_memory(args: &[String]) -> Result<(), String> {
    let size = number(args, "--size")?;
    let mut data = vec![0xFF, 0xD8, 0xFF, 0xE0];
    data.resize(size, 0x5A);
    let loaded = [LoadedImage::Inline {
        data: data.into(),
        mime: ImageMime::Jpeg,
    }];
    let request = VlmRequest::builder(PROMPT)
        .max_tokens(300)
        .build()
        .map_err(|e| e.to_string())?;
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let body = build_chat_body(&request, &loaded, PayloadOptions::new(Some("fast")))
        .map_err(|e| e.to_string())?;
    let extra = PEAK.load(Ordering::Relaxed) - before;
    println!(
        "{}",
        serde_json::json!({
            "image_bytes": size,
            "body_bytes": body.len(),
            "extra_peak_bytes": extra,
            "extra_over_body": extra as f64 / body.len() as f64,
        })
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("load") => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(load(&args))),
        Some("payload-memory") => payload_memory(&args),
        _ => Err("usage: vlm-loadgen load --url U --image F --requests N --concurrency C --mode client|raw|client-read|client-read-sha256 [--files DIR] [--driver task|spawn] | payload-memory --size BYTES".to_owned()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vlm-loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
