//! What every long-lived task hangs from: the tracker that lets shutdown
//! wait for them, the two stop signals, and the count of panics caught in
//! supervised tasks. Cloning is cheap (reference counts), so sessions,
//! fan-out channels and background services each keep their own handle,
//! and depend on this module rather than on the gateway's state.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::supervise::Panics;

#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Owns every connection, session, channel and background task, so
    /// shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown begins (before the grace period).
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period is over: live sessions are closed.
    pub hard_stop: CancellationToken,
    /// Panics caught in supervised background tasks.
    pub panics: Arc<Panics>,
}
