//! `vlm run`: a file of requests in the OpenAI Batch input format, answered in its output format
//! (the files vLLM's `run_batch` reads and writes), through whichever backend is configured.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::Args;
use serde_json::{Value, json};
use vlm_core::{ImageInput, ResponseFormat, VlmClient, VlmError, VlmRequest, VlmResponse};

use crate::narrate::drain;
use crate::output::{Resumable, Sink};
use crate::shard::Shard;
use crate::{Exit, Failure, GlobalOpts};

/// `vlm run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The requests: one JSON line each, `{"custom_id", "method": "POST", "url":
    /// "/v1/chat/completions", "body": {...}}`
    #[arg(value_name = "REQUESTS.jsonl")]
    requests: PathBuf,
    /// Write the output lines to this file instead of stdout
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Continue an existing --output: skip custom_ids already answered successfully
    #[arg(long, requires = "output", conflicts_with = "overwrite")]
    resume: bool,
    /// Replace an existing --output
    #[arg(long, requires = "output")]
    overwrite: bool,
    #[command(flatten)]
    sending: crate::concurrency::Sending,
    /// Send only shard I of N (I/N, 0 <= I < N): the requests whose custom_id hashes into it
    /// (a line without one: its line number), the same on every machine; auto reads a
    /// Kubernetes Indexed Job (JOB_COMPLETION_INDEX of VLM_SHARD_COUNT) or a Slurm array
    #[arg(long, value_name = "I/N|auto")]
    shard: Option<String>,
}

/// What a request is sharded by: its `custom_id`, or for a line without one, its line number.
fn shard_key(custom_id: Option<&str>, line: usize) -> String {
    custom_id.map_or_else(|| format!("line {line}"), str::to_owned)
}

/// The custom_ids a previous output already answered (status 200, no error).
#[derive(Debug, Default)]
struct Answered {
    done: HashSet<String>,
    bad_lines: usize,
    torn_bytes: u64,
}

impl Resumable for Answered {
    fn add_line(&mut self, line: &[u8]) {
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            self.bad_lines += 1;
            return;
        };
        let Some(id) = value.get("custom_id").and_then(Value::as_str) else {
            return;
        };
        let ok = value.get("error").is_some_and(Value::is_null)
            && value["response"]["status_code"] == 200;
        // The last line for a custom_id wins.
        if ok {
            self.done.insert(id.to_owned());
        } else {
            self.done.remove(id);
        }
    }

    fn add_bad_line(&mut self) {
        self.bad_lines += 1;
    }

    fn ended(&mut self, torn_bytes: u64, _had_bom: bool) {
        self.torn_bytes = torn_bytes;
    }
}

/// One input line, parsed.
struct Line {
    number: usize,
    custom_id: Option<String>,
    request: Result<VlmRequest, String>,
}

/// An output line's `error` object.
fn error(code: &str, message: impl Into<String>) -> Value {
    json!({"code": code, "message": message.into()})
}

/// An image part's URL as the client takes it: `data:`/`http(s)` as they are, `file://` and
/// plain paths read from disk (relative to the request file's folder).
fn image_input(url: &str, base: &Path) -> Result<ImageInput, String> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("data:") || lower.starts_with("http://") || lower.starts_with("https:/") {
        return Ok(ImageInput::url(url));
    }
    if let Some(rest) = url.strip_prefix("file://") {
        let path = vlm_core::Url::parse(url)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .unwrap_or_else(|| PathBuf::from(rest));
        return Ok(ImageInput::path(path));
    }
    Ok(ImageInput::path(base.join(url)))
}

/// The text of a message's content: a string, or its text parts joined.
fn texts(content: &Value) -> Vec<String> {
    match content {
        Value::String(s) => vec![s.clone()],
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// A chat-completions body as a [`VlmRequest`]: the system messages, one user turn's text and
/// images, the sampling fields; anything else passes through as `extra`.
fn to_request(body: &Value, base: &Path) -> Result<VlmRequest, String> {
    let obj = body.as_object().ok_or("body is not a JSON object")?;
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("body.messages must be a non-empty list")?;
    let (mut system, mut prompt, mut images) = (Vec::new(), Vec::new(), Vec::new());
    for (i, message) in messages.iter().enumerate() {
        match message["role"].as_str() {
            Some("system" | "developer") => system.extend(texts(&message["content"])),
            Some("user") => {
                prompt.extend(texts(&message["content"]));
                for part in message["content"].as_array().into_iter().flatten() {
                    if part["type"] != "image_url" {
                        continue;
                    }
                    let url = part["image_url"]
                        .as_str()
                        .or_else(|| part["image_url"]["url"].as_str())
                        .ok_or(format!("messages[{i}]: an image_url part without a url"))?;
                    images.push(image_input(url, base)?);
                }
            }
            Some(other) => {
                return Err(format!(
                    "messages[{i}] has role {other:?}: conversations with earlier turns are not \
                     supported by vlm run yet; send one user turn (and system messages)"
                ));
            }
            None => return Err(format!("messages[{i}] has no role")),
        }
    }
    let mut builder = VlmRequest::builder(prompt.join("\n")).images(images);
    if !system.is_empty() {
        builder = builder.system_prompt(system.join("\n"));
    }
    for (key, value) in obj {
        let bad = || format!("body.{key} is not valid: {value}");
        builder = match key.as_str() {
            "messages" => builder,
            "model" => builder.model(value.as_str().ok_or_else(bad)?),
            "max_tokens" | "max_completion_tokens" => builder.max_tokens(
                value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)?,
            ),
            "temperature" => builder.temperature(value.as_f64().ok_or_else(bad)?),
            "top_p" => builder.top_p(value.as_f64().ok_or_else(bad)?),
            "seed" => builder.seed(value.as_i64().ok_or_else(bad)?),
            "stop" => match value {
                Value::String(s) => builder.stop(s.clone()),
                Value::Array(items) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .fold(builder, |b, s| b.stop(s)),
                _ => return Err(bad()),
            },
            "response_format" => match value["type"].as_str() {
                Some("json_schema") => builder.response_format(ResponseFormat::JsonSchema {
                    name: value["json_schema"]["name"]
                        .as_str()
                        .unwrap_or("answer")
                        .to_owned(),
                    schema: value["json_schema"]["schema"].clone(),
                    strict: value["json_schema"]["strict"].as_bool(),
                }),
                Some("json_object") => builder.response_format(ResponseFormat::JsonObject),
                Some("text") => builder,
                _ => return Err(bad()),
            },
            "stream" if value == &Value::Bool(true) => {
                return Err("a batch request cannot stream (body.stream is true)".to_owned());
            }
            "stream" | "stream_options" | "n" => builder,
            _ => builder.extra(key.clone(), value.clone()),
        };
    }
    builder.build().map_err(|e| e.to_string())
}

/// Parses line `number` of the request file.
fn parse_line(number: usize, text: &str, base: &Path) -> Line {
    let invalid = |custom_id: Option<String>, why: String| Line {
        number,
        custom_id,
        request: Err(format!("line {number}: {why}")),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return invalid(None, format!("not JSON ({e})")),
    };
    let Some(custom_id) = value["custom_id"].as_str().map(str::to_owned) else {
        return invalid(None, "no custom_id string".to_owned());
    };
    let id = Some(custom_id.clone());
    if let Some(method) = value.get("method").and_then(Value::as_str)
        && !method.eq_ignore_ascii_case("POST")
    {
        return invalid(id, format!("method {method:?} is not POST"));
    }
    match value["url"].as_str() {
        Some("/v1/chat/completions" | "/chat/completions") => {}
        other => {
            let url = other.map_or_else(|| "(none)".to_owned(), |u| format!("{u:?}"));
            return invalid(
                id,
                format!("url {url} is not /v1/chat/completions (the only endpoint vlm run serves)"),
            );
        }
    }
    match to_request(&value["body"], base) {
        Ok(request) => Line {
            number,
            custom_id: id,
            request: Ok(request),
        },
        Err(why) => invalid(id, why),
    }
}

/// The chat completion OpenAI's batch output carries, from an answer.
fn completion(answer: &VlmResponse, request_id: &str) -> Value {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut message = json!({"role": "assistant", "content": answer.text});
    if let Some(reasoning) = &answer.reasoning {
        message["reasoning_content"] = json!(reasoning);
    }
    let mut body = json!({
        "id": format!("chatcmpl-{request_id}"), "object": "chat.completion", "created": created,
        "model": vlm_core::text::shown_model(&answer.model),
        "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason}],
    });
    if let Some(usage) = answer.usage {
        body["usage"] = json!(usage);
    }
    body
}

/// What to write for one request, and whether it succeeded.
async fn answer_line(client: Arc<dyn VlmClient>, line: Line, json_retries: u32) -> (Value, bool) {
    let request_id = format!("vlm-{}", line.number);
    let id = format!("batch_req_{}", line.number);
    let base = json!({"id": id, "custom_id": line.custom_id, "response": null, "error": null});
    let with = |response: Value, error: Value| {
        let mut out = base.clone();
        out["response"] = response;
        out["error"] = error;
        out
    };
    let request = match line.request {
        Ok(r) => r,
        Err(why) => return (with(Value::Null, self::error("invalid_line", why)), false),
    };
    let result = match &request.response_format {
        Some(ResponseFormat::JsonSchema { .. }) => {
            vlm_core::json::infer_json_value(&*client, &request, json_retries)
                .await
                .map(|a| a.response)
        }
        // `json_object`: any JSON object, checked the same way (no schema).
        Some(ResponseFormat::JsonObject) => client.infer_single(&request).await.and_then(
            |answer| match vlm_core::json::extract_json(&answer.text) {
                Some(serde_json::Value::Object(_)) => Ok(answer),
                _ => Err(VlmError::InvalidJson {
                    backend: answer.backend,
                    reasons: vec!["the answer holds no JSON object".to_owned()],
                    raw: answer.text,
                    attempts: 1,
                }),
            },
        ),
        _ => client.infer_single(&request).await,
    };
    match result {
        Ok(answer) => {
            let response = json!({"status_code": 200, "request_id": request_id,
                "body": completion(&answer, &request_id)});
            (with(response, Value::Null), true)
        }
        // The server's HTTP error goes in the response, as OpenAI's batch output has it.
        Err(VlmError::Http {
            status,
            message,
            kind,
            ..
        }) => {
            let response = json!({"status_code": status, "request_id": request_id,
                "body": {"error": {"message": message, "type": kind}}});
            (with(response, Value::Null), false)
        }
        Err(e) => {
            let code = match &e {
                VlmError::Image { .. } => "image_error",
                VlmError::InvalidJson { .. } => "invalid_json",
                VlmError::Timeout { .. } => "timeout",
                VlmError::Unreachable { .. } => "unreachable",
                VlmError::EmptyAnswer { .. } => "empty_answer",
                VlmError::Unsupported { .. } => "unsupported",
                VlmError::Config { .. } => "invalid_request",
                _ => "server_error",
            };
            (with(Value::Null, self::error(code, e.to_string())), false)
        }
    }
}

/// Reads the request file once to refuse duplicate custom_ids before anything is sent.
/// Checks that every custom_id is unique; returns how many requests are this shard's (all of
/// them without `--shard`) and how many the file holds.
fn check_ids(path: &Path, shard: Option<Shard>) -> Result<(usize, usize), Failure> {
    let file = std::fs::File::open(path).map_err(|e| {
        Failure::usage(format!(
            "cannot read the request file {}: {e}",
            path.display()
        ))
    })?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let (mut lines, mut ours) = (0, 0);
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| {
            Failure::usage(format!(
                "cannot read {} line {}: {e}",
                path.display(),
                i + 1
            ))
        })?;
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let id = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["custom_id"].as_str().map(str::to_owned));
        if shard.is_none_or(|s| s.takes_key(&shard_key(id.as_deref(), i + 1))) {
            ours += 1;
        }
        if let Some(id) = id
            && let Some(first) = seen.insert(id.clone(), i + 1)
        {
            return Err(Failure::usage(format!(
                "custom_id {id:?} is on lines {first} and {} of {}: each request needs its own \
                 custom_id; nothing was sent",
                i + 1,
                path.display()
            )));
        }
    }
    Ok((ours, lines))
}

/// Runs `vlm run`.
pub async fn run(global: &GlobalOpts, args: RunArgs) -> Result<Exit, Failure> {
    let shard = Shard::from_flag(args.shard.as_deref())?;
    let (total, all) = check_ids(&args.requests, shard)?;
    if let Some(shard) = shard {
        tracing::info!("shard {shard}: {total} of {all} request(s) are this shard's");
    }
    let base = args
        .requests
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    if let Some(path) = &args.output {
        crate::output::refuse_existing(path, args.resume, args.overwrite)?;
    }
    let (settings, _) = global.load_resolved(&[], args.sending.wait).await?;
    let outage_wait = args.sending.outage_wait();
    let replicas = crate::ready_client(
        &settings,
        args.sending.wait,
        args.sending.options(&settings),
    )
    .await?;
    let client: Arc<dyn VlmClient> = Arc::new(replicas.clone());
    let (mut sink, answered) = match &args.output {
        Some(path) => crate::output::open::<Answered>(path, args.resume, args.overwrite)?,
        None => (Sink::Stdout, Answered::default()),
    };
    if answered.torn_bytes > 0 {
        tracing::warn!(
            "cut a torn last line ({} bytes) from the output; that request will be redone",
            answered.torn_bytes
        );
    }
    let file = std::fs::File::open(&args.requests).map_err(|e| {
        Failure::usage(format!(
            "cannot read the request file {}: {e}",
            args.requests.display()
        ))
    })?;
    let skipped = std::sync::atomic::AtomicUsize::new(0);
    let intake = Arc::new(AtomicBool::new(true));
    let lines = {
        let intake = intake.clone();
        let (done, skipped) = (&answered.done, &skipped);
        BufReader::new(file)
            .lines()
            .enumerate()
            .take_while(move |_| intake.load(Ordering::SeqCst))
            .filter_map(move |(i, text)| {
                let text = text.ok()?;
                if text.trim().is_empty() {
                    return None;
                }
                let line = parse_line(i + 1, &text, &base);
                let key = || shard_key(line.custom_id.as_deref(), i + 1);
                if shard.is_some_and(|s| !s.takes_key(&key())) {
                    return None;
                }
                if line.custom_id.as_ref().is_some_and(|id| done.contains(id)) {
                    skipped.fetch_add(1, Ordering::SeqCst);
                    return None;
                }
                Some(line)
            })
    };
    let retries = settings.json_retries;
    let cap = args.sending.concurrency.cap(replicas.clients().count());
    let adaptive = args.sending.concurrency == crate::concurrency::Concurrency::Auto;
    let results = vlm_core::batch::bounded(lines, cap, |line| {
        let (client, replicas) = (client.clone(), replicas.clone());
        async move {
            // Adaptive: a request starts only when the servers have room for it.
            let _admitted = match adaptive {
                true => Some(replicas.admit().await),
                false => None,
            };
            answer_line(client, line, retries).await
        }
    });
    let (mut ok, mut failed, mut unwritten, mut gone) = (0usize, 0usize, 0usize, 0usize);
    let started = Instant::now();
    let drained = drain(results, &intake, None, |(value, success): (Value, bool)| {
        // The server went away and did not come back within the wait: stop the intake.
        if value["error"]["code"] == "unreachable" {
            gone += 1;
            intake.store(false, Ordering::SeqCst);
        }
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        match sink.write_line(&line) {
            Ok(()) if success => ok += 1,
            Ok(()) => failed += 1,
            Err(e) => {
                unwritten += 1;
                return Err(e);
            }
        }
        Ok(())
    })
    .await;
    let skipped = skipped.load(Ordering::SeqCst);
    if !global.quiet {
        eprintln!(
            "answered {ok} of {total} request(s): {failed} failed, {skipped} skipped (already answered){}; {} line(s) written to {}; {:.1} s",
            if unwritten > 0 {
                format!(", {unwritten} not written (output error)")
            } else {
                String::new()
            },
            ok + failed,
            sink.name(),
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(e) = drained.write_error {
        return Err(Failure {
            exit: Exit::Output,
            message: format!(
                "cannot write to {}: {e}; the run stopped; fix the cause and run again with \
                 --resume to finish",
                sink.name()
            ),
        });
    }
    if gone > 0 && !drained.interrupted {
        return Err(Failure {
            exit: Exit::Server,
            message: format!(
                "the server went away and did not come back within {:.0} s (--wait): {gone} \
                 request(s) failed for it and the rest were not started; run again with \
                 --resume to finish once it is back",
                outage_wait.as_secs_f64()
            ),
        });
    }
    Ok(drained.exit(failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_become_requests_or_say_why_not() {
        let base = Path::new("/data/batch");
        let line = parse_line(
            1,
            r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","max_tokens":50,"temperature":0.2,"top_k":20,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Compare."},{"type":"image_url","image_url":{"url":"a.jpg"}},{"type":"image_url","image_url":{"url":"file:///x/b.png"}},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}}"#,
            base,
        );
        let request = line.request.unwrap();
        assert_eq!(line.custom_id.as_deref(), Some("a"));
        assert_eq!(request.prompt, "Compare.");
        assert_eq!(request.system_prompt.as_deref(), Some("Be brief."));
        assert_eq!(request.model.as_deref(), Some("m"));
        assert_eq!(
            (request.max_tokens, request.temperature),
            (Some(50), Some(0.2))
        );
        assert_eq!(request.extra["top_k"], 20);
        assert_eq!(
            request.images,
            [
                ImageInput::path("/data/batch/a.jpg"),
                ImageInput::path("/x/b.png"),
                ImageInput::url("data:image/png;base64,AAAA")
            ]
        );
        for (text, why) in [
            ("not json", "line 2: not JSON"),
            (
                r#"{"url":"/v1/chat/completions","body":{}}"#,
                "no custom_id",
            ),
            (
                r#"{"custom_id":"x","url":"/v1/embeddings","body":{}}"#,
                "is not /v1/chat/completions",
            ),
            (
                r#"{"custom_id":"x","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}}"#,
                "earlier turns",
            ),
        ] {
            let err = parse_line(2, text, base).request.unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
