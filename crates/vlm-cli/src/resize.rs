//! `--max-image-edge`: images larger than the model needs are shrunk before they are sent
//! (the `resize` feature). The record's `sha256` stays that of the file on disk.

use vlm_core::ImageMime;

/// JPEG quality of a shrunk photo.
const JPEG_QUALITY: u8 = 90;

/// `bytes` shrunk so that the longer edge is at most `max_edge`, keeping the aspect ratio:
/// photos re-encoded as JPEG, images with alpha as PNG. `Ok(None)` when it is small enough.
#[cfg(feature = "resize")]
pub fn shrink(bytes: &[u8], max_edge: u32) -> Result<Option<(Vec<u8>, ImageMime)>, String> {
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
        let rgb = small.to_rgb8();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
            .encode_image(&rgb)
            .map_err(|e| format!("cannot encode the resized image: {e}"))?;
        ImageMime::Jpeg
    };
    Ok(Some((out.into_inner(), mime)))
}

/// Without the `resize` feature nothing is shrunk; the setting is refused up front.
#[cfg(not(feature = "resize"))]
pub fn shrink(_bytes: &[u8], _max_edge: u32) -> Result<Option<(Vec<u8>, ImageMime)>, String> {
    Err("this vlm was built without the `resize` feature".to_owned())
}

/// Refuses `--max-image-edge` in a build that cannot resize.
pub fn check_available(max_edge: Option<u32>) -> Result<(), crate::Failure> {
    if max_edge.is_some() && !cfg!(feature = "resize") {
        return Err(crate::Failure::usage(
            "--max-image-edge (vlm_max_image_edge) needs the `resize` feature: rebuild vlm with \
             `--features resize` (on by default)",
        ));
    }
    Ok(())
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
        let (small, mime) = shrink(&photo, 100).unwrap().unwrap();
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
        let (small, mime) = shrink(&alpha, 40).unwrap().unwrap();
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
            shrink(&photo, 400).unwrap().is_none(),
            "small enough: sent as it is"
        );
    }
}
