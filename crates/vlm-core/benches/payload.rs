//! Payload building throughput: the chat-completions body for one image of 1 KB, 256 KB and
//! 20 MB, beside a plain copy of the same bytes (the floor any client pays). Reported in bytes
//! of input image per second. `cargo xtask bench` runs it and writes docs/performance.md.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vlm_core::openai::{PayloadOptions, build_chat_body};
use vlm_core::{ImageMime, LoadedImage, VlmRequest};

fn image(len: usize) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0];
    v.extend((4..len).map(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    }));
    v
}

fn payload(c: &mut Criterion) {
    let request = VlmRequest::builder(
        "Describe any residual colour in this photograph, which is meant to be monochrome.",
    )
    .max_tokens(300)
    .temperature(0.1)
    .build()
    .unwrap_or_else(|e| panic!("{e}"));
    let mut group = c.benchmark_group("payload");
    for (name, len) in [
        ("1KB", 1024),
        ("256KB", 256 * 1024),
        ("20MB", 20 * 1024 * 1024),
    ] {
        let bytes = image(len);
        let loaded = [LoadedImage::Inline {
            data: bytes.clone().into(),
            mime: ImageMime::Jpeg,
        }];
        group.throughput(Throughput::Bytes(len as u64));
        if len > 1 << 20 {
            group.sample_size(20);
        }
        group.bench_with_input(
            BenchmarkId::new("build_chat_body", name),
            &loaded,
            |b, loaded| {
                b.iter(|| {
                    build_chat_body(
                        black_box(&request),
                        black_box(loaded),
                        PayloadOptions::new(Some("m")),
                    )
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("memcpy", name), &bytes, |b, bytes| {
            b.iter(|| {
                let mut out = Vec::with_capacity(bytes.len());
                out.extend_from_slice(black_box(bytes));
                out
            })
        });
    }
    group.finish();
}

criterion_group!(benches, payload);
criterion_main!(benches);
