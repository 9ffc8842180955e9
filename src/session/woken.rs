//! A future polled only when it asked to be: what ends a session besides its
//! peers (the gateway's hard stop, the backend going down, the route retired,
//! the token expiring) waits beside the splice in one `select!`, and a plain
//! `select!` polls every branch each time the task wakes, which for a
//! session is every message. A cancellation token's wait takes its token's
//! mutex on every poll (tokio's `Notify` checks its waiter under the lock),
//! and the hard stop's token is shared by every session on the gateway, so
//! three such polls per message cost both cores a contended lock each.
//! [`Woken`] gives the inner future a waker of its own and polls it again
//! only after that waker fired: a message costs one `AtomicWaker` update.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::{waker_ref, ArcWake, AtomicWaker};

/// Polls `F` on its first poll and then only after `F`'s own waker fired.
pub struct Woken<F> {
    inner: F,
    flag: Arc<Flag>,
}

/// The inner future's waker: remembers that it fired and wakes the task.
struct Flag {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for Flag {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.fired.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

impl<F: Future + Unpin> Woken<F> {
    pub fn new(inner: F) -> Woken<F> {
        Woken {
            inner,
            flag: Arc::new(Flag {
                // Set: the first poll polls the inner future, which registers
                // its own waker wherever it waits.
                fired: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future + Unpin> Future for Woken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read, so a wake between the two is
        // not lost: it finds this task's waker and wakes it again.
        self.flag.task.register(cx.waker());
        if !self.flag.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        let waker = waker_ref(&this.flag);
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `open` is set, waking through the waker
    /// it was last polled with.
    struct Gate {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<std::task::Waker>>>,
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            if let Ok(mut w) = self.waker.lock() {
                *w = Some(cx.waker().clone());
            }
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_inner_future_is_polled_only_when_it_woke() {
        let polls = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(std::sync::Mutex::new(None));
        let gate = Gate {
            polls: polls.clone(),
            open: open.clone(),
            waker: waker.clone(),
        };
        let mut woken = Woken::new(gate);
        let noop = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&noop);
        // First poll: polled once.
        assert!(Pin::new(&mut woken).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // The task woke for something else: the inner future is left alone.
        for _ in 0..10 {
            assert!(Pin::new(&mut woken).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // It wakes itself: the next poll reaches it, and it is ready.
        open.store(true, Ordering::SeqCst);
        let w = waker.lock().ok().and_then(|mut w| w.take());
        w.expect("the inner future left a waker").wake();
        assert!(Pin::new(&mut woken).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancelled_token_ends_the_wait_in_a_select() {
        let token = tokio_util::sync::CancellationToken::new();
        let wait = std::pin::pin!(token.cancelled());
        let mut woken = Woken::new(wait);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(4);
        let cancel = token.clone();
        let sender = tokio::spawn(async move {
            for i in 0..3 {
                let _ = tx.send(i).await;
                tokio::task::yield_now().await;
            }
            cancel.cancel();
            // Keep the channel open so only the token can end the select.
            std::future::pending::<()>().await;
        });
        let mut got = 0;
        loop {
            tokio::select! {
                biased;
                Some(_) = rx.recv() => got += 1,
                _ = &mut woken => break,
            }
        }
        assert_eq!(got, 3);
        sender.abort();
    }
}
