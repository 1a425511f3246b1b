//! The emulator's deterministic "answer": a description computed from the image itself, so a demo
//! shows something real and tests can tell images apart.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

/// What the emulator sees in one image.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ImageSummary {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The format name (`PNG`, `JPEG`, `WebP`, `GIF`).
    pub format: &'static str,
    /// The mean colour, 0–255 per channel.
    pub mean_rgb: [u8; 3],
    /// Mean per-pixel chroma (max − min channel), 0–1.
    pub chroma: f64,
    /// Whether the image reads as monochrome (neutral or toned by one hue).
    pub monochrome: bool,
    /// For a monochrome image with a cast: the hue in degrees, its name, and its strength (0–1).
    pub cast: Option<(f64, &'static str, f64)>,
    /// The first 16 hex digits of the SHA-256 of the encoded bytes.
    pub sha256_prefix: String,
}

/// The first 16 lowercase hex digits of SHA-256 of `bytes`.
pub fn sha256_prefix(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(16);
    for b in &digest[..8] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn hue_name(hue: f64) -> &'static str {
    match hue {
        h if !(15.0..345.0).contains(&h) => "red",
        h if h < 45.0 => "orange",
        h if h < 70.0 => "yellow",
        h if h < 170.0 => "green",
        h if h < 200.0 => "cyan",
        h if h < 260.0 => "blue",
        h if h < 300.0 => "purple",
        _ => "magenta",
    }
}

/// Decodes and describes an image; the error is what a server would say about bad bytes.
pub fn analyse(bytes: &[u8]) -> Result<ImageSummary, String> {
    let format =
        image::guess_format(bytes).map_err(|e| format!("cannot identify image file: {e}"))?;
    let format_name = match format {
        image::ImageFormat::Png => "PNG",
        image::ImageFormat::Jpeg => "JPEG",
        image::ImageFormat::WebP => "WebP",
        image::ImageFormat::Gif => "GIF",
        other => return Err(format!("unsupported image format {other:?}")),
    };
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("cannot decode {format_name} image: {e}"))?
        .to_rgb8();
    let (width, height) = img.dimensions();
    let n = f64::from(width) * f64::from(height);
    if n == 0.0 {
        return Err("the image has no pixels".to_owned());
    }
    let (mut sr, mut sg, mut sb) = (0.0f64, 0.0f64, 0.0f64);
    let (mut sx, mut sy, mut schroma) = (0.0f64, 0.0f64, 0.0f64);
    for p in img.pixels() {
        let [r, g, b] = p.0.map(|c| f64::from(c) / 255.0);
        sr += r;
        sg += g;
        sb += b;
        // Opponent axes: x toward red, y toward green-minus-blue; their angle is the hue.
        sx += r - (g + b) / 2.0;
        sy += (g - b) * 3f64.sqrt() / 2.0;
        schroma += r.max(g).max(b) - r.min(g).min(b);
    }
    let mean = [sr / n, sg / n, sb / n];
    let chroma = schroma / n;
    let (mx, my) = (sx / n, sy / n);
    let directional = (mx * mx + my * my).sqrt();
    // One hue everywhere (a toned print) keeps the mean vector nearly as long as the mean chroma.
    let coherent = chroma > 0.0 && directional / chroma > 0.6;
    let monochrome = chroma < 0.02 || (chroma < 0.25 && coherent);
    let cast = (monochrome && chroma >= 0.02).then(|| {
        let hue = my.atan2(mx).to_degrees().rem_euclid(360.0);
        (hue, hue_name(hue), directional)
    });
    Ok(ImageSummary {
        width,
        height,
        format: format_name,
        mean_rgb: mean.map(|c| (c * 255.0).round().clamp(0.0, 255.0) as u8),
        chroma,
        monochrome,
        cast,
        sha256_prefix: sha256_prefix(bytes),
    })
}

impl ImageSummary {
    /// One sentence describing the image.
    pub fn describe(&self) -> String {
        let [r, g, b] = self.mean_rgb;
        let look = match (self.monochrome, self.cast) {
            (true, None) => "neutral monochrome, no colour cast".to_owned(),
            (true, Some((hue, name, strength))) => {
                let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                };
                format!(
                    "monochrome with {article} {name} cast (hue {hue:.0}°, strength {strength:.3})"
                )
            }
            (false, _) => format!("colourful, not monochrome (chroma {:.2})", self.chroma),
        };
        format!(
            "{}x{} {}, mean colour #{r:02x}{g:02x}{b:02x}; {look}; sha256 {}",
            self.width, self.height, self.format, self.sha256_prefix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(f(x, y)));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn neutral_toned_and_colourful_images_are_told_apart() {
        let grey = analyse(&png(8, 8, |x, _| [(x * 30) as u8; 3])).unwrap();
        assert!(grey.monochrome && grey.cast.is_none(), "{grey:?}");

        let sepia = analyse(&png(8, 8, |x, _| {
            let v = 40 + x as u8 * 25;
            [
                v.saturating_add(20),
                v.saturating_add(8),
                v.saturating_sub(10),
            ]
        }))
        .unwrap();
        let (hue, name, strength) = sepia.cast.unwrap();
        assert!(
            sepia.monochrome && name == "orange" && strength > 0.05,
            "{sepia:?} {hue}"
        );

        let cyan = analyse(&png(8, 8, |x, _| {
            let v = 60 + x as u8 * 20;
            [v - 12, v + 6, v + 10]
        }))
        .unwrap();
        assert_eq!(cyan.cast.map(|c| c.1), Some("cyan"), "{cyan:?}");

        let rainbow = analyse(&png(8, 8, |x, y| {
            [(x * 32) as u8, (y * 32) as u8, 255 - (x * 32) as u8]
        }))
        .unwrap();
        assert!(!rainbow.monochrome, "{rainbow:?}");
        assert!(rainbow.describe().contains("colourful"));
    }

    #[test]
    fn garbage_is_an_error_and_sha_differs() {
        assert!(analyse(b"not an image").is_err());
        assert_ne!(sha256_prefix(b"a"), sha256_prefix(b"b"));
        assert_eq!(sha256_prefix(b"abc"), "ba7816bf8f01cfea");
    }
}
