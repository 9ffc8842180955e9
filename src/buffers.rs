//! The per-thread pool of copy buffers: the splice, the frames relay and
//! the edge's TLS stream borrow a buffer for one read and its write and
//! give it back as soon as a read would block, so an idle connection holds
//! none.

use std::cell::RefCell;

/// Size of a pooled copy buffer.
pub const BUF_SIZE: usize = 32 * 1024;
// Positions in a buffer are kept as `u32`.
const _: () = assert!(BUF_SIZE <= u32::MAX as usize);
/// Buffers kept for reuse per runtime thread; beyond this they are freed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A pooled buffer, returned to this thread's pool on drop.
pub(crate) struct Buf(Option<Box<[u8]>>);

impl Buf {
    /// A `BUF_SIZE` buffer from this thread's pool (a new one if it is empty).
    pub(crate) fn take() -> Buf {
        let b = POOL.with(|p| p.borrow_mut().pop());
        Buf(Some(
            b.unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice()),
        ))
    }
    pub(crate) fn bytes(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
    /// A buffer of exactly `len` bytes, not from the pool (nor returned to it
    /// unless it is `BUF_SIZE` long): a small copy kept while a TLS record
    /// arrives in pieces.
    pub(crate) fn exact(bytes: &[u8]) -> Buf {
        Buf(Some(bytes.into()))
    }
    /// A pooled buffer starting with a copy of `bytes` (at most `BUF_SIZE`).
    pub(crate) fn pooled_copy(bytes: &[u8]) -> Buf {
        let mut b = Buf::take();
        let n = bytes.len().min(BUF_SIZE);
        b.bytes()[..n].copy_from_slice(&bytes[..n]);
        b
    }
    pub(crate) fn len(&self) -> usize {
        self.0.as_deref().map_or(0, <[u8]>::len)
    }
    /// Grows the buffer to `len` bytes, keeping its first `keep` bytes.
    pub(crate) fn grow(&mut self, len: usize, keep: usize) {
        let mut bigger = vec![0u8; len].into_boxed_slice();
        let old = self.bytes();
        let keep = keep.min(old.len()).min(len);
        bigger[..keep].copy_from_slice(&old[..keep]);
        // The old buffer goes back to the pool (if it is a pooled one).
        drop(std::mem::replace(self, Buf(Some(bigger))));
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // Only `BUF_SIZE` buffers are pooled: grown or exact ones are freed.
        if let Some(b) = self.0.take().filter(|b| b.len() == BUF_SIZE) {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(b);
                }
            });
        }
    }
}

/// Buffers in this thread's pool (for tests).
#[cfg(test)]
pub(crate) fn pooled() -> usize {
    POOL.with(|p| p.borrow().len())
}
