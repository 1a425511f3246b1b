//! Streaming answers: OpenAI-style server-sent events, parsed as vLLM and LMDeploy frame them.
//!
//! Framing handled: `data: {chunk}` events; `: keep-alive` comment lines (ignored); the usage
//! chunk with `choices: []` (sent only when `stream_options.include_usage` was asked for); a
//! mid-stream `data: {"error": ...}` (or LMDeploy's flat error object, or a chunk whose
//! `finish_reason` is `"error"`), which becomes an error item; and `data: [DONE]`, which ends the
//! stream. Each wait for the next chunk is bounded by a timeout.

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
use crate::openai::decode_error_body;
use crate::response::Usage;

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
/// use vlm_core::stream::{parse_sse_data, StreamEvent};
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
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(data).map_err(|e| VlmError::Protocol {
        backend,
        url: String::new(),
        message: format!(
            "a stream event is not JSON ({e}): {}",
            crate::text::truncate(data, 200)
        ),
    })?;
    let is_error = value.get("error").is_some()
        || value.get("object").and_then(Value::as_str) == Some("error");
    if is_error {
        let decoded = decode_error_body(Some("application/json"), data.as_bytes());
        return Err(VlmError::Generation {
            backend,
            message: decoded.message,
        });
    }
    let mut events = Vec::new();
    if let Some(choice) = value
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
    {
        let delta = choice.get("delta");
        let text_of = |key: &str| delta.and_then(|d| d.get(key)).and_then(Value::as_str);
        if let Some(reasoning) = text_of("reasoning").or_else(|| text_of("reasoning_content"))
            && !reasoning.is_empty()
        {
            events.push(StreamEvent::Reasoning(reasoning.to_owned()));
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
                        content.to_owned()
                    },
                });
            }
            finish => {
                if !content.is_empty() {
                    events.push(StreamEvent::Text(content.to_owned()));
                }
                if let Some(reason) = finish {
                    events.push(StreamEvent::Finish(reason.to_owned()));
                }
            }
        }
    }
    if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
        let usage: Usage =
            serde_json::from_value(usage.clone()).map_err(|e| VlmError::Protocol {
                backend,
                url: String::new(),
                message: format!("the usage chunk is malformed: {e}"),
            })?;
        events.push(StreamEvent::Usage(usage));
    }
    Ok(Some(events))
}

struct State<S> {
    events: S,
    pending: VecDeque<StreamEvent>,
    done: bool,
    backend: VlmBackend,
    url: String,
    chunk_timeout: Duration,
}

/// Turns a response body into [`StreamEvent`]s, each wait for the next chunk bounded by
/// `chunk_timeout`.
pub fn sse_events<B, E>(
    backend: VlmBackend,
    url: String,
    body: B,
    chunk_timeout: Duration,
) -> VlmStream
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
        backend,
        url,
        chunk_timeout,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((Ok(event), state));
            }
            if state.done {
                return None;
            }
            let next = match tokio::time::timeout(state.chunk_timeout, state.events.next()).await {
                Err(_) => {
                    state.done = true;
                    let err = VlmError::Timeout {
                        backend: state.backend,
                        url: state.url.clone(),
                        after: state.chunk_timeout,
                    };
                    return Some((Err(err), state));
                }
                Ok(next) => next,
            };
            match next {
                None => {
                    // The body ended without [DONE] (vLLM and LMDeploy always send it).
                    state.done = true;
                    let err = VlmError::Protocol {
                        backend: state.backend,
                        url: state.url.clone(),
                        message: "the stream ended before `data: [DONE]`".to_owned(),
                    };
                    return Some((Err(err), state));
                }
                Some(Err(e)) => {
                    state.done = true;
                    let err = VlmError::Transport {
                        backend: state.backend,
                        url: state.url.clone(),
                        reason: format!("the stream broke: {e}"),
                    };
                    return Some((Err(err), state));
                }
                Some(Ok(event)) => match parse_sse_data(state.backend, &event.data) {
                    Ok(None) => state.done = true,
                    Ok(Some(events)) => state.pending.extend(events),
                    Err(mut err) => {
                        if let VlmError::Protocol { url, .. } = &mut err {
                            url.clone_from(&state.url);
                        }
                        state.done = true;
                        return Some((Err(err), state));
                    }
                },
            }
        }
    });
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                VlmBackend::Vllm,
                "http://x/v1/chat/completions".into(),
                futures_util::stream::iter(chunks),
                timeout,
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
             vec![Ok(StreamEvent::Reasoning("r1".into())), Ok(StreamEvent::Reasoning("r2".into()))]),
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
             vec![Err("unexpected response from the vllm server at http://x/v1/chat/completions: a stream event is not JSON (expected value at line 1 column 1): <html>".into())]),
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
                VlmBackend::LmDeploy,
                "u".into(),
                body,
                Duration::from_millis(100),
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
}
