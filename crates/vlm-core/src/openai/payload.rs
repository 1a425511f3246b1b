//! The one chat-completions payload builder.

use crate::error::VlmError;
use crate::image::LoadedImage;
use crate::request::VlmRequest;

/// Options of the payload that depend on the backend, not the request.
///
/// ```
/// use vlm_core::openai::PayloadOptions;
/// let options = PayloadOptions::new(Some("Qwen2-VL")).streaming(true);
/// assert!(options.stream && options.model == Some("Qwen2-VL"));
/// ```
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct PayloadOptions<'a> {
    /// The `model` field; omitted when `None` (vLLM then uses its first served model).
    pub model: Option<&'a str>,
    /// Sets `"stream": true` and `stream_options.include_usage`; `stream_options` is never
    /// sent otherwise (vLLM answers 400 to `stream_options` without `stream`).
    pub stream: bool,
}

impl<'a> PayloadOptions<'a> {
    /// A body for `model` (none: the server's own), not streamed.
    pub fn new(model: Option<&'a str>) -> Self {
        PayloadOptions {
            model,
            stream: false,
        }
    }

    /// Asks for a streamed answer.
    pub fn streaming(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }
}

/// Writes the chat-completions JSON body for `request` with its `images` already loaded.
///
/// This is the only place that writes the payload: one optional system message, then one user
/// message whose content is the text part followed by one `image_url` part per image, each a
/// `data:<mime>;base64,<...>` URL encoded straight into the pre-sized buffer (the base64 alphabet
/// needs no JSON escaping), then the sampling parameters and the `extra` fields at the top level.
///
/// ```
/// use vlm_core::openai::{build_chat_body, PayloadOptions};
/// use vlm_core::{ImageMime, LoadedImage, VlmRequest};
///
/// let request = VlmRequest::builder("What colour is it?").max_tokens(50).build().unwrap();
/// let image = LoadedImage::Inline { data: b"GIF89a".to_vec().into(), mime: ImageMime::Gif };
/// let body = build_chat_body(&request, &[image], PayloadOptions::new(Some("m"))).unwrap();
/// let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
/// assert_eq!(json["messages"][0]["content"][1]["image_url"]["url"], "data:image/gif;base64,R0lGODlh");
/// ```
pub fn build_chat_body(
    request: &VlmRequest,
    images: &[LoadedImage],
    options: PayloadOptions<'_>,
) -> Result<Vec<u8>, VlmError> {
    let mut out = Vec::with_capacity(body_capacity(request, images));
    build_chat_body_into(&mut out, request, images, options)?;
    Ok(out)
}

/// The bytes a body will take, give or take a little: what to reserve before building it.
pub(crate) fn body_capacity(request: &VlmRequest, images: &[LoadedImage]) -> usize {
    let encoded_images: usize = images
        .iter()
        .map(|img| match img {
            LoadedImage::Inline { data, .. } => {
                base64::encoded_len(data.len(), true).unwrap_or(0) + 96
            }
            LoadedImage::Url(u) => u.len() + 96,
        })
        .sum();
    let text_len = request.prompt.len() + request.system_prompt.as_ref().map_or(0, String::len);
    encoded_images + text_len + text_len / 8 + 256
}

/// A large piece of the body written straight into the output, not through the skeleton.
enum Piece<'a> {
    /// Bytes to base64-encode in place.
    Base64(&'a [u8]),
    /// Bytes that need no JSON escape (a `data:` URL), copied once.
    Verbatim(&'a [u8]),
}

/// [`build_chat_body`] into `out`, overwriting what it holds from the start: a buffer reused
/// from an earlier body keeps its initialized bytes, so the image's base64 is encoded over
/// them in place, with no zero-fill first (only growth past them is zero-filled, once). The
/// small JSON around the images is written to a skeleton first; the images go straight to
/// `out`.
pub(crate) fn build_chat_body_into(
    out: &mut Vec<u8>,
    request: &VlmRequest,
    images: &[LoadedImage],
    options: PayloadOptions<'_>,
) -> Result<(), VlmError> {
    request.validate()?;
    let text_len = request.prompt.len() + request.system_prompt.as_ref().map_or(0, String::len);
    let mut skeleton: Vec<u8> = Vec::with_capacity(text_len + text_len / 8 + 512);
    let mut pieces: Vec<(usize, Piece<'_>)> = Vec::with_capacity(images.len());
    let text = &mut skeleton;
    text.push(b'{');
    if let Some(model) = options.model {
        text.extend_from_slice(b"\"model\":");
        write_json_str(text, model);
        text.push(b',');
    }
    text.extend_from_slice(b"\"messages\":[");
    if let Some(system) = &request.system_prompt {
        text.extend_from_slice(b"{\"role\":\"system\",\"content\":");
        write_json_str(text, system);
        text.extend_from_slice(b"},");
    }
    text.extend_from_slice(b"{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":");
    write_json_str(text, &request.prompt);
    text.push(b'}');
    for image in images {
        text.extend_from_slice(b",{\"type\":\"image_url\",\"image_url\":{\"url\":");
        match image {
            LoadedImage::Inline { data, mime } => {
                text.extend_from_slice(b"\"data:");
                text.extend_from_slice(mime.as_str().as_bytes());
                text.extend_from_slice(b";base64,");
                pieces.push((text.len(), Piece::Base64(data)));
                text.push(b'"');
            }
            LoadedImage::Url(url) if !needs_escape(url.as_bytes()) => {
                text.push(b'"');
                pieces.push((text.len(), Piece::Verbatim(url.as_bytes())));
                text.push(b'"');
            }
            LoadedImage::Url(url) => write_json_str(text, url),
        }
        text.extend_from_slice(b"}}");
    }
    text.extend_from_slice(b"]}]");
    write_fields(text, request, options)?;
    text.push(b'}');

    let mut body = Overwrite { buf: out, at: 0 };
    let mut from = 0;
    for (at, piece) in pieces {
        body.bytes(&skeleton[from..at]);
        match piece {
            Piece::Base64(data) => body.base64(data)?,
            Piece::Verbatim(bytes) => body.bytes(bytes),
        }
        from = at;
    }
    body.bytes(&skeleton[from..]);
    body.finish();
    Ok(())
}

/// Writes over a buffer's initialized bytes from the start, appending past them.
struct Overwrite<'a> {
    buf: &'a mut Vec<u8>,
    at: usize,
}

impl Overwrite<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        let over = self.buf.len().saturating_sub(self.at).min(bytes.len());
        self.buf[self.at..self.at + over].copy_from_slice(&bytes[..over]);
        // Past the old bytes (`at + over` is then the end): appended.
        self.buf.extend_from_slice(&bytes[over..]);
        self.at += bytes.len();
    }

    fn base64(&mut self, data: &[u8]) -> Result<(), VlmError> {
        let len = base64::encoded_len(data.len(), true)
            .ok_or_else(|| VlmError::image("<request>", "too large to encode"))?;
        let end = self.at + len;
        if self.buf.len() < end {
            // Only the bytes no earlier body left are zero-filled.
            self.buf.resize(end, 0);
        }
        crate::encode::encode_slice(data, &mut self.buf[self.at..end])
            .map_err(|e| VlmError::image("<request>", format!("base64 encoding failed: {e}")))?;
        self.at = end;
        Ok(())
    }

    fn finish(self) {
        self.buf.truncate(self.at);
    }
}

/// Whether a JSON string needs an escape: one branch-free scan.
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// The sampling and format fields, the stream flag, and the `extra` passthrough.
fn write_fields(
    out: &mut Vec<u8>,
    request: &VlmRequest,
    options: PayloadOptions<'_>,
) -> Result<(), VlmError> {
    if let Some(n) = request.max_tokens {
        write_field(out, "max_tokens", &n)?;
    }
    if let Some(t) = request.temperature {
        write_field(out, "temperature", &t)?;
    }
    if let Some(p) = request.top_p {
        write_field(out, "top_p", &p)?;
    }
    if !request.stop.is_empty() {
        write_field(out, "stop", &request.stop)?;
    }
    if let Some(seed) = request.seed {
        write_field(out, "seed", &seed)?;
    }
    if let Some(format) = &request.response_format {
        write_field(out, "response_format", &format.to_json())?;
    }
    if options.stream {
        out.extend_from_slice(b",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    }
    for (key, value) in &request.extra {
        out.push(b',');
        write_json_str(out, key);
        out.push(b':');
        serde_json::to_writer(&mut *out, value).map_err(serialise_error)?;
    }
    Ok(())
}

fn serialise_error(e: serde_json::Error) -> VlmError {
    VlmError::config(format!("cannot serialise a request field: {e}"))
}

fn write_field<T: serde::Serialize>(
    out: &mut Vec<u8>,
    key: &str,
    value: &T,
) -> Result<(), VlmError> {
    out.push(b',');
    write_json_str(out, key);
    out.push(b':');
    serde_json::to_writer(&mut *out, value).map_err(serialise_error)
}

/// Writes `s` as a JSON string literal, escaping once, copying runs that need no escape.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most strings (a pre-encoded `data:` URL above all) need no escape: one branch-free scan,
    // then one copy.
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use serde_json::json;

    use serde_json::Value;

    use super::*;
    use crate::image::ImageMime;

    #[test]
    fn a_reused_buffer_is_written_over_exactly_whatever_it_held() {
        let request = VlmRequest::builder("Say \"hi\"\n")
            .system_prompt("Be brief.")
            .max_tokens(7)
            .build()
            .unwrap();
        let images = [
            LoadedImage::Inline {
                data: (0..10_000u32)
                    .map(|i| (i * 7) as u8)
                    .collect::<Vec<_>>()
                    .into(),
                mime: ImageMime::Png,
            },
            LoadedImage::Url("data:image/jpeg;base64,/9j/4AAQ".to_owned()),
            LoadedImage::Url("https://example.com/a \"b\".jpg".to_owned()),
        ];
        let options = || PayloadOptions::new(Some("m"));
        let fresh = build_chat_body(&request, &images, options()).unwrap();
        for held in [0, 10, fresh.len() - 1, fresh.len(), fresh.len() + 5000] {
            let mut buffer = vec![b'x'; held];
            build_chat_body_into(&mut buffer, &request, &images, options()).unwrap();
            assert_eq!(buffer, fresh, "a buffer holding {held} bytes");
        }
        let value: Value = serde_json::from_slice(&fresh).unwrap();
        assert_eq!(
            value["messages"][1]["content"][3]["image_url"]["url"],
            "https://example.com/a \"b\".jpg"
        );
    }

    /// The reference: the same payload built the plain way, through serde_json values.
    fn reference(request: &VlmRequest, images: &[LoadedImage], model: Option<&str>) -> Value {
        let mut content = vec![json!({"type": "text", "text": request.prompt})];
        for image in images {
            let url = match image {
                LoadedImage::Inline { data, mime } => format!(
                    "data:{};base64,{}",
                    mime.as_str(),
                    base64::engine::general_purpose::STANDARD.encode(data)
                ),
                LoadedImage::Url(u) => u.clone(),
            };
            content.push(json!({"type": "image_url", "image_url": {"url": url}}));
        }
        let mut messages = Vec::new();
        if let Some(system) = &request.system_prompt {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": content}));
        let mut body = serde_json::Map::new();
        if let Some(m) = model {
            body.insert("model".into(), json!(m));
        }
        body.insert("messages".into(), Value::Array(messages));
        if let Some(n) = request.max_tokens {
            body.insert("max_tokens".into(), json!(n));
        }
        if let Some(t) = request.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(p) = request.top_p {
            body.insert("top_p".into(), json!(p));
        }
        if !request.stop.is_empty() {
            body.insert("stop".into(), json!(request.stop));
        }
        if let Some(seed) = request.seed {
            body.insert("seed".into(), json!(seed));
        }
        if let Some(f) = &request.response_format {
            body.insert("response_format".into(), f.to_json());
        }
        for (k, v) in &request.extra {
            body.insert(k.clone(), v.clone());
        }
        Value::Object(body)
    }

    /// A deterministic generator of awkward strings: quotes, backslashes, every control
    /// character, non-ASCII, astral-plane characters, and plain text.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn string(&mut self) -> String {
            let pieces = [
                "\"",
                "\\",
                "/",
                "é",
                "漢字",
                "🎞️",
                "\u{2028}",
                "\u{7f}",
                "plain text ",
                "'",
                "{}",
                "</script>",
            ];
            let len = self.next() % 40;
            let mut s = String::new();
            for _ in 0..len {
                match self.next() % 4 {
                    0 => s.push(char::from_u32((self.next() % 32) as u32).unwrap_or(' ')),
                    1 => s.push_str(pieces[(self.next() % pieces.len() as u64) as usize]),
                    _ => s.push(char::from(b'a' + (self.next() % 26) as u8)),
                }
            }
            s
        }
        fn bytes(&mut self) -> Vec<u8> {
            let len = (self.next() % 3000) as usize;
            let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
            v.extend((0..len).map(|_| self.next() as u8));
            v
        }
    }

    #[test]
    fn the_fast_builder_matches_the_reference_for_many_awkward_inputs() {
        let mut g = Gen(0x9E37_79B9_7F4A_7C15);
        for case in 0..500 {
            let mut b = VlmRequest::builder(g.string());
            if g.next().is_multiple_of(2) {
                b = b.system_prompt(g.string());
            }
            if g.next().is_multiple_of(2) {
                b = b
                    .max_tokens((g.next() % 4000 + 1) as u32)
                    .temperature((g.next() % 200) as f64 / 100.0);
            }
            if g.next().is_multiple_of(3) {
                b = b.top_p(0.5).stop(g.string()).seed(g.next() as i64 >> 1);
            }
            if g.next().is_multiple_of(4) {
                b = b.extra(
                    format!("x_{}", g.string()),
                    json!({"nested": [g.string(), 1.5, null]}),
                );
            }
            if g.next().is_multiple_of(5) {
                b = b.json_schema("out", json!({"type": "object", "title": g.string()}));
            }
            let request = b.build().unwrap();
            let images: Vec<LoadedImage> = (0..g.next() % 3)
                .map(|i| {
                    if i == 2 {
                        LoadedImage::Url(format!("https://example.com/{}.png", g.next()))
                    } else {
                        LoadedImage::Inline {
                            data: g.bytes().into(),
                            mime: ImageMime::Png,
                        }
                    }
                })
                .collect();
            let model = (g.next().is_multiple_of(2)).then(|| g.string());
            let body = build_chat_body(
                &request,
                &images,
                PayloadOptions {
                    model: model.as_deref(),
                    stream: false,
                },
            )
            .unwrap();
            let parsed: Value =
                serde_json::from_slice(&body).unwrap_or_else(|e| panic!("case {case}: {e}"));
            assert_eq!(
                parsed,
                reference(&request, &images, model.as_deref()),
                "case {case}"
            );
        }
    }

    #[test]
    fn stream_options_are_sent_only_when_streaming() {
        let request = VlmRequest::builder("x").build().unwrap();
        let plain: Value = serde_json::from_slice(
            &build_chat_body(&request, &[], PayloadOptions::default()).unwrap(),
        )
        .unwrap();
        assert!(plain.get("stream").is_none() && plain.get("stream_options").is_none());
        let streamed: Value = serde_json::from_slice(
            &build_chat_body(
                &request,
                &[],
                PayloadOptions {
                    model: None,
                    stream: true,
                },
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(streamed["stream"], true);
        assert_eq!(streamed["stream_options"], json!({"include_usage": true}));
    }
}
