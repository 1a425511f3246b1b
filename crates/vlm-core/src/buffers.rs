//! Buffers reused from one request to the next: request bodies, and the narrator's file reads.
//!
//! A body with an image is hundreds of kilobytes: above glibc's mmap threshold, so a fresh
//! buffer per request is an `mmap`, a page fault and a kernel zero-fill for every 4 KiB page,
//! then an `munmap`, on every request. A body handed to the HTTP stack is a [`Bytes`] whose
//! owner gives its buffer back here when the last copy is dropped (after the last retry), so
//! the next request writes into pages that are already there.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

/// Buffers kept at most.
const MAX_KEPT: usize = 64;
/// A buffer larger than this (a 20 MB image's body) is not kept.
const MAX_BUFFER: usize = 8 << 20;
/// Capacity kept in all, at most.
const MAX_TOTAL: usize = 64 << 20;

/// Free buffers, shared by one client's requests (or one run's file reads).
#[derive(Debug, Default)]
pub struct BufferPool {
    free: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    buffers: Vec<Vec<u8>>,
    capacity: usize,
}

impl BufferPool {
    /// A buffer with room for `capacity` bytes: the one given back last (its pages warmest),
    /// still holding its last body (the builder writes over it, so those bytes need no
    /// zero-fill), or a new, empty one.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.lock();
            let buffer = free.buffers.pop();
            if let Some(b) = &buffer {
                free.capacity -= b.capacity();
            }
            buffer
        };
        match reused {
            Some(mut buffer) => {
                buffer.reserve(capacity.saturating_sub(buffer.len()));
                buffer
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// `buffer` as the body to send; its allocation comes back to this pool when the last
    /// clone of the `Bytes` is dropped.
    pub fn freeze(self: &Arc<Self>, buffer: Vec<u8>) -> Bytes {
        if buffer.capacity() > MAX_BUFFER {
            return Bytes::from(buffer);
        }
        Bytes::from_owner(Lent {
            buffer,
            pool: Arc::downgrade(self),
        })
    }

    fn give_back(&self, buffer: Vec<u8>) {
        let mut free = self.lock();
        if free.buffers.len() < MAX_KEPT && free.capacity + buffer.capacity() <= MAX_TOTAL {
            free.capacity += buffer.capacity();
            free.buffers.push(buffer);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A body lent to the HTTP stack.
struct Lent {
    buffer: Vec<u8>,
    pool: Weak<BufferPool>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(std::mem::take(&mut self.buffer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_comes_back_when_its_last_clone_is_dropped_and_is_reused() {
        let pool = Arc::new(BufferPool::default());
        let mut buffer = pool.take(300_000);
        buffer.extend_from_slice(b"{\"a\":1}");
        let address = buffer.as_ptr();
        let body = pool.freeze(buffer);
        let retry = body.clone();
        drop(body);
        assert_eq!(pool.lock().buffers.len(), 0, "a clone is still out");
        assert_eq!(&retry[..], b"{\"a\":1}");
        drop(retry);
        assert_eq!(pool.lock().buffers.len(), 1);
        let again = pool.take(1000);
        assert_eq!(again, b"{\"a\":1}", "kept as it was, to be written over");
        assert!(again.capacity() >= 300_000);
        assert_eq!(again.as_ptr(), address, "the same allocation");
        // Too large to keep: a plain body.
        let big = pool.freeze(Vec::with_capacity(MAX_BUFFER + 1));
        drop(big);
        assert_eq!(pool.lock().buffers.len(), 0);
    }
}
