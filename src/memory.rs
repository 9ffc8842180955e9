//! The binary's allocator, and giving freed memory back to the system (part
//! of the binary, not the library: the library forbids `unsafe`, and this
//! needs one call into mimalloc).
//!
//! mimalloc serves the gateway instead of glibc's malloc: it keeps blocks
//! of one size together, so an idle session's small, long-lived
//! allocations (its task, its socket registrations) do not end up spread
//! among the freed buffers of the handshakes around them, and it gives
//! whole free pages back to the kernel itself. It does so lazily, though:
//! a page freed during a burst is returned after a short delay, but only
//! when the thread next allocates or frees. A gateway that goes quiet
//! after a burst of connections would keep those pages. So each runtime
//! thread, when it runs out of work and parks, collects at most once per
//! [`EVERY`]: pages emptied since are returned at once. A busy thread
//! rarely parks and pays for one clock read per park; allocation itself is
//! untouched.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often a parking runtime thread gives its free pages back.
const EVERY: Duration = Duration::from_millis(100);

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

thread_local! {
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The runtime's `on_thread_park` hook.
pub fn on_park() {
    let now = Instant::now();
    let due = LAST.with(|last| match last.get() {
        Some(t) if now.duration_since(t) < EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: `mi_collect` only walks this thread's own mimalloc heap
        // and returns pages with no live block in them (and arena memory
        // already free) to the kernel; it frees no live allocation, so no
        // Rust reference can be invalidated. It takes a plain bool and has
        // no other precondition.
        unsafe { libmimalloc_sys::mi_collect(true) }
    }
}
