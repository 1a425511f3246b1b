//! `cargo xtask samples`: the sample images, generated deterministically so they can be re-made.
//! Some monochrome with a mild colour cast, one neutral, one colourful; JPEG, PNG and WebP.

use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

/// A small deterministic noise source (no rand dependency).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32) / ((1u64 << 24) as f32) - 0.5
    }
}

/// A monochrome "scene": a lit disc on a vignetted gradient with soft bands.
fn luminance(x: u32, y: u32, w: u32, h: u32) -> f32 {
    let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
    let (dx, dy) = (fx - 0.38, fy - 0.42);
    let disc = (1.0 - ((dx * dx + dy * dy).sqrt() / 0.28)).clamp(0.0, 1.0);
    let vignette = 1.0 - 0.55 * ((fx - 0.5).powi(2) + (fy - 0.5).powi(2)).sqrt() * 1.6;
    let bands = 0.06 * (fx * 18.0 + fy * 6.0).sin();
    (0.18 + 0.45 * fy + 0.35 * disc + bands).clamp(0.0, 1.0) * vignette.clamp(0.2, 1.0)
}

/// A monochrome image toned by `tint` (added in proportion to mid-tones) with a little grain.
fn toned(w: u32, h: u32, tint: [f32; 3], seed: u64) -> RgbImage {
    let mut noise = Lcg(seed);
    RgbImage::from_fn(w, h, |x, y| {
        let l = (luminance(x, y, w, h) + 0.03 * noise.next()).clamp(0.0, 1.0);
        let mid = 4.0 * l * (1.0 - l);
        Rgb(tint.map(|t| ((l + t * mid) * 255.0).round().clamp(0.0, 255.0) as u8))
    })
}

fn colourful(w: u32, h: u32) -> RgbImage {
    let palette = [
        [214, 69, 65],
        [244, 179, 80],
        [46, 204, 113],
        [52, 152, 219],
        [155, 89, 182],
        [236, 240, 241],
    ];
    RgbImage::from_fn(w, h, |x, y| {
        let i = ((x / 43) + (y / 48) * 3) as usize % palette.len();
        let shade = 0.75 + 0.25 * (y as f32 / h as f32);
        Rgb(palette[i].map(|c| (c as f32 * shade) as u8))
    })
}

fn save(img: &RgbImage, path: &Path, format: ImageFormat) -> Result<(), String> {
    let result = match format {
        ImageFormat::Jpeg => {
            let file =
                std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(
                std::io::BufWriter::new(file),
                82,
            );
            encoder.encode_image(img)
        }
        other => img.save_with_format(path, other),
    };
    result.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes every sample into `dir`.
pub fn write_all(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (w, h) = (320, 240);
    let samples: [(&str, RgbImage, ImageFormat); 5] = [
        (
            "sepia_portrait.jpg",
            toned(w, h, [0.07, 0.02, -0.06], 1),
            ImageFormat::Jpeg,
        ),
        (
            "cyanotype_harbour.png",
            toned(w, h, [-0.05, 0.01, 0.06], 2),
            ImageFormat::Png,
        ),
        (
            "neutral_street.webp",
            toned(w, h, [0.0, 0.0, 0.0], 3),
            ImageFormat::WebP,
        ),
        (
            "green_cast_field.jpg",
            toned(w, h, [-0.01, 0.035, -0.01], 4),
            ImageFormat::Jpeg,
        ),
        ("colour_market.png", colourful(w, h), ImageFormat::Png),
    ];
    let mut total = 0;
    for (name, img, format) in samples {
        let path = dir.join(name);
        save(&img, &path, format)?;
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        total += len;
        eprintln!("wrote {} ({len} bytes)", path.display());
    }
    eprintln!("{total} bytes in all");
    Ok(())
}
