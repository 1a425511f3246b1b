//! Resizing throughput: a 12-megapixel JPEG (4000x3000) shrunk to a 1024 px longer edge, as
//! `--max-image-edge 1024` does before sending a photo.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

fn photo() -> Vec<u8> {
    // A smooth gradient with some texture: JPEG-like content, deterministic.
    let img = image::RgbImage::from_fn(4000, 3000, |x, y| {
        let t = ((x ^ y) & 0x1f) as u8;
        image::Rgb([(x / 16) as u8 ^ t, (y / 12) as u8, ((x + y) / 28) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .expect("encode the bench photo");
    out.into_inner()
}

fn resize(c: &mut Criterion) {
    let jpeg = photo();
    let mut group = c.benchmark_group("resize");
    group.sample_size(10);
    group.bench_function("12MP_jpeg_to_1024", |b| {
        b.iter(|| vlm_core::shrink_image(black_box(&jpeg), 1024))
    });
    group.finish();
}

criterion_group!(benches, resize);
criterion_main!(benches);
