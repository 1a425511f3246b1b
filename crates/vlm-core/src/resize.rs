//! Images sized for the model: an image larger than needed is shrunk before it is sent (the
//! `resize` feature). Callers keep the original's SHA-256; only what is sent changes.

use crate::image::ImageMime;

/// JPEG quality of a shrunk photo.
#[cfg(feature = "resize")]
const JPEG_QUALITY: u8 = 90;

/// `bytes` shrunk so that the longer edge is at most `max_edge`, keeping the aspect ratio:
/// photos re-encoded as JPEG (quality 90), images with alpha as PNG. `Ok(None)` when it is small
/// enough. CPU work of milliseconds: run it off the async threads.
///
/// ```
/// # #[cfg(feature = "resize")] {
/// let mut png = std::io::Cursor::new(Vec::new());
/// image::RgbImage::new(400, 100).write_to(&mut png, image::ImageFormat::Png).unwrap();
/// let (small, mime) = vlm_core::shrink_image(png.get_ref(), 100).unwrap().unwrap();
/// assert_eq!(mime, vlm_core::ImageMime::Jpeg);
/// # let _ = small; }
/// ```
#[cfg(feature = "resize")]
pub fn shrink_image(bytes: &[u8], max_edge: u32) -> Result<Option<(Vec<u8>, ImageMime)>, String> {
    use image::GenericImageView as _;
    let image = image::load_from_memory(bytes)
        .map_err(|e| format!("cannot decode it to resize it: {e}"))?;
    let (w, h) = image.dimensions();
    if w.max(h) <= max_edge {
        return Ok(None);
    }
    let small = image.resize(max_edge, max_edge, image::imageops::FilterType::Triangle);
    let mut out = std::io::Cursor::new(Vec::new());
    let mime = if small.color().has_alpha() {
        small
            .write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| format!("cannot encode the resized image: {e}"))?;
        ImageMime::Png
    } else {
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
            .encode_image(&small.to_rgb8())
            .map_err(|e| format!("cannot encode the resized image: {e}"))?;
        ImageMime::Jpeg
    };
    Ok(Some((out.into_inner(), mime)))
}

/// A TIFF (scans, exports from raw converters) as an image the servers take: JPEG at quality 90,
/// or PNG when it has alpha; 16-bit samples become 8-bit. Callers keep the original's SHA-256.
///
/// ```
/// # #[cfg(feature = "resize")] {
/// let mut tiff = std::io::Cursor::new(Vec::new());
/// image::RgbImage::new(40, 30).write_to(&mut tiff, image::ImageFormat::Tiff).unwrap();
/// let (jpeg, mime) = vlm_core::convert_tiff(tiff.get_ref()).unwrap();
/// assert_eq!((mime, &jpeg[..2]), (vlm_core::ImageMime::Jpeg, &[0xFF, 0xD8][..]));
/// # }
/// ```
#[cfg(feature = "resize")]
pub fn convert_tiff(bytes: &[u8]) -> Result<(Vec<u8>, ImageMime), String> {
    let image = image::load_from_memory_with_format(bytes, image::ImageFormat::Tiff)
        .map_err(|e| format!("cannot decode this TIFF to convert it: {e}"))?;
    let mut out = std::io::Cursor::new(Vec::new());
    let mime = if image.color().has_alpha() {
        image
            .to_rgba8()
            .write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| format!("cannot encode the converted TIFF: {e}"))?;
        ImageMime::Png
    } else {
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
            .encode_image(&image.to_rgb8())
            .map_err(|e| format!("cannot encode the converted TIFF: {e}"))?;
        ImageMime::Jpeg
    };
    Ok((out.into_inner(), mime))
}

/// Without the `resize` feature a TIFF cannot be converted: an error saying how to get it.
#[cfg(not(feature = "resize"))]
pub fn convert_tiff(_bytes: &[u8]) -> Result<(Vec<u8>, ImageMime), String> {
    Err(RESIZE_MISSING.to_owned())
}

/// Without the `resize` feature nothing can be shrunk: an error saying how to get it.
#[cfg(not(feature = "resize"))]
pub fn shrink_image(_bytes: &[u8], _max_edge: u32) -> Result<Option<(Vec<u8>, ImageMime)>, String> {
    Err(RESIZE_MISSING.to_owned())
}

/// What to do when resizing is asked for in a build without it.
pub const RESIZE_MISSING: &str = "resizing (vlm_max_image_edge / --max-image-edge) needs the \
`resize` feature: rebuild with `--features resize` (on by default in vlm-cli)";

/// Shrinks a loaded image on the blocking pool when `max_edge` asks for it (bytes only: a URL
/// is sent as it is).
pub async fn fit(
    image: crate::image::LoadedImage,
    max_edge: Option<u32>,
    name: String,
) -> Result<crate::image::LoadedImage, crate::error::VlmError> {
    use crate::image::LoadedImage;
    let (Some(edge), LoadedImage::Inline { data, .. }) = (max_edge, &image) else {
        return Ok(image);
    };
    let data = data.clone();
    let shrunk = tokio::task::spawn_blocking(move || shrink_image(&data, edge))
        .await
        .map_err(|e| crate::error::VlmError::image(name.clone(), format!("resizing failed: {e}")))?
        .map_err(|why| crate::error::VlmError::image(name, why))?;
    Ok(match shrunk {
        Some((data, mime)) => LoadedImage::Inline {
            data: data.into(),
            mime,
        },
        None => image,
    })
}

#[cfg(all(test, feature = "resize"))]
mod tests {
    use super::*;

    fn encoded(image: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn the_longer_edge_is_capped_photos_become_jpeg_and_alpha_stays_png() {
        let photo = encoded(
            image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
                400,
                100,
                image::Rgb([9, 99, 199]),
            )),
            image::ImageFormat::Png,
        );
        let (small, mime) = shrink_image(&photo, 100).unwrap().unwrap();
        assert_eq!(mime, ImageMime::Jpeg);
        let decoded = image::load_from_memory(&small).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (100, 25));

        let alpha = encoded(
            image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
                50,
                200,
                image::Rgba([1, 2, 3, 128]),
            )),
            image::ImageFormat::Png,
        );
        let (small, mime) = shrink_image(&alpha, 40).unwrap().unwrap();
        assert_eq!(mime, ImageMime::Png);
        let decoded = image::load_from_memory(&small).unwrap();
        assert_eq!(
            (
                decoded.width(),
                decoded.height(),
                decoded.color().has_alpha()
            ),
            (10, 40, true)
        );

        assert!(
            shrink_image(&photo, 400).unwrap().is_none(),
            "small enough: sent as it is"
        );
    }
}
