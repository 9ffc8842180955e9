//! Giving freed memory back to the system (part of the binary, not the
//! library: the library forbids `unsafe`, and this needs two glibc calls).
//!
//! glibc's malloc keeps memory that sessions freed in its arenas for reuse;
//! only the top of each heap shrinks by itself, so after a burst of
//! connections closes RSS stays at its peak (reused, never leaked, but
//! operators watch RSS). A watcher thread reads how much sits free
//! (`mallinfo2`) every few seconds, and when that grew by `MIN_FREED` since
//! it last looked calls `malloc_trim(0)`, which returns every whole free page
//! of every arena (`MADV_DONTNEED`). Allocation itself is untouched, so the
//! memory a live session costs stays what it was.

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
                let mut baseline = free_bytes();
                loop {
                    std::thread::sleep(EVERY);
                    let free = free_bytes();
                    if free >= baseline.saturating_add(MIN_FREED) {
                        trim();
                        tracing::debug!(freed_mib = free >> 20, "returned free heap memory");
                        baseline = free_bytes();
                    } else {
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

/// Bytes free in malloc's arenas (not yet given back).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_bytes() -> usize {
    // SAFETY: `mallinfo2` (glibc >= 2.33) takes no arguments, only reads
    // malloc's own statistics under its arena locks, and returns a plain
    // struct by value; it has no preconditions.
    let info = unsafe { libc::mallinfo2() };
    info.fordblks
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
