//! Images attached to a request, and MIME detection from magic numbers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::engine::Simd;
use base64::engine::general_purpose::PAD;
use bytes::Bytes;

use crate::error::VlmError;
use crate::text::truncate;

/// The image types the servers accept as data URLs, detected from the bytes themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageMime {
    /// `image/png`
    Png,
    /// `image/jpeg`
    Jpeg,
    /// `image/webp`
    Webp,
    /// `image/gif`
    Gif,
}

impl ImageMime {
    /// The MIME type string, e.g. `image/png`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ImageMime::Png => "image/png",
            ImageMime::Jpeg => "image/jpeg",
            ImageMime::Webp => "image/webp",
            ImageMime::Gif => "image/gif",
        }
    }

    /// Detects the type from the first bytes (magic numbers); `None` for anything else.
    ///
    /// ```
    /// use vlm_core::ImageMime;
    /// assert_eq!(ImageMime::detect(b"\x89PNG\r\n\x1a\n...."), Some(ImageMime::Png));
    /// assert_eq!(ImageMime::detect(b"\xff\xd8\xff\xe0"), Some(ImageMime::Jpeg));
    /// assert_eq!(ImageMime::detect(b"hello"), None);
    /// ```
    pub fn detect(bytes: &[u8]) -> Option<ImageMime> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageMime::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageMime::Jpeg)
        } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageMime::Webp)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(ImageMime::Gif)
        } else {
            None
        }
    }

    /// Parses a MIME string such as `image/jpeg` (also `image/jpg`).
    pub fn from_mime_str(s: &str) -> Option<ImageMime> {
        match s.trim().to_ascii_lowercase().as_str() {
            "image/png" => Some(ImageMime::Png),
            "image/jpeg" | "image/jpg" => Some(ImageMime::Jpeg),
            "image/webp" => Some(ImageMime::Webp),
            "image/gif" => Some(ImageMime::Gif),
            _ => None,
        }
    }
}

/// The base64 engine every image is encoded with: built once, runtime CPU detection picks
/// AVX2/NEON, else the scalar engine.
pub(crate) fn engine() -> &'static Simd {
    static ENGINE: OnceLock<Simd> = OnceLock::new();
    ENGINE.get_or_init(|| Simd::standard(PAD))
}

/// Encodes image bytes as a `data:<mime>;base64,...` URL, the form the servers take.
///
/// For callers that prepare requests away from the async threads (the encoding of a large image
/// takes milliseconds): pass the result as [`ImageInput::url`].
///
/// ```
/// use vlm_core::{ImageMime, encode_data_url};
/// assert_eq!(encode_data_url(b"GIF89a", ImageMime::Gif), "data:image/gif;base64,R0lGODlh");
/// ```
pub fn encode_data_url(data: &[u8], mime: ImageMime) -> String {
    crate::encode::with_prefix(&format!("data:{};base64,", mime.as_str()), data)
}

/// Describes what the first bytes of a non-image look like, for error messages.
pub fn describe_non_image(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "the file is empty".to_owned();
    }
    let head = &bytes[..bytes.len().min(8)];
    let known = [
        (&b"%PDF"[..], "a PDF document"),
        (
            b"II*\0",
            "a TIFF image (not accepted by the servers; convert it to PNG or JPEG)",
        ),
        (
            b"MM\0*",
            "a TIFF image (not accepted by the servers; convert it to PNG or JPEG)",
        ),
        (
            b"BM",
            "a BMP image (not accepted by the servers; convert it to PNG or JPEG)",
        ),
        (b"PK\x03\x04", "a ZIP archive"),
        (b"<", "text or markup"),
    ];
    if let Some((_, what)) = known.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        return format!("found {what}");
    }
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return "found an ISO media file (HEIC/AVIF/MP4; convert it to PNG or JPEG)".to_owned();
    }
    let printable = bytes
        .iter()
        .take(64)
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if printable {
        "found text, not an image".to_owned()
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("found unknown bytes starting {}", hex.join(" "))
    }
}

/// An image to send with a request.
///
/// ```
/// use vlm_core::ImageInput;
/// let from_disk = ImageInput::path("photo.jpg");
/// let in_memory = ImageInput::bytes(vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n']);
/// let remote = ImageInput::url("https://example.com/cat.png");
/// # let _ = (from_disk, in_memory, remote);
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageInput {
    /// Bytes already in memory, with their MIME type if known (otherwise detected).
    Bytes {
        /// The encoded image (PNG, JPEG, WebP or GIF), sent as it is.
        data: Bytes,
        /// The type; detected from the bytes when `None`. A given type must match the bytes.
        mime: Option<ImageMime>,
    },
    /// A file, read when the request is sent (never all up front).
    Path(PathBuf),
    /// A URL the server fetches itself (`http(s)://` or an existing `data:` URL).
    Url(String),
}

impl std::fmt::Debug for ImageInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never dump image bytes into logs.
            ImageInput::Bytes { data, mime } => f
                .debug_struct("Bytes")
                .field("len", &data.len())
                .field("mime", mime)
                .finish(),
            ImageInput::Path(p) => f.debug_tuple("Path").field(p).finish(),
            ImageInput::Url(u) => f.debug_tuple("Url").field(&truncate(u, 64)).finish(),
        }
    }
}

impl ImageInput {
    /// An image file, read when the request is sent.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        ImageInput::Path(path.into())
    }

    /// Encoded image bytes; the type is detected from them.
    pub fn bytes(data: impl Into<Bytes>) -> Self {
        ImageInput::Bytes {
            data: data.into(),
            mime: None,
        }
    }

    /// Encoded image bytes with a declared type (checked against the bytes when sent).
    pub fn bytes_with_mime(data: impl Into<Bytes>, mime: ImageMime) -> Self {
        ImageInput::Bytes {
            data: data.into(),
            mime: Some(mime),
        }
    }

    /// A URL the server fetches itself. LMDeploy blocks private-IP URLs: send local images
    /// as bytes or paths.
    pub fn url(url: impl Into<String>) -> Self {
        ImageInput::Url(url.into())
    }

    /// A short name for messages: the path, `<bytes>`, or the URL's start.
    pub fn source_name(&self) -> String {
        match self {
            ImageInput::Bytes { data, .. } => format!("<{} bytes in memory>", data.len()),
            ImageInput::Path(p) => p.display().to_string(),
            ImageInput::Url(u) => truncate(u, 64).to_owned(),
        }
    }

    /// Reads (for paths) and checks the image, refusing anything over `max_bytes`.
    pub async fn load(&self, max_bytes: u64) -> Result<LoadedImage, VlmError> {
        match self {
            ImageInput::Bytes { data, mime } => {
                let name = self.source_name();
                check_size(&name, data.len() as u64, max_bytes)?;
                let found = sniff(&name, data)?;
                if let Some(declared) = mime
                    && *declared != found
                {
                    return Err(VlmError::image(
                        name,
                        format!(
                            "declared as {} but the bytes are {}",
                            declared.as_str(),
                            found.as_str()
                        ),
                    ));
                }
                Ok(LoadedImage::Inline {
                    data: data.clone(),
                    mime: found,
                })
            }
            ImageInput::Path(path) => load_path(path, max_bytes).await,
            ImageInput::Url(url) => {
                // Only the scheme is looked at: a data URL may be megabytes long.
                let starts = |p: &str| {
                    url.get(..p.len())
                        .is_some_and(|head| head.eq_ignore_ascii_case(p))
                };
                if starts("http://") || starts("https://") || starts("data:image/") {
                    Ok(LoadedImage::Url(url.clone()))
                } else {
                    Err(VlmError::image(
                        self.source_name(),
                        "an image URL must start with http://, https:// or data:image/; pass \
                         local files as paths",
                    ))
                }
            }
        }
    }
}

fn check_size(name: &str, len: u64, max_bytes: u64) -> Result<(), VlmError> {
    if len > max_bytes {
        return Err(VlmError::image(
            name,
            format!(
                "{len} bytes is over the limit of {max_bytes} bytes (vlm_max_image_bytes); \
                 downscale it or raise the limit"
            ),
        ));
    }
    Ok(())
}

fn sniff(name: &str, data: &[u8]) -> Result<ImageMime, VlmError> {
    ImageMime::detect(data).ok_or_else(|| {
        VlmError::image(
            name,
            format!(
                "not a PNG, JPEG, WebP or GIF image: {}",
                describe_non_image(data)
            ),
        )
    })
}

async fn load_path(path: &Path, max_bytes: u64) -> Result<LoadedImage, VlmError> {
    let name = path.display().to_string();
    let io_err = |e: std::io::Error| VlmError::Image {
        source_name: name.clone(),
        message: format!("cannot read it: {e}"),
        source: Some(Box::new(e)),
    };
    let meta = tokio::fs::metadata(path).await.map_err(io_err)?;
    if !meta.is_file() {
        return Err(VlmError::image(name, "not a regular file"));
    }
    check_size(&name, meta.len(), max_bytes)?;
    let data = tokio::fs::read(path).await.map_err(io_err)?;
    // The file may have grown between stat and read.
    check_size(&name, data.len() as u64, max_bytes)?;
    let mime = sniff(&name, &data)?;
    Ok(LoadedImage::Inline {
        data: Bytes::from(data),
        mime,
    })
}

/// An image ready to be put into a request.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadedImage {
    /// Bytes to send as a `data:` URL.
    Inline {
        /// The encoded image.
        data: Bytes,
        /// Its detected type.
        mime: ImageMime,
    },
    /// A URL passed through.
    Url(String),
}

impl std::fmt::Debug for LoadedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadedImage::Inline { data, mime } => f
                .debug_struct("Inline")
                .field("len", &data.len())
                .field("mime", mime)
                .finish(),
            LoadedImage::Url(u) => f.debug_tuple("Url").field(&u.len()).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    #[test]
    fn detects_each_supported_type_and_nothing_else() {
        let cases: [(&[u8], Option<ImageMime>); 8] = [
            (PNG, Some(ImageMime::Png)),
            (b"\xff\xd8\xff\xdb\0\0", Some(ImageMime::Jpeg)),
            (b"RIFF\0\0\0\0WEBPVP8 ", Some(ImageMime::Webp)),
            (b"GIF89a..", Some(ImageMime::Gif)),
            (b"GIF87a..", Some(ImageMime::Gif)),
            (b"RIFF\0\0\0\0WAVEfmt ", None),
            (b"%PDF-1.7", None),
            (b"", None),
        ];
        for (bytes, want) in cases {
            assert_eq!(ImageMime::detect(bytes), want, "{bytes:?}");
        }
    }

    #[tokio::test]
    async fn a_text_file_named_jpg_is_an_image_error_naming_the_path() {
        let dir = std::env::temp_dir().join(format!("vlm-core-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notes.jpg");
        std::fs::write(&path, "just some text\n").unwrap();
        let err = ImageInput::path(&path).load(1 << 20).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VlmError::Image { .. }));
        assert!(msg.contains("notes.jpg"), "{msg}");
        assert!(msg.contains("found text"), "{msg}");

        let empty = dir.join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        let msg = ImageInput::path(&empty)
            .load(1 << 20)
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("empty"), "{msg}");

        let missing = ImageInput::path(dir.join("missing.png"))
            .load(1 << 20)
            .await;
        assert!(missing.unwrap_err().to_string().contains("cannot read it"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn size_limit_and_declared_type_are_checked() {
        let err = ImageInput::bytes(PNG.to_vec()).load(4).await.unwrap_err();
        assert!(err.to_string().contains("vlm_max_image_bytes"), "{err}");
        let err = ImageInput::bytes_with_mime(PNG.to_vec(), ImageMime::Jpeg)
            .load(1024)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("declared as image/jpeg"), "{err}");
        let ok = ImageInput::bytes(PNG.to_vec()).load(1024).await.unwrap();
        assert!(matches!(
            ok,
            LoadedImage::Inline {
                mime: ImageMime::Png,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn urls_must_be_http_or_data() {
        assert!(ImageInput::url("https://x/y.png").load(1).await.is_ok());
        assert!(
            ImageInput::url("data:image/png;base64,AAAA")
                .load(1)
                .await
                .is_ok()
        );
        assert!(ImageInput::url("/tmp/x.png").load(1).await.is_err());
    }
}
