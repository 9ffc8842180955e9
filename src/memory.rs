//! Giving freed memory back to the system (part of the binary, not the
//! library: the library forbids `unsafe`, and this needs two glibc calls).
//!
//! glibc's malloc keeps memory that sessions freed in its arenas for reuse;
//! only the top of each heap shrinks by itself, so after a burst of
//! connections closes RSS stays at its peak (reused, never leaked, but
//! operators watch RSS). A watcher thread reads how much sits free and how
//! much is in use (`mallinfo2`) every few seconds. When, on two looks in a
//! row, free memory has grown by `MIN_FREED` since the last trim and exceeds
//! what is in use (load went away; not the churn of a busy gateway, whose
//! freed buffers are about to be reused), it calls `malloc_trim(0)`, which
//! returns every whole free page of every arena (`MADV_DONTNEED`).
//! Allocation itself is untouched, so the memory a live session costs stays
//! what it was, and a steady load never pays for pages given back and
//! faulted in again.

use std::time::Duration;

/// How often the watcher looks.
const EVERY: Duration = Duration::from_secs(5);
/// Free memory that must have appeared since the last trim to trim again.
const MIN_FREED: usize = 4 << 20;

/// Starts the watcher thread (Linux with glibc only; elsewhere nothing).
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("upgate-trim".into())
            .spawn(|| {
                let (mut baseline, _) = usage();
                let mut seen = false;
                loop {
                    std::thread::sleep(EVERY);
                    let (free, used) = usage();
                    let worth = free >= baseline.saturating_add(MIN_FREED) && free > used;
                    if worth && seen {
                        trim();
                        tracing::debug!(free_mib = free >> 20, "returned free heap memory");
                        baseline = usage().0;
                        seen = false;
                    } else {
                        seen = worth;
                        // Reused since: a later rise counts from here.
                        baseline = baseline.min(free);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the memory trimmer");
        }
    }
}

/// Bytes free in malloc's arenas (not yet given back), and bytes in use.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn usage() -> (usize, usize) {
    // SAFETY: `mallinfo2` (glibc >= 2.33) takes no arguments, only reads
    // malloc's own statistics under its arena locks, and returns a plain
    // struct by value; it has no preconditions.
    let info = unsafe { libc::mallinfo2() };
    (info.fordblks, info.uordblks)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: `malloc_trim` only releases free pages back to the kernel,
    // under malloc's own locks; it never touches memory that is allocated,
    // so no Rust reference can be invalidated. Any `pad` is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}
