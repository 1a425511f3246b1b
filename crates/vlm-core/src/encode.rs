//! Base64 into a buffer the caller sized: the image's bytes in a request body.
//!
//! On a CPU with AVX-512 VBMI (Intel Ice Lake and later, AMD Zen 4 and later) whole 48-byte
//! blocks are encoded with three byte-shuffling instructions each, the method of Muła and
//! Lemire ("Base64 encoding and decoding at almost the speed of a memory copy", 2019); the rest,
//! and every byte on other CPUs, goes through base64's SIMD engine (AVX2, NEON, else scalar).
//! Both write the same bytes: a block of 48 input bytes is exactly 64 characters, so where the
//! engine takes over it starts a fresh group of three.

use base64::Engine as _;

/// Encodes `data` (standard alphabet, padded) into `out`, which must hold
/// `base64::encoded_len(data.len(), true)` bytes; returns the bytes written.
pub(crate) fn encode_slice(data: &[u8], out: &mut [u8]) -> Result<usize, base64::EncodeSliceError> {
    let (read, written) = bulk(data, out);
    let rest = crate::image::engine().encode_slice(&data[read..], &mut out[written..])?;
    Ok(written + rest)
}

/// `prefix` followed by `data` in standard padded base64, encoded the fast way.
pub(crate) fn with_prefix(prefix: &str, data: &[u8]) -> String {
    let plain = || format!("{prefix}{}", crate::image::engine().encode(data));
    let Some(len) = base64::encoded_len(data.len(), true) else {
        return plain(); // not reached: a slice's length is at most isize::MAX
    };
    let mut out = Vec::with_capacity(prefix.len() + len);
    out.extend_from_slice(prefix.as_bytes());
    out.resize(prefix.len() + len, 0);
    let encoded = encode_slice(data, &mut out[prefix.len()..]).ok();
    // `None` is not reached (base64 is ASCII, and the room is the exact length).
    encoded
        .and_then(|_| String::from_utf8(out).ok())
        .unwrap_or_else(plain)
}

/// `data` in standard padded base64 (the alphabet with `+` and `/`), as the servers take an
/// image's bytes: AVX-512 VBMI when the CPU has it, else base64's SIMD engine.
///
/// ```
/// assert_eq!(vlm_core::support::encode_base64(b"GIF89a"), "R0lGODlh");
/// ```
pub fn encode_base64(data: &[u8]) -> String {
    with_prefix("", data)
}

/// Encodes the leading whole blocks the fast path takes: (bytes read, bytes written).
#[cfg(target_arch = "x86_64")]
fn bulk(data: &[u8], out: &mut [u8]) -> (usize, usize) {
    if vbmi::available() {
        // SAFETY: the CPU has every feature `vbmi::encode` is compiled for (checked just now).
        unsafe { vbmi::encode(data, out) }
    } else {
        (0, 0)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn bulk(_: &[u8], _: &mut [u8]) -> (usize, usize) {
    (0, 0)
}

#[cfg(target_arch = "x86_64")]
mod vbmi {
    use std::arch::x86_64::{
        _mm512_loadu_si512, _mm512_multishift_epi64_epi8, _mm512_permutexvar_epi8,
        _mm512_set1_epi64, _mm512_storeu_si512,
    };

    /// Whether this CPU runs [`encode`]. (std caches the detection: an atomic load.)
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vbmi")
    }

    pub(super) const ALPHABET: &[u8; 64] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Where each byte of the 16 lanes of 32 bits comes from: lane `k` holds its group of three
    /// input bytes `a b c` (at `3k`) as `b a c b`, so that each of the group's four 6-bit values
    /// lies in one run of bits: `a`'s top six at bit 10, `a`'s low two and `b`'s top four at
    /// bit 4, `b`'s low four and `c`'s top two at bit 22, `c`'s low six at bit 16.
    pub(super) const SPREAD: [u8; 64] = spread();

    const fn spread() -> [u8; 64] {
        let mut table = [0u8; 64];
        let mut k = 0;
        while k < 16 {
            let a = 3 * k as u8;
            table[4 * k] = a + 1;
            table[4 * k + 1] = a;
            table[4 * k + 2] = a + 2;
            table[4 * k + 3] = a + 1;
            k += 1;
        }
        table
    }

    /// The bit offsets of those runs in each 64-bit lane (two groups): 10, 4, 22, 16, then the
    /// same plus 32, one byte each, lowest first.
    pub(super) const OFFSETS: i64 = 0x3036_242a_1016_040a;

    /// Encodes 48-byte blocks of `data` into 64-byte runs of `out` for as long as 64 bytes can
    /// be loaded from `data` and stored into `out`; returns (bytes read, bytes written).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VBMI ([`available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn encode(data: &[u8], out: &mut [u8]) -> (usize, usize) {
        // SAFETY: both tables are 64 bytes, the width of one unaligned load.
        let spread = unsafe { _mm512_loadu_si512(SPREAD.as_ptr().cast()) };
        let alphabet = unsafe { _mm512_loadu_si512(ALPHABET.as_ptr().cast()) };
        let offsets = _mm512_set1_epi64(OFFSETS);
        let (mut read, mut written) = (0, 0);
        while read + 64 <= data.len() && written + 64 <= out.len() {
            // SAFETY: `data[read..read + 64]` is in bounds (the loop's condition).
            let block = unsafe { _mm512_loadu_si512(data.as_ptr().add(read).cast()) };
            let lanes = _mm512_permutexvar_epi8(spread, block);
            // Each output byte: eight bits from its lane's offset; the alphabet lookup below
            // reads only the low six.
            let sixes = _mm512_multishift_epi64_epi8(offsets, lanes);
            let chars = _mm512_permutexvar_epi8(sixes, alphabet);
            // SAFETY: `out[written..written + 64]` is in bounds (the loop's condition).
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(written).cast(), chars) };
            read += 48;
            written += 64;
        }
        (read, written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    /// `len` pseudo-random bytes (xorshift), the same every run.
    fn noise(len: usize) -> Vec<u8> {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn ours(data: &[u8]) -> String {
        let mut out = vec![0u8; base64::encoded_len(data.len(), true).unwrap()];
        let n = encode_slice(data, &mut out).unwrap();
        assert_eq!(n, out.len());
        String::from_utf8(out).unwrap()
    }

    /// Every length up to a few blocks past the fast path's first, and large ones, over bytes
    /// that take every value in every position of a group.
    #[test]
    fn writes_what_the_standard_engine_writes_at_every_length() {
        let data = noise(300_000);
        for len in (0..400).chain([4095, 4096, 4097, 65_536, 271_263, 300_000]) {
            assert_eq!(ours(&data[..len]), reference(&data[..len]), "length {len}");
        }
        let every: Vec<u8> = (0..=255u8).cycle().take(3 * 256 + 64).collect();
        assert_eq!(ours(&every), reference(&every));
    }

    #[test]
    fn strings_and_data_urls_are_encoded_alike() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(encode_base64(&data), reference(&data));
        assert_eq!(encode_base64(b""), "");
        assert_eq!(
            with_prefix("data:image/png;base64,", &data),
            format!("data:image/png;base64,{}", reference(&data))
        );
    }

    /// The three steps of the fast path done byte by byte from its tables, so that a wrong
    /// table fails on every CPU, not only on one with AVX-512 VBMI.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fast_paths_tables_encode_every_block_right() {
        let block_by_tables = |block: &[u8]| -> Vec<u8> {
            let lanes: Vec<u8> = vbmi::SPREAD.iter().map(|&i| block[i as usize]).collect();
            let mut chars = Vec::new();
            for qword in lanes.chunks(8) {
                let q = u64::from_le_bytes(qword.try_into().unwrap());
                for i in 0..8 {
                    // vpmultishiftqb: eight bits from the offset, wrapping within the qword.
                    let offset = (vbmi::OFFSETS as u64 >> (8 * i)) & 63;
                    let six = (q.rotate_right(offset as u32) & 63) as usize;
                    chars.push(vbmi::ALPHABET[six]);
                }
            }
            chars
        };
        for block in noise(48 * 2000).chunks(48) {
            assert_eq!(block_by_tables(block), reference(block).into_bytes());
        }
    }

    #[test]
    fn the_fast_path_is_taken_where_the_cpu_has_it() {
        #[cfg(target_arch = "x86_64")]
        if vbmi::available() {
            let data = vec![0xFBu8; 200];
            let mut out = vec![0u8; 268];
            // SAFETY: the features were detected just above.
            let (read, written) = unsafe { vbmi::encode(&data, &mut out) };
            assert_eq!(
                (read, written),
                (144, 192),
                "three blocks: a fourth would load past 200"
            );
            assert_eq!(&out[..192], reference(&data[..144]).as_bytes());
            return;
        }
        eprintln!("this CPU has no AVX-512 VBMI: only base64's engine is tested");
    }
}
