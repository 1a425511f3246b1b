//! `vlm narrate`: one JSON line per image, written as soon as that image is done.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt as _;
use sha2::{Digest, Sha256};
use vlm_core::text::{escape_controls, shown_model};
use vlm_core::{
    ImageInput, ImageMime, StreamEvent, VlmBackend, VlmClient, VlmError, VlmRequest,
    describe_non_image,
};

use crate::concurrency::Concurrency;
use crate::emulate::Emulator;
use crate::files::{Input, discover};
use crate::output::{Previous, Record, Sink};
use crate::{Exit, Failure, GlobalOpts};

/// The colour narrator's default prompt.
pub const DEFAULT_PROMPT: &str = "This photograph is meant to be monochrome (black and white). \
Describe any residual colour in it: say whether it is truly neutral or carries a colour cast or \
toning, name the hue, say where it shows (highlights, mid-tones, shadows or particular regions) \
and how strong it is. Answer in two or three sentences.";

pub const AFTER_HELP: &str =
    "Output: one JSON object per image, one line each, written whole and flushed as that image
finishes (in completion order), to --output or else stdout; everything else goes to stderr.
Keys: path, sha256, request_sha256, backend, model, text, finish_reason, usage, latency_ms,
error, json (error is null on success; on error text, finish_reason and usage are null).
request_sha256 fingerprints what was asked (prompt, model, max_tokens, temperature, JSON schema,
image size).

Resume: --resume skips images whose last record is a success for the same path, sha256 and
request_sha256 (asked the same way; it says how many were asked differently), redoes the rest, and cuts a torn last line. An answer cut off by max_tokens (finish_reason
\"length\") is a success, counted apart in the summary; --resume --redo-truncated redoes those too. An existing non-empty --output is refused without
--resume or --overwrite. The output is locked while a run writes it: a second run on the same
--output is refused (exit 2). A record that cannot be written (disk full) stops the run with
exit 5; the file keeps whole lines only, and --resume finishes the job once there is room.

--prompt-file: a regular text file of at most 1 MiB, or - for standard input.

Examples:
  vlm narrate --emulate assets/samples                 # no server needed: the built-in emulator
  vlm narrate photos/ --output narrations.jsonl        # vLLM at http://localhost:8000/v1
  vlm narrate photos/ --vlm-backend lmdeploy --vlm-base-url http://gpu:23333/v1 -o out.jsonl
  vlm narrate photos/ -o out.jsonl --resume --concurrency 8 --wait 600";

/// `vlm narrate` arguments.
#[derive(Debug, Args)]
pub struct NarrateArgs {
    /// Image files or folders (walked recursively for .jpg .jpeg .png .webp .gif, any case)
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// The prompt (default: describe residual colour in a photograph meant to be monochrome)
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file (- for standard input)
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// max_tokens per answer [setting: vlm_max_tokens, default 300]
    #[arg(long, value_name = "N")]
    max_tokens: Option<String>,
    /// Sampling temperature [setting: vlm_temperature, default 0.1]
    #[arg(long, value_name = "T")]
    temperature: Option<String>,
    /// For servers that take a raw prompt (Triton): the text sent, with {prompt} where the
    /// prompt goes, e.g. "<|image|>{prompt}" [setting: vlm_prompt_template]
    #[arg(long, value_name = "TEMPLATE")]
    prompt_template: Option<String>,
    #[command(flatten)]
    sending: crate::concurrency::Sending,
    /// Narrate only shard I of N (I/N, 0 <= I < N): the images whose path, relative to the
    /// folder given, hashes into it, the same on every machine; auto reads a Kubernetes Indexed
    /// Job (JOB_COMPLETION_INDEX of VLM_SHARD_COUNT) or a Slurm array (SLURM_ARRAY_TASK_*)
    #[arg(long, value_name = "I/N|auto")]
    shard: Option<String>,
    /// Write the JSONL records to this file instead of stdout
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Continue an existing --output: skip images already narrated successfully
    #[arg(long, requires = "output", conflicts_with = "overwrite")]
    resume: bool,
    /// Replace an existing --output
    #[arg(long, requires = "output")]
    overwrite: bool,
    /// With --resume: also redo images whose answer was cut off by max_tokens
    /// (finish_reason "length")
    #[arg(long, requires = "resume")]
    redo_truncated: bool,
    /// Print the answer's text to stdout as it is generated (exactly one image; the record goes
    /// to --output if given)
    #[arg(long)]
    stream: bool,
    /// Narrate against the built-in emulator of the chosen backend (answers are computed from
    /// each image, not by a model): for demos and trying the tool without a GPU (needs the
    /// `emulate` feature, on by default)
    #[arg(long)]
    emulate: bool,
    /// Ask for JSON valid for this JSON Schema (a file); the parsed answer goes in the record's
    /// `json` key. An invalid answer is asked for again (vlm_json_retries, default 1), then is an
    /// error record
    #[arg(long, value_name = "FILE", conflicts_with = "stream")]
    json_schema: Option<PathBuf>,
    /// Shrink an image whose longer edge is larger than N pixels before sending it (JPEG, or PNG
    /// with alpha); the record's sha256 stays the file's [setting: vlm_max_image_edge, off]
    #[arg(long, value_name = "N")]
    max_image_edge: Option<String>,
}

enum Outcome {
    Record(Box<Record>),
    /// The error record of an image whose server went away and did not come back within the
    /// wait: the intake stops.
    Gone(Box<Record>),
    Skipped,
    /// Not started: the intake had stopped by the time there was room for it.
    NotStarted,
}

struct Job {
    client: Arc<dyn VlmClient>,
    prompt: Arc<str>,
    max_tokens: u32,
    temperature: f64,
    max_image_bytes: u64,
    previous: Arc<Previous>,
    /// `--json-schema`: its name and the schema.
    schema: Option<Arc<(String, serde_json::Value)>>,
    json_retries: u32,
    /// `--max-image-edge`.
    max_image_edge: Option<u32>,
    /// Read buffers reused from image to image (no fresh pages per image).
    reads: Arc<vlm_core::support::BufferPool>,
    /// What this run asks, fingerprinted (the records' `request_sha256`).
    request_sha256: Arc<str>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An image read, hashed and checked, with its request built.
struct Prepared {
    sha256: String,
    request: VlmRequest,
}

/// Why an image could not be prepared: the message, with the sha256 when the bytes were read.
type Unprepared = (Option<String>, String);

impl Job {
    fn new(
        client: &Arc<dyn VlmClient>,
        prompt: &str,
        settings: &vlm_factory::VlmSettings,
        previous: Previous,
    ) -> Self {
        Job {
            client: client.clone(),
            prompt: Arc::from(prompt),
            max_tokens: settings.max_tokens,
            temperature: settings.temperature,
            max_image_bytes: settings.max_image_bytes,
            previous: Arc::new(previous),
            schema: None,
            json_retries: settings.json_retries,
            max_image_edge: settings.max_image_edge,
            reads: Arc::default(),
            request_sha256: Arc::from(""),
        }
    }

    /// Fingerprints what this run asks (`request_sha256`): SHA-256 of the canonical JSON (keys
    /// sorted) of the prompt, system prompt, model, max_tokens, temperature, JSON schema and
    /// image-size setting.
    fn fingerprint(&mut self) -> [u8; 32] {
        let asked = serde_json::json!({
            "prompt": &*self.prompt,
            "system_prompt": null,
            "model": self.client.model(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "json_schema": self.schema.as_ref().map(|s| &s.1),
            "max_image_edge": self.max_image_edge,
        });
        let digest: [u8; 32] = Sha256::digest(asked.to_string().as_bytes()).into();
        self.request_sha256 = Arc::from(hex(&digest));
        digest
    }

    /// Reads, hashes and checks one image and builds its request, on the blocking pool: hashing
    /// a large image takes milliseconds that must not stall the async threads driving every
    /// other request. The request carries the bytes as read (into a reused buffer); the client
    /// encodes them once, straight into the body (a large image's on the blocking pool too).
    /// `Ok(None)`: the output already has it (resume). An error names the file and says why.
    async fn prepare(&self, input: &Input) -> Result<Option<Prepared>, Unprepared> {
        let path = input.path.clone();
        let shown = input.shown();
        let (max_bytes, prompt) = (self.max_image_bytes, self.prompt.clone());
        let (max_tokens, temperature) = (self.max_tokens, self.temperature);
        let previous = self.previous.clone();
        let client = self.client.clone();
        let schema = self.schema.clone();
        let max_edge = self.max_image_edge;
        let reads = self.reads.clone();
        let read = tokio::task::spawn_blocking(move || {
            let (sha256, bytes, mime) = read_and_hash(&path, &shown, max_bytes, &reads)?;
            if previous.is_done(&shown, &sha256) {
                return Ok(None);
            }
            // Shrunk for the model when asked; the sha256 stays the file's.
            let (bytes, mime) = match max_edge.map(|edge| vlm_core::shrink_image(&bytes, edge)) {
                Some(Ok(Some((shrunk, mime)))) => (shrunk.into(), mime),
                Some(Err(why)) => return Err((Some(sha256), format!("image {shown}: {why}"))),
                _ => (bytes, mime),
            };
            // A type this server cannot take is this image's error, named by its path.
            if let Err(why) = client.check_image_type(mime) {
                return Err((Some(sha256), format!("image {shown}: {why}")));
            }
            let mut builder = VlmRequest::builder(&*prompt)
                .image(ImageInput::bytes_with_mime(bytes, mime))
                .max_tokens(max_tokens)
                .temperature(temperature);
            if let Some(schema) = &schema {
                builder = builder.json_schema(schema.0.clone(), schema.1.clone());
            }
            let request = builder
                .build()
                .map_err(|e| (Some(sha256.clone()), e.to_string()))?;
            Ok(Some(Prepared { sha256, request }))
        });
        read.await.unwrap_or_else(|e| {
            Err((
                None,
                format!(
                    "image {}: internal error while reading it: {e}",
                    input.shown()
                ),
            ))
        })
    }

    /// A record with nothing but the error.
    fn failure(
        &self,
        input: &Input,
        sha256: Option<String>,
        error: String,
        latency_ms: u64,
    ) -> Record {
        Record {
            path: input.shown(),
            sha256,
            request_sha256: self.request_sha256.to_string(),
            backend: self.client.backend().to_string(),
            model: shown_model(self.client.model().unwrap_or_default()),
            text: None,
            finish_reason: None,
            usage: None,
            latency_ms,
            error: Some(error),
            json: None,
        }
    }

    async fn run(&self, input: Input) -> Outcome {
        let Prepared { sha256, request } = match self.prepare(&input).await {
            Ok(Some(prepared)) => prepared,
            Ok(None) => return Outcome::Skipped,
            Err((sha256, error)) => {
                return Outcome::Record(Box::new(self.failure(&input, sha256, error, 0)));
            }
        };
        let started = Instant::now();
        let result = if self.schema.is_some() {
            vlm_core::json::infer_json_value(&*self.client, &request, self.json_retries)
                .await
                .map(|a| (a.response, Some(a.value)))
        } else {
            self.client.infer_single(&request).await.map(|a| (a, None))
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        Outcome::Record(Box::new(match result {
            Ok((answer, json)) => Record {
                path: input.shown(),
                sha256: Some(sha256),
                request_sha256: self.request_sha256.to_string(),
                backend: self.client.backend().to_string(),
                model: shown_model(&answer.model),
                text: Some(answer.text),
                finish_reason: answer.finish_reason,
                usage: answer.usage,
                latency_ms,
                error: None,
                json,
            },
            Err(e) if e.is_unreachable() => {
                let record = self.failure(&input, Some(sha256), e.to_string(), latency_ms);
                return Outcome::Gone(Box::new(record));
            }
            Err(e) => self.failure(&input, Some(sha256), e.to_string(), latency_ms),
        }))
    }
}

/// Reads a file (refusing one over the size limit before reading it, and anything that is not a
/// regular file) into a buffer of `reads`, hashes it and checks it is an image. Blocking: run it
/// on the blocking pool.
fn read_and_hash(
    path: &std::path::Path,
    shown: &str,
    max: u64,
    reads: &Arc<vlm_core::support::BufferPool>,
) -> Result<(String, bytes::Bytes, ImageMime), Unprepared> {
    if path.to_str().is_none() {
        return Err((
            None,
            format!(
                "image {shown}: the path is not valid UTF-8, so its record could not name it faithfully (nor --resume match it); rename the file"
            ),
        ));
    }
    let cannot = |e: std::io::Error| (None, format!("image {shown}: cannot read it: {e}"));
    let (file, meta) = open_without_waiting(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err((None, format!("image {shown}: not a regular file")));
    }
    let over = |len: u64| {
        (
            None,
            format!(
                "image {shown}: {len} bytes is over the limit of {max} bytes (vlm_max_image_bytes); downscale it or raise the limit"
            ),
        )
    };
    if meta.len() > max {
        return Err(over(meta.len()));
    }
    let bytes = read_whole(&file, meta.len(), max, reads).map_err(cannot)?;
    if bytes.len() as u64 > max {
        return Err(over(bytes.len() as u64)); // it grew since the size was checked
    }
    let sha256 = hex(&Sha256::digest(&bytes));
    // A TIFF is converted (the `resize` feature): the sha256 stays the file's.
    if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        return match vlm_core::convert_tiff(&bytes) {
            Ok((converted, mime)) => Ok((sha256, converted.into(), mime)),
            Err(why) => Err((Some(sha256), format!("image {shown}: {why}"))),
        };
    }
    // Sniffed here so the error names the file, not "<N bytes in memory>".
    let Some(mime) = ImageMime::detect(&bytes) else {
        let found = describe_non_image(&bytes);
        return Err((
            Some(sha256),
            format!("image {shown}: not a PNG, JPEG, WebP or GIF image: {found}"),
        ));
    };
    Ok((sha256, reads.freeze(bytes), mime))
}

/// Opens `path` (an image, `--prompt-file`, `--json-schema`) and returns its metadata from the
/// open file (one `fstat`, no second lookup by path, and nothing can be swapped in between the
/// check and the read). Opened non-blocking, so that a FIFO given as a file is refused as "not a
/// regular file" by its caller instead of blocking the open until a writer comes (reads of a
/// regular file ignore the flag), and without taking a terminal as the controlling one.
fn open_without_waiting(
    path: &std::path::Path,
) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NONBLOCK | libc::O_NOCTTY,
    );
    #[cfg(not(unix))]
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

/// Reads all of `file` (of `len` bytes by its metadata) into a buffer of `reads`: one read of
/// `len` bytes into the buffer's last contents (so only growth past them is zero-filled), then
/// one that finds the end, or what the file grew by since, up to `max + 1` bytes in all. (A plain
/// `read_to_end` starts at 8 KiB and doubles: seven reads for a 264 KB photograph.)
fn read_whole(
    file: &std::fs::File,
    len: u64,
    max: u64,
    reads: &vlm_core::support::BufferPool,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    let mut bytes = reads.take(len);
    bytes.resize(len, 0);
    let mut filled = 0;
    while filled < len {
        match (&mut &*file).read(&mut bytes[filled..]) {
            Ok(0) => break, // it shrank since
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    bytes.truncate(filled);
    if filled == len {
        let room = (max + 1).saturating_sub(len as u64);
        std::io::Read::take(file, room).read_to_end(&mut bytes)?;
    }
    Ok(bytes)
}

/// The largest `--prompt-file` read: 1 MiB. A prompt is text; anything larger is a mistake
/// (`/dev/zero`, a photo given by accident).
pub const MAX_PROMPT_FILE_BYTES: u64 = 1024 * 1024;

/// Reads `--prompt-file`: a regular file of at most [`MAX_PROMPT_FILE_BYTES`], UTF-8 text.
/// Devices and FIFOs are refused before anything is read ([`open_without_waiting`]).
fn read_prompt_file(file: &std::path::Path) -> Result<String, Failure> {
    use std::io::Read as _;
    let shown = file.display();
    let fail = |why: String| Failure::usage(format!("--prompt-file {shown}: {why}"));
    if file == std::path::Path::new("-") {
        // Standard input, with the same limit.
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .take(MAX_PROMPT_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(format!("cannot read standard input: {e}")))?;
        if bytes.len() as u64 > MAX_PROMPT_FILE_BYTES {
            return Err(fail(format!(
                "standard input holds over {MAX_PROMPT_FILE_BYTES} bytes (1 MiB), the limit for a prompt"
            )));
        }
        return String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".to_owned()));
    }
    let (opened, meta) =
        open_without_waiting(file).map_err(|e| fail(format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(fail(
            "not a regular file (a folder, device or FIFO); give a text file".to_owned(),
        ));
    }
    let too_big = |len: u64| {
        fail(format!(
            "{len} bytes is over the {MAX_PROMPT_FILE_BYTES}-byte (1 MiB) limit for a prompt; is it the right file?"
        ))
    };
    if meta.len() > MAX_PROMPT_FILE_BYTES {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::new();
    opened
        .take(MAX_PROMPT_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 > MAX_PROMPT_FILE_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".to_owned()))
}

/// Reads `--json-schema`: a JSON object in a small regular file; its name is the file's stem.
fn read_schema(file: &std::path::Path) -> Result<(String, serde_json::Value), Failure> {
    let fail = |why: String| Failure::usage(format!("--json-schema {}: {why}", file.display()));
    let (mut opened, meta) =
        open_without_waiting(file).map_err(|e| fail(format!("cannot read it: {e}")))?;
    if !meta.is_file() || meta.len() > MAX_PROMPT_FILE_BYTES {
        return Err(fail(
            "not a regular file of at most 1 MiB; give a JSON Schema file".to_owned(),
        ));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut opened, &mut text)
        .map_err(|e| fail(format!("cannot read it: {e}")))?;
    let schema: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
    if !schema.is_object() {
        return Err(fail("a JSON Schema is an object".to_owned()));
    }
    let problems = vlm_core::json::violations(&schema, &serde_json::Value::Null);
    if let Some(bad) = problems
        .iter()
        .find(|p| p.contains("schema itself is invalid"))
    {
        return Err(fail(bad.clone()));
    }
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "answer".to_owned());
    Ok((name, schema))
}

fn load_prompt(args: &NarrateArgs) -> Result<String, Failure> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(file)) => read_prompt_file(file)?,
        (None, None) => DEFAULT_PROMPT.to_owned(),
    };
    let prompt = prompt.trim().to_owned();
    if prompt.is_empty() {
        return Err(Failure::usage(
            "the prompt is empty; give --prompt TEXT or a non-empty --prompt-file",
        ));
    }
    Ok(prompt)
}

/// Runs `vlm narrate`.
pub async fn run(global: &GlobalOpts, args: NarrateArgs) -> Result<Exit, Failure> {
    let extra = |emulator: Option<&Emulator>| {
        vec![
            ("vlm_max_tokens", args.max_tokens.clone(), "--max-tokens"),
            ("vlm_temperature", args.temperature.clone(), "--temperature"),
            (
                "vlm_prompt_template",
                args.prompt_template.clone(),
                "--prompt-template",
            ),
            (
                "vlm_max_image_edge",
                args.max_image_edge.clone(),
                "--max-image-edge",
            ),
            (
                "vlm_base_url",
                match emulator {
                    Some(emulator) => Some(crate::emulate::base_url(emulator)),
                    // Before the emulator runs, a stand-in: `openai` has no default URL.
                    None => args.emulate.then(|| "http://127.0.0.1:9/v1".to_owned()),
                },
                "--emulate",
            ),
        ]
    };
    let mut settings = global.load_settings(&extra(None))?;
    let shard = crate::shard::Shard::from_flag(args.shard.as_deref())?;
    let prompt = load_prompt(&args)?;
    let schema = args.json_schema.as_deref().map(read_schema).transpose()?;
    crate::resize::check_available(settings.max_image_edge)?;

    // The emulator lives as long as this run.
    let _emulator = if args.emulate {
        // With `auto`, the default backend is emulated (and then detected).
        let backend = if settings.is_auto() {
            VlmBackend::default()
        } else {
            settings.backend
        };
        let emulator = crate::emulate::start(backend, settings.model.clone()).await?;
        tracing::warn!(
            "--emulate: talking to the built-in {} emulator at {}; its answers are computed from each image (size, mean colour, cast, sha256), not by a vision-language model",
            backend,
            crate::emulate::base_url(&emulator)
        );
        settings = global.load_settings(&extra(Some(&emulator)))?;
        Some(emulator)
    } else {
        None
    };
    let (settings, _detected) = crate::resolve_backend(settings, args.sending.wait).await?;

    if let Some(path) = &args.output {
        crate::output::refuse_existing(path, args.resume, args.overwrite)?;
    }
    let replicas = crate::ready_client(
        &settings,
        args.sending.wait,
        args.sending.options(&settings),
    )
    .await?;
    let client: Arc<dyn VlmClient> = Arc::new(replicas.clone());

    let (inputs, warnings) = discover(&args.paths, shard);
    for w in warnings {
        tracing::warn!("{}", escape_controls(&w));
    }
    let passed_over = crate::files::passed_over_summary(&inputs.passed_over);
    if let Some(shard) = shard {
        tracing::info!(
            "shard {shard}: {} of {} image(s) found are this shard's",
            inputs.len(),
            inputs.len() + inputs.other_shards
        );
    }
    if args.stream && inputs.len() != 1 {
        // Said before the output is opened: --overwrite must not empty it for nothing.
        return Err(Failure::usage(format!(
            "--stream narrates exactly one image; {} were given",
            inputs.len()
        )));
    }

    // Opened, and locked, before anything is sent: a second run on the same output is refused
    // here, and --stream never narrates an image it cannot record.
    let (sink, mut previous) = match &args.output {
        Some(path) => crate::output::open(path, args.resume, args.overwrite)?,
        None => (Sink::Stdout, Previous::default()),
    };
    previous.redo_truncated = args.redo_truncated;
    let mut job = Job::new(&client, &prompt, &settings, Previous::default());
    job.schema = schema.map(Arc::new);
    previous.request = Some(job.fingerprint());
    warn_about_previous(&previous, &*client);
    job.previous = Arc::new(previous);
    if args.stream {
        let sink = args.output.is_some().then_some(sink);
        return stream_one(&job, inputs.into_iter().collect(), sink).await;
    }
    let run = Run {
        passed_over,
        replicas,
        concurrency: args.sending.concurrency,
        outage_wait: args.sending.outage_wait(),
        quiet: global.quiet,
    };
    narrate_all(Arc::new(job), inputs, sink, run).await
}

/// Says what resuming found in the existing output.
fn warn_about_previous(previous: &Previous, client: &dyn VlmClient) {
    let changed = previous.changed();
    if changed > 0 {
        tracing::warn!(
            "{changed} image(s) in the output were narrated with a different request (prompt, \
             model, max_tokens, temperature, JSON schema or image size): they are narrated again \
             and the file will hold answers to both; use --overwrite or a new --output to keep \
             the runs apart"
        );
    }
    let truncated = previous.truncated();
    if truncated > 0 {
        if previous.redo_truncated {
            tracing::info!("--redo-truncated: redoing {truncated} answer(s) cut off by max_tokens");
        } else {
            tracing::info!(
                "{truncated} answer(s) in the output were cut off by max_tokens; \
                 --redo-truncated redoes them"
            );
        }
    }
    if previous.torn_bytes > 0 {
        tracing::warn!(
            "cut a torn last line ({} bytes) from the output; that image will be redone",
            previous.torn_bytes
        );
    }
    if previous.had_bom {
        tracing::warn!(
            "the output started with a UTF-8 byte-order mark; it was overwritten with spaces"
        );
    }
    if previous.bad_lines > 0 {
        tracing::warn!(
            "{} line(s) of the output are not records and were left as they are",
            previous.bad_lines
        );
    }
    let current = (
        client.backend().to_string(),
        shown_model(client.model().unwrap_or_default()),
    );
    if previous.runs.iter().any(|run| *run != current) {
        let seen: Vec<String> = previous
            .runs
            .iter()
            .map(|(b, m)| format!("{b}/{}", shown_model(m)))
            .collect();
        tracing::warn!(
            "the output holds records from {}; this run uses {}/{}",
            escape_controls(&seen.join(", ")),
            current.0,
            current.1
        );
    }
}

/// What a run did, for the summary and the exit code.
#[derive(Debug, Default)]
struct Tally {
    /// Successes written.
    done: usize,
    /// Error records written.
    failed: usize,
    /// Already done (resume).
    skipped: usize,
    /// Records that could not be written.
    unwritten: usize,
    /// Successes cut off by max_tokens (`finish_reason: "length"`).
    truncated: usize,
    /// Error records of images whose server went away for good.
    gone: usize,
}

/// How a run sends: through which endpoints, with what concurrency.
struct Run {
    /// What the folder walk passed over (types no server takes), for the summary.
    passed_over: Option<String>,
    replicas: vlm_core::Replicas,
    concurrency: Concurrency,
    /// How long requests wait for a server that went away.
    outage_wait: Duration,
    quiet: bool,
}

impl Run {
    /// The progress bar's note: the adaptive level, when adaptive.
    fn level(&self) -> String {
        match self.replicas.capacity() {
            Some(level) => format!(", concurrency {level} (auto)"),
            None => String::new(),
        }
    }
}

fn progress_bar(total: usize, quiet: bool) -> Option<indicatif::ProgressBar> {
    (std::io::stderr().is_terminal() && !quiet).then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images, {per_sec}, eta {eta}{msg}",
        ) {
            bar.set_style(style);
        }
        bar
    })
}

/// Narrates every input with bounded (or adaptive) concurrency, writing each record as its
/// image finishes.
async fn narrate_all(
    job: Arc<Job>,
    inputs: crate::files::Inputs,
    mut sink: Sink,
    run: Run,
) -> Result<Exit, Failure> {
    let total = inputs.len();
    let progress = progress_bar(total, run.quiet);
    let started = Instant::now();
    let mut tally = Tally::default();
    // Bounded concurrency that pulls the next image only when there is room; clearing `intake`
    // (Ctrl-C, an output that cannot be written, a server gone for good) stops new work while
    // work in flight finishes.
    let intake = Arc::new(AtomicBool::new(true));
    let launched = Arc::new(AtomicUsize::new(0));
    let inputs = {
        let intake = intake.clone();
        inputs
            .into_iter()
            .take_while(move |_| intake.load(Ordering::SeqCst))
    };
    let cap = run.concurrency.cap(run.replicas.clients().count());
    let adaptive = run.concurrency == Concurrency::Auto;
    let results = vlm_core::batch::bounded(inputs, cap, {
        let (job, launched, intake) = (job.clone(), launched.clone(), intake.clone());
        let replicas = run.replicas.clone();
        move |input| {
            let (job, launched, intake) = (job.clone(), launched.clone(), intake.clone());
            let replicas = replicas.clone();
            async move {
                // Adaptive: an image is read only when the servers have room for it.
                let admitted = match adaptive {
                    true => Some(replicas.admit().await),
                    false => None,
                };
                if !intake.load(Ordering::SeqCst) {
                    return Outcome::NotStarted;
                }
                launched.fetch_add(1, Ordering::SeqCst);
                // Spawned, so requests run on every core. Should the task die, the image still
                // gets its (error) record: nothing is silently lost.
                let task = tokio::spawn({
                    let (job, input) = (job.clone(), input.clone());
                    async move { job.run(input).await }
                });
                let outcome = task.await.unwrap_or_else(|e| {
                    let error = format!(
                        "image {}: internal error while narrating it: {e}",
                        input.shown()
                    );
                    Outcome::Record(Box::new(job.failure(&input, None, error, 0)))
                });
                drop(admitted);
                outcome
            }
        }
    });
    let drained = drain(results, &intake, Some(&*launched), |outcome| {
        let written = take(outcome, &mut sink, &mut tally, progress.as_ref(), &intake);
        if let Some(bar) = &progress {
            bar.set_message(run.level());
        }
        written
    })
    .await;
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    if !run.quiet {
        summarise(&tally, total, started.elapsed().as_secs_f64(), &sink);
        if let Some(line) = &run.passed_over {
            eprintln!("{}", escape_controls(line));
        }
        summarise_endpoints(&run.replicas);
    }
    if let Some(e) = drained.write_error {
        let next = match &sink {
            Sink::File { .. } => {
                "; the output ends with whole lines: fix the cause (free space) and run again \
                 with --resume to finish"
            }
            Sink::Stdout => "",
        };
        return Err(Failure {
            exit: Exit::Output,
            message: format!(
                "cannot write to {}: {e}; the run stopped with {} record(s) written and {} \
                 answer(s) not written{next}",
                sink.name(),
                tally.done + tally.failed,
                tally.unwritten
            ),
        });
    }
    if tally.gone > 0 && !drained.interrupted {
        let attempted = tally.done + tally.failed + tally.unwritten + tally.skipped;
        let resume = match &sink {
            Sink::File { .. } => "; run again with --resume to finish once the server is back",
            Sink::Stdout => "; run again with --output FILE --resume to keep what is done",
        };
        return Err(Failure {
            exit: Exit::Server,
            message: format!(
                "the server went away and did not come back within {:.0} s (--wait): {} \
                 image(s) failed for it and {} were not started{resume}",
                run.outage_wait.as_secs_f64(),
                tally.gone,
                total.saturating_sub(attempted)
            ),
        });
    }
    Ok(drained.exit(tally.failed))
}

/// Writes one result and counts it; a server gone for good stops the intake.
fn take(
    outcome: Outcome,
    sink: &mut Sink,
    tally: &mut Tally,
    progress: Option<&indicatif::ProgressBar>,
    intake: &AtomicBool,
) -> std::io::Result<()> {
    let record = match outcome {
        Outcome::NotStarted => return Ok(()),
        Outcome::Skipped => {
            tally.skipped += 1;
            if let Some(bar) = progress {
                bar.inc(1);
            }
            return Ok(());
        }
        Outcome::Record(record) => record,
        Outcome::Gone(record) => {
            tally.gone += 1;
            intake.store(false, Ordering::SeqCst);
            record
        }
    };
    if let Some(bar) = progress {
        bar.inc(1);
    }
    if let Some(error) = &record.error {
        let line = escape_controls(&format!("{}: {error}", record.path)).into_owned();
        match progress {
            Some(bar) => bar.println(format!("error: {line}")),
            None => tracing::error!("{line}"),
        }
    }
    match sink.write(&record) {
        Ok(()) if record.error.is_some() => {
            tally.failed += 1;
            Ok(())
        }
        Ok(()) => {
            tally.done += 1;
            if record.finish_reason.as_deref() == Some("length") {
                tally.truncated += 1;
            }
            Ok(())
        }
        Err(e) => {
            tally.unwritten += 1;
            Err(e)
        }
    }
}

/// With several endpoints, what each answered; with `--concurrency auto`, where it settled.
fn summarise_endpoints(replicas: &vlm_core::Replicas) {
    let stats = replicas.stats();
    if stats.len() > 1 {
        let each: Vec<String> = stats
            .iter()
            .map(|s| {
                let out = if s.in_rotation {
                    ""
                } else {
                    " (out of the rotation)"
                };
                format!("{} {} answered{out}", s.base_url, s.answered)
            })
            .collect();
        eprintln!("endpoints: {}", each.join(", "));
    }
    if let Some(level) = replicas.capacity() {
        let ranges: Vec<String> = stats
            .iter()
            .filter_map(|s| s.limit_range)
            .map(|(low, high)| format!("{low}-{high}"))
            .collect();
        eprintln!(
            "concurrency auto: {level} in flight at the end (per endpoint it ranged {})",
            ranges.join(", ")
        );
    }
}

/// The summary line: what was narrated and written, never counting what was lost.
fn summarise(tally: &Tally, total: usize, elapsed: f64, sink: &Sink) {
    let attempted = tally.done + tally.failed + tally.unwritten;
    let not_started = total.saturating_sub(attempted + tally.skipped);
    let unwritten = if tally.unwritten > 0 {
        format!(", {} not written (output error)", tally.unwritten)
    } else {
        String::new()
    };
    eprintln!(
        "narrated {} of {total} image(s): {} failed, {} skipped (already done){unwritten}, {not_started} not started; {} record(s) written to {}; {elapsed:.1} s, {:.2} images/s",
        tally.done,
        tally.failed,
        tally.skipped,
        tally.done + tally.failed,
        sink.name(),
        if elapsed > 0.0 {
            attempted as f64 / elapsed
        } else {
            0.0
        }
    );
    if tally.truncated > 0 {
        eprintln!(
            "{} cut off by max_tokens (finish_reason \"length\"): raise --max-tokens and run again \
             with --resume --redo-truncated to redo them",
            tally.truncated
        );
    }
}

/// SIGINT (Ctrl-C) as a stream of events.
struct Interrupts {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Interrupts {
    fn new() -> Self {
        #[cfg(unix)]
        {
            Interrupts {
                signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                    .ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Interrupts {}
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        {
            match &mut self.signal {
                Some(signal) => {
                    if signal.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How a run's results were taken in.
pub(crate) struct Drained {
    /// Ctrl-C stopped the intake (the requests in flight were waited for unless it came twice).
    pub interrupted: bool,
    /// The first error writing the output; the intake stopped there.
    pub write_error: Option<std::io::Error>,
}

impl Drained {
    /// The exit code of a run that wrote its results, given how many of them failed.
    pub fn exit(&self, failed: usize) -> Exit {
        if self.interrupted {
            Exit::Interrupted
        } else if failed > 0 {
            Exit::SomeFailed
        } else {
            Exit::Ok
        }
    }
}

/// Hands each result to `take` (which writes it) as it finishes. A write error or Ctrl-C clears
/// `intake`, so no new work starts while the work in flight finishes; a second Ctrl-C leaves at
/// once, dropping what is in flight. `launched`, when given, counts the work started, so the
/// messages can say how much is still in flight.
pub(crate) async fn drain<T>(
    results: impl futures_util::Stream<Item = T>,
    intake: &AtomicBool,
    launched: Option<&AtomicUsize>,
    mut take: impl FnMut(T) -> std::io::Result<()>,
) -> Drained {
    let mut results = std::pin::pin!(results);
    let mut interrupts = Interrupts::new();
    let mut drained = Drained {
        interrupted: false,
        write_error: None,
    };
    let mut finished = 0usize;
    loop {
        tokio::select! {
            next = results.next() => {
                let Some(result) = next else { break };
                finished += 1;
                if let Err(e) = take(result) {
                    intake.store(false, Ordering::SeqCst);
                    drained.write_error.get_or_insert(e);
                }
            }
            () = interrupts.next() => {
                let waiting = launched.map(|l| l.load(Ordering::SeqCst).saturating_sub(finished));
                if drained.interrupted {
                    // Leaving drops the in-flight requests; the runtime is shut down on return.
                    match waiting {
                        Some(n) => tracing::warn!("interrupted again: aborting {n} request(s) in flight"),
                        None => tracing::warn!("interrupted again: aborting the requests in flight"),
                    }
                    break;
                }
                drained.interrupted = true;
                intake.store(false, Ordering::SeqCst);
                match waiting {
                    Some(n) => tracing::warn!(
                        "interrupted: no new requests; waiting for {n} in flight (Ctrl-C again to abort)"
                    ),
                    None => tracing::warn!(
                        "interrupted: no new requests; waiting for those in flight (Ctrl-C again to abort)"
                    ),
                }
            }
        }
    }
    drained
}

/// `--stream`: one image, its text printed as it arrives; the record goes to `sink` (the
/// already opened, locked `--output`) when there is one.
async fn stream_one(job: &Job, inputs: Vec<Input>, sink: Option<Sink>) -> Result<Exit, Failure> {
    use std::io::Write as _;
    let [input] = <[Input; 1]>::try_from(inputs).map_err(|inputs| {
        Failure::usage(format!(
            "--stream narrates exactly one image; {} were given",
            inputs.len()
        ))
    })?;
    let started = Instant::now();
    let record = match job.prepare(&input).await {
        Err((sha256, error)) => job.failure(&input, sha256, error, 0),
        Ok(None) => {
            tracing::info!(
                "{}: already narrated in the output (--resume); nothing to do",
                escape_controls(&input.shown())
            );
            return Ok(Exit::Ok);
        }
        Ok(Some(Prepared { sha256, request })) => {
            let mut record = job.failure(&input, Some(sha256.clone()), String::new(), 0);
            let streamed: Result<String, VlmError> = async {
                let mut events = job.client.infer_stream(&request).await?;
                let mut text = String::new();
                let mut stdout = std::io::stdout();
                while let Some(event) = events.next().await {
                    match event? {
                        StreamEvent::Text(delta) => {
                            text.push_str(&delta);
                            let _ = stdout
                                .write_all(delta.as_bytes())
                                .and_then(|()| stdout.flush());
                        }
                        StreamEvent::Finish(reason) => record.finish_reason = Some(reason),
                        StreamEvent::Usage(usage) => record.usage = Some(usage),
                        _ => {}
                    }
                }
                let _ = writeln!(stdout);
                Ok(text)
            }
            .await;
            let latency_ms = started.elapsed().as_millis() as u64;
            match streamed {
                Ok(text) => Record {
                    text: Some(text),
                    error: None,
                    latency_ms,
                    ..record
                },
                Err(e) => job.failure(&input, Some(sha256), e.to_string(), latency_ms),
            }
        }
    };
    if let Some(error) = &record.error {
        tracing::error!("{}", escape_controls(&format!("{}: {error}", record.path)));
    }
    if let Some(mut sink) = sink {
        sink.write(&record).map_err(|e| Failure {
            exit: Exit::Output,
            message: format!(
                "cannot write to {}: {e}; the answer was not recorded",
                sink.name()
            ),
        })?;
    }
    Ok(if record.error.is_none() {
        Exit::Ok
    } else {
        Exit::SomeFailed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that is never called: preparing an image does not talk to the server.
    #[derive(Debug)]
    struct Unused(vlm_core::Url);

    #[vlm_core::async_trait]
    impl VlmClient for Unused {
        fn backend(&self) -> VlmBackend {
            VlmBackend::Vllm
        }
        fn model(&self) -> Option<&str> {
            Some("m")
        }
        fn base_url(&self) -> &vlm_core::Url {
            &self.0
        }
        async fn health(&self) -> Result<vlm_core::HealthReport, VlmError> {
            Err(VlmError::config("unused"))
        }
        async fn infer_single(&self, _: &VlmRequest) -> Result<vlm_core::VlmResponse, VlmError> {
            Err(VlmError::config("unused"))
        }
    }

    #[test]
    fn a_file_is_read_whole_whatever_its_size_did_since_it_was_looked_at() {
        let dir = std::env::temp_dir().join(format!("vlm-cli-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.jpg");
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let reads = Arc::new(vlm_core::support::BufferPool::default());
        // Each buffer goes back to the pool, still holding its bytes, as after a request.
        let read = |len: u64, max: u64| {
            let (file, meta) = open_without_waiting(&path).unwrap();
            assert_eq!(meta.len(), 100_000);
            let bytes = read_whole(&file, len, max, &reads).unwrap();
            let copy = bytes.clone();
            drop(reads.freeze(bytes));
            copy
        };
        // As looked at; grown since (the rest is read); shrunk since (what is there).
        assert_eq!(read(100_000, 1 << 20), content);
        assert_eq!(read(10, 1 << 20), content);
        assert_eq!(read(150_000, 1 << 20), content);
        // Grown past the limit: one byte over is read, so the caller can tell.
        assert_eq!(read(10, 50_000).len(), 50_001);
        // The buffer reused, holding a longer file's bytes: only this file's come back.
        let small = dir.join("b.jpg");
        std::fs::write(&small, b"\xFF\xD8small").unwrap();
        let (file, meta) = open_without_waiting(&small).unwrap();
        assert_eq!(
            read_whole(&file, meta.len(), 1 << 20, &reads).unwrap(),
            b"\xFF\xD8small"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reading_and_hashing_a_large_image_leave_the_async_thread_free() {
        let dir = std::env::temp_dir().join(format!("vlm-cli-prep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.jpg");
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0];
        bytes.extend((0..24u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        std::fs::write(&path, &bytes).unwrap();
        let job = Job {
            client: Arc::new(Unused(
                vlm_core::Url::parse("http://127.0.0.1:9/v1/").unwrap(),
            )),
            prompt: Arc::from("p"),
            max_tokens: 10,
            temperature: 0.0,
            max_image_bytes: 64 << 20,
            previous: Arc::new(Previous::default()),
            schema: None,
            json_retries: 0,
            max_image_edge: None,
            reads: Arc::default(),
            request_sha256: Arc::from(""),
        };
        // One async thread: if preparing ran on it, the ticker would stall for as long.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (took, longest_stall) = rt.block_on(async {
            let meter = vlm_testkit::StallMeter::start().await;
            let started = Instant::now();
            let prepared = job.prepare(&Input { path: path.clone() }).await;
            let took = started.elapsed();
            let stall = meter.stop().await;
            assert!(matches!(prepared, Ok(Some(_))), "{:?}", prepared.err());
            (took, stall)
        });
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            longest_stall < took / 3,
            "the async thread stalled {longest_stall:?} of {took:?}"
        );
    }
}
