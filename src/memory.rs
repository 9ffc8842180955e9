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
//!
//! The limit leaves a debt: a thread that parks less than [`EVERY`] after
//! its last collection skips it, and if that park is the last one of a
//! burst (the gateway goes quiet), nothing would wake the thread to pay.
//! So a skipping thread records that it owes a collection and wakes the
//! [`keeper`], a task that sleeps [`EVERY`] and then wakes the runtime
//! once per owing thread; a thread woken then parks again, now due, and
//! collects. On the current-thread runtime that is the same thread, every
//! time. On the multi-threaded runtime the scheduler picks which idle
//! threads wake (with two threads, both); the keeper keeps trying for
//! [`TRIES`] periods, and a thread it does not reach pays at its next park
//! after any work.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How often a parking runtime thread gives its free pages back.
const EVERY: Duration = Duration::from_millis(100);

/// How many periods the keeper wakes the runtime for threads that still owe.
const TRIES: usize = 10;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runtime threads that skipped a collection and have not collected since.
static OWING: AtomicUsize = AtomicUsize::new(0);

/// Wakes the keeper when a thread starts owing.
static OWED: Notify = Notify::const_new();

thread_local! {
    /// When this thread last collected, and whether it owes one since.
    static LAST: Cell<(Option<Instant>, bool)> = const { Cell::new((None, false)) };
}

/// The runtime's `on_thread_park` hook.
pub fn on_park() {
    let now = Instant::now();
    let (last, owes) = LAST.get();
    let due = last.is_none_or(|t| now.duration_since(t) >= EVERY);
    if due {
        LAST.set((Some(now), false));
        if owes {
            OWING.fetch_sub(1, Ordering::Relaxed);
        }
        // SAFETY: `mi_collect` only walks this thread's own mimalloc heap
        // and returns pages with no live block in them (and arena memory
        // already free) to the kernel; it frees no live allocation, so no
        // Rust reference can be invalidated. It takes a plain bool and has
        // no other precondition.
        unsafe { libmimalloc_sys::mi_collect(true) }
    } else if !owes {
        LAST.set((last, true));
        OWING.fetch_add(1, Ordering::Relaxed);
        // Scheduling from the park hook is supported by both runtimes: the
        // thread sees the woken task and does not block.
        OWED.notify_one();
    }
}

/// Wakes the runtime for threads that skipped a collection (see the module
/// documentation); spawned once on the gateway's runtime, it runs for the
/// life of the process and costs nothing while no thread owes.
pub async fn keeper() {
    loop {
        OWED.notified().await;
        for _ in 0..TRIES {
            tokio::time::sleep(EVERY).await;
            let owing = OWING.load(Ordering::Relaxed);
            if owing == 0 {
                break;
            }
            // The keeper's own wake-up reaches one thread. Empty tasks, one
            // more than there are owing threads, reach idle others: on the
            // multi-threaded runtime a second task queued behind the first
            // wakes an idle thread to steal, which wakes the next while
            // work is left; a thread woken parks again and pays.
            for _ in 0..=owing {
                tokio::spawn(async {});
            }
        }
    }
}
