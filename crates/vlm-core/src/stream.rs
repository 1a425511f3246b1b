//! Streaming answers: OpenAI-style server-sent events, parsed as vLLM and LMDeploy frame them.
//!
//! Framing handled: `data: {chunk}` events; `: keep-alive` comment lines (ignored); the usage
//! chunk with `choices: []` (sent only when `stream_options.include_usage` was asked for); a
//! mid-stream `data: {"error": ...}` (or LMDeploy's flat error object, or a chunk whose
//! `finish_reason` is `"error"`), which becomes an error item; and `data: [DONE]`, which ends the
//! stream. Each wait for the next chunk is bounded by a timeout, and the whole answer by a
//! deadline: a server that trickles one token every few seconds cannot keep a stream open
//! forever.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource as _;
use futures_core::Stream;
use futures_util::StreamExt as _;
use serde_json::Value;

use crate::backend::VlmBackend;
use crate::error::VlmError;
use crate::error_body::decode_error_body;
use crate::response::{Usage, lenient_usage};
use crate::text::{MAX_MESSAGE_BYTES, ServerText};

/// One piece of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// More answer text.
    Text(String),
    /// More reasoning text (vLLM `reasoning`, LMDeploy `reasoning_content`).
    Reasoning(String),
    /// Generation stopped, and why (`stop`, `length`, ...).
    Finish(String),
    /// Token counts (the final usage chunk).
    Usage(Usage),
}

/// A streamed answer: events in order, ending after `[DONE]` or at the first error.
pub type VlmStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, VlmError>> + Send>>;

/// The events one SSE `data:` payload carries; `Ok(None)` for `[DONE]`.
///
/// ```
/// use vlm_core::support::parse_sse_data;
/// use vlm_core::StreamEvent;
/// use vlm_core::VlmBackend;
///
/// let chunk = r#"{"choices":[{"index":0,"delta":{"content":"Warm"},"finish_reason":null}]}"#;
/// let events = parse_sse_data(VlmBackend::Vllm, chunk).unwrap().unwrap();
/// assert_eq!(events, [StreamEvent::Text("Warm".into())]);
/// assert_eq!(parse_sse_data(VlmBackend::Vllm, "[DONE]").unwrap(), None);
/// ```
pub fn parse_sse_data(
    backend: VlmBackend,
    data: &str,
) -> Result<Option<Vec<StreamEvent>>, VlmError> {
    parse_chunk(backend, data, &ServerText::default())
}

/// The fields of a chunk this client reads; `usage` is kept raw so that counts a server got
/// wrong (`1e400`) cost only the usage, not the answer.
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(default)]
    choices: Option<Vec<Value>>,
    #[serde(default, borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    object: Option<String>,
}

fn parse_chunk(
    backend: VlmBackend,
    data: &str,
    clean: &ServerText,
) -> Result<Option<Vec<StreamEvent>>, VlmError> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(None);
    }
    // The key is redacted from the whole event first: nothing derived from it can show it.
    let data = clean.redact(data);
    let data = data.as_ref();
    let chunk: Chunk<'_> = serde_json::from_str(data).map_err(|e| VlmError::Protocol {
        backend,
        url: String::new(),
        message: clean.clean(
            &format!(
                "a stream event is not a JSON chunk ({e}): {}",
                crate::text::truncate(data, 200)
            ),
            MAX_MESSAGE_BYTES,
        ),
    })?;
    if chunk.error.is_some() || chunk.object.as_deref() == Some("error") {
        let decoded = decode_error_body(Some("application/json"), data.as_bytes());
        return Err(VlmError::Generation {
            backend,
            message: clean.clean(&decoded.message, MAX_MESSAGE_BYTES),
        });
    }
    let mut events = Vec::new();
    if let Some(choice) = chunk.choices.as_deref().and_then(<[Value]>::first) {
        let delta = choice.get("delta");
        let text_of = |key: &str| delta.and_then(|d| d.get(key)).and_then(Value::as_str);
        if let Some(reasoning) = text_of("reasoning").or_else(|| text_of("reasoning_content"))
            && !reasoning.is_empty()
        {
            events.push(StreamEvent::Reasoning(clean.redact(reasoning).into_owned()));
        }
        let content = text_of("content").unwrap_or_default();
        match choice.get("finish_reason").and_then(Value::as_str) {
            // LMDeploy <= 0.15 reports engine errors in-band.
            Some("error") => {
                return Err(VlmError::Generation {
                    backend,
                    message: if content.is_empty() {
                        "finish_reason \"error\" in the stream; see the server's log".to_owned()
                    } else {
                        clean.clean(content, MAX_MESSAGE_BYTES)
                    },
                });
            }
            finish => {
                if !content.is_empty() {
                    events.push(StreamEvent::Text(clean.redact(content).into_owned()));
                }
                if let Some(reason) = finish {
                    events.push(StreamEvent::Finish(clean.clean(reason, 64)));
                }
            }
        }
    }
    if let Some(raw) = chunk.usage
        && let Some(usage) = lenient_usage(backend, raw.get(), clean)
    {
        events.push(StreamEvent::Usage(usage));
    }
    Ok(Some(events))
}

/// Turns one SSE `data:` payload into events; `Ok(None)` ends the stream (`[DONE]`).
pub type ChunkParser =
    fn(VlmBackend, &str, &ServerText) -> Result<Option<Vec<StreamEvent>>, VlmError>;

/// The OpenAI chat-completions chunk parser (the default).
pub fn openai_chunk(
    backend: VlmBackend,
    data: &str,
    clean: &ServerText,
) -> Result<Option<Vec<StreamEvent>>, VlmError> {
    parse_chunk(backend, data, clean)
}

/// Where a stream comes from, how it is framed, and how long it may take.
#[derive(Debug, Clone)]
pub struct StreamContext {
    /// Parses each event ([`openai_chunk`] for OpenAI servers).
    pub parse: ChunkParser,
    /// Whether the body's end ends the stream (Triton sends no `[DONE]`); when false, an end
    /// before the parser's end marker is an error.
    /// The backend streaming.
    pub backend: VlmBackend,
    /// The URL, for messages.
    pub url: String,
    /// The longest wait for the next chunk.
    pub chunk_timeout: Duration,
    /// The budget of the whole answer (`vlm_timeout`), for messages.
    pub total_timeout: Duration,
    /// When the whole answer must have arrived: `total_timeout` after the request was sent.
    pub deadline: tokio::time::Instant,
    /// Cleans the server's text (the API key redacted).
    pub clean: ServerText,
    /// See [`parse`](Self::parse).
    pub end_is_done: bool,
}

struct State<S> {
    events: S,
    pending: VecDeque<StreamEvent>,
    done: bool,
    cx: StreamContext,
    /// What the answer held so far: an answer without text ends in an error, not a success.
    text_seen: bool,
    reasoning_chars: usize,
    finish: Option<String>,
}

impl<S> State<S> {
    /// Ends the stream; an answer that never had text is an error, not a success.
    fn finish_stream(&mut self) -> Option<VlmError> {
        self.done = true;
        (!self.text_seen).then(|| {
            VlmError::empty_answer(
                self.cx.backend,
                self.finish.as_deref(),
                self.reasoning_chars,
            )
        })
    }

    fn take(&mut self, events: Vec<StreamEvent>) {
        for event in &events {
            match event {
                StreamEvent::Text(t) if !t.trim().is_empty() => self.text_seen = true,
                StreamEvent::Reasoning(r) => self.reasoning_chars += r.chars().count(),
                StreamEvent::Finish(f) => self.finish = Some(f.clone()),
                _ => {}
            }
        }
        self.pending.extend(events);
    }
}

/// Turns a response body into [`StreamEvent`]s, each wait for the next chunk bounded by
/// `cx.chunk_timeout` and the whole stream by `cx.deadline`; either ends it with
/// [`VlmError::Timeout`].
pub fn sse_events<B, E>(cx: StreamContext, body: B) -> VlmStream
where
    B: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    // A misbehaving server must not grow one endless event (or stream) in memory: the stream is
    // bounded like a whole response.
    let limit = crate::transport::MAX_RESPONSE_BYTES;
    let bounded = body.scan(0usize, move |total, chunk| {
        let item = match chunk {
            Err(e) => Some(Err(e.to_string())),
            Ok(_) if *total > limit => None,
            Ok(bytes) => {
                *total += bytes.len();
                Some(if *total > limit {
                    Err(format!(
                        "the stream passed {limit} bytes; a proxy or the server is misbehaving"
                    ))
                } else {
                    Ok(bytes)
                })
            }
        };
        std::future::ready(item)
    });
    let state = State {
        events: Box::pin(bounded.eventsource()),
        pending: VecDeque::new(),
        done: false,
        cx,
        text_seen: false,
        reasoning_chars: 0,
        finish: None,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((Ok(event), state));
            }
            if state.done {
                return None;
            }
            let now = tokio::time::Instant::now();
            let chunk_deadline = now + state.cx.chunk_timeout;
            let whole = state.cx.deadline <= chunk_deadline;
            // Checked before polling: a stream that always has data ready would otherwise
            // never reach the timer.
            if now >= state.cx.deadline {
                state.done = true;
                let err = VlmError::Timeout {
                    backend: state.cx.backend,
                    url: state.cx.url.clone(),
                    after: state.cx.total_timeout,
                    setting: "vlm_timeout",
                    source: None,
                };
                return Some((Err(err), state));
            }
            let wait =
                tokio::time::timeout_at(chunk_deadline.min(state.cx.deadline), state.events.next());
            let next = match wait.await {
                Err(_) => {
                    state.done = true;
                    let err = VlmError::Timeout {
                        backend: state.cx.backend,
                        url: state.cx.url.clone(),
                        after: if whole {
                            state.cx.total_timeout
                        } else {
                            state.cx.chunk_timeout
                        },
                        setting: "vlm_timeout",
                        source: None,
                    };
                    return Some((Err(err), state));
                }
                Ok(next) => next,
            };
            match next {
                None if state.cx.end_is_done => {
                    if let Some(err) = state.finish_stream() {
                        return Some((Err(err), state));
                    }
                }
                None => {
                    // The body ended without [DONE] (vLLM and LMDeploy always send it).
                    state.done = true;
                    let err = VlmError::Protocol {
                        backend: state.cx.backend,
                        url: state.cx.url.clone(),
                        message: "the stream ended before `data: [DONE]`".to_owned(),
                    };
                    return Some((Err(err), state));
                }
                Some(Err(e)) => {
                    state.done = true;
                    let err = VlmError::Transport {
                        backend: state.cx.backend,
                        url: state.cx.url.clone(),
                        reason: format!("the stream broke: {e}"),
                        source: None,
                    };
                    return Some((Err(err), state));
                }
                Some(Ok(event)) => {
                    match (state.cx.parse)(state.cx.backend, &event.data, &state.cx.clean) {
                        Ok(None) => {
                            if let Some(err) = state.finish_stream() {
                                return Some((Err(err), state));
                            }
                        }
                        Ok(Some(events)) => state.take(events),
                        Err(mut err) => {
                            if let VlmError::Protocol { url, .. } = &mut err {
                                url.clone_from(&state.cx.url);
                            }
                            state.done = true;
                            return Some((Err(err), state));
                        }
                    }
                }
            }
        }
    });
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(backend: VlmBackend, url: &str, timeout: Duration) -> StreamContext {
        StreamContext {
            parse: openai_chunk,
            end_is_done: false,
            backend,
            url: url.to_owned(),
            chunk_timeout: timeout,
            total_timeout: timeout,
            deadline: tokio::time::Instant::now() + timeout,
            clean: ServerText::default(),
        }
    }

    fn collect(body: &'static str, timeout: Duration) -> Vec<Result<StreamEvent, String>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let chunks: Vec<Result<Bytes, std::io::Error>> = body
                .as_bytes()
                .chunks(7) // events split across reads, as on the wire
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let stream = sse_events(
                context(VlmBackend::Vllm, "http://x/v1/chat/completions", timeout),
                futures_util::stream::iter(chunks),
            );
            stream.map(|r| r.map_err(|e| e.to_string())).collect().await
        })
    }

    type Item = Result<StreamEvent, String>;

    fn text(s: &str) -> Result<StreamEvent, String> {
        Ok(StreamEvent::Text(s.into()))
    }

    #[test]
    fn every_framing_case() {
        let usage = Usage {
            prompt_tokens: 5,
            completion_tokens: 2,
            total_tokens: 7,
        };
        let t = Duration::from_secs(5);
        let cases: Vec<(&str, &'static str, Vec<Item>)> = vec![
            ("plain deltas then [DONE]",
             "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Warm \"},\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"cast\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
             vec![text("Warm "), text("cast"), Ok(StreamEvent::Finish("stop".into()))]),
            ("keep-alive comments are ignored",
             ": keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n: keep-alive\n\ndata: [DONE]\n\n",
             vec![text("a")]),
            ("the usage chunk has no choices",
             "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"length\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\ndata: [DONE]\n\n",
             vec![text("a"), Ok(StreamEvent::Finish("length".into())), Ok(StreamEvent::Usage(usage))]),
            ("reasoning deltas, both names",
             "data: {\"choices\":[{\"delta\":{\"reasoning\":\"r1\"},\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"delta\":{\"reasoning_content\":\"r2\"},\"finish_reason\":null}]}\n\ndata: [DONE]\n\n",
             vec![Ok(StreamEvent::Reasoning("r1".into())), Ok(StreamEvent::Reasoning("r2".into())),
                  Err("the vllm server returned an empty answer: no finish_reason with 4 characters of reasoning but no answer text".into())]),
            ("a stream with no text at all is an empty answer, not a success",
             "data: {\"choices\":[{\"delta\":{\"content\":\"\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
             vec![Ok(StreamEvent::Finish("stop".into())),
                  Err("the vllm server returned an empty answer: finish_reason \"stop\" with no text (content null or blank)".into())]),
            ("a mid-stream error object becomes an error item and ends the stream",
             "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\ndata: {\"error\":{\"message\":\"engine died\",\"type\":\"InternalServerError\",\"code\":500}}\n\ndata: [DONE]\n\n",
             vec![text("a"), Err("the vllm server reported an error while generating: engine died".into())]),
            ("LMDeploy's flat error object",
             "data: {\"object\":\"error\",\"message\":\"out of memory\",\"code\":500}\n\ndata: [DONE]\n\n",
             vec![Err("the vllm server reported an error while generating: out of memory".into())]),
            ("finish_reason error in a chunk",
             "data: {\"choices\":[{\"delta\":{\"content\":\"internal error happened\"},\"finish_reason\":\"error\"}]}\n\ndata: [DONE]\n\n",
             vec![Err("the vllm server reported an error while generating: internal error happened".into())]),
            ("CRLF line endings",
             "data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":null}]}\r\n\r\ndata: [DONE]\r\n\r\n",
             vec![text("x")]),
            ("a body that ends without [DONE] is an error",
             "data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":null}]}\n\n",
             vec![text("x"), Err("unexpected response from the vllm server at http://x/v1/chat/completions: the stream ended before `data: [DONE]`".into())]),
            ("a non-JSON event is a protocol error naming the URL",
             "data: <html>\n\n",
             vec![Err("unexpected response from the vllm server at http://x/v1/chat/completions: a stream event is not a JSON chunk (expected value at line 1 column 1): <html>".into())]),
        ];
        for (name, body, want) in cases {
            assert_eq!(collect(body, t), want, "{name}");
        }
    }

    #[test]
    fn a_stalled_stream_times_out_between_chunks() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let got: Vec<Result<StreamEvent, String>> = rt.block_on(async {
            let first =
                futures_util::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n",
            ))]);
            let body = first.chain(futures_util::stream::pending());
            sse_events(
                context(VlmBackend::LmDeploy, "u", Duration::from_millis(100)),
                body,
            )
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
            .await
        });
        assert_eq!(got[0], text("a"));
        assert!(
            got[1].as_ref().unwrap_err().contains("within 0.1 s"),
            "{got:?}"
        );
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn a_trickling_stream_ends_at_the_whole_answer_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let got: Vec<Result<StreamEvent, String>> = rt.block_on(async {
            // One token every 50 ms, forever: the chunk timeout (1 s) never fires.
            let body = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let chunk = Bytes::from_static(
                    b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n",
                );
                Some((Ok::<_, std::io::Error>(chunk), ()))
            });
            let mut cx = context(VlmBackend::Vllm, "u", Duration::from_secs(1));
            cx.total_timeout = Duration::from_millis(300);
            cx.deadline = tokio::time::Instant::now() + cx.total_timeout;
            sse_events(cx, body)
                .map(|r| r.map_err(|e| e.to_string()))
                .collect()
                .await
        });
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
        let last = got.last().unwrap().as_ref().unwrap_err();
        assert!(
            last.contains("within 0.3 s") && last.contains("--vlm-timeout"),
            "{last}"
        );
        assert!(got.len() > 2, "{got:?}");
    }

    #[test]
    fn usage_that_is_not_counts_costs_the_usage_not_the_answer() {
        let t = Duration::from_secs(5);
        let got = collect(
            "data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1e400,\"completion_tokens\":1.5}}\n\ndata: [DONE]\n\n",
            t,
        );
        assert_eq!(got, vec![text("x"), Ok(StreamEvent::Finish("stop".into()))]);
        // `"error": null` is not an error.
        let got = collect(
            "data: {\"error\":null,\"choices\":[{\"delta\":{\"content\":\"y\"},\"finish_reason\":null}]}\n\ndata: [DONE]\n\n",
            t,
        );
        assert_eq!(got, vec![text("y")]);
    }
}
