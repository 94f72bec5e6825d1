//! The task that drains one sink's outbox: in order, in small batches, retrying with
//! exponential backoff, never dropping an entry except for age (counted and logged).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_router::{Input, RouterHandle, SinkQueue, now_ms};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::Sink;

#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// Entries per delivery at most.
    pub batch: usize,
    pub max_age: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// For logs.
    pub kind: &'static str,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        RunnerSettings {
            batch: 64,
            max_age: Duration::from_secs(7 * 24 * 3600),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            kind: "custom",
        }
    }
}

pub fn spawn(
    queue: Arc<SinkQueue>,
    mut sink: Box<dyn Sink>,
    router: RouterHandle,
    settings: RunnerSettings,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = settings.backoff_min;
        let mut failing = false;
        loop {
            queue.wait().await;
            let batch = queue.peek(settings.batch);
            if batch.is_empty() {
                continue;
            }
            let oldest_allowed = now_ms().saturating_sub(settings.max_age.as_millis() as u64);
            let (expired, fresh): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|e| e.added_ms < oldest_allowed);
            if !expired.is_empty() {
                let ids: Vec<u64> = expired.iter().map(|e| e.id).collect();
                warn!(sink = %queue.id, dropped = ids.len(), "outbox entries older than outbox_max_age_secs dropped");
                queue.dropped.fetch_add(ids.len() as u64, Ordering::Relaxed);
                if !report(&queue, &router, ids).await {
                    return;
                }
                continue;
            }
            match sink.deliver(&fresh).await {
                Ok(()) => {
                    if failing {
                        info!(sink = %queue.id, kind = settings.kind, "sink delivering again");
                        failing = false;
                    }
                    backoff = settings.backoff_min;
                    queue.failing.store(false, Ordering::Relaxed);
                    queue
                        .delivered
                        .fetch_add(fresh.len() as u64, Ordering::Relaxed);
                    let ids = fresh.iter().map(|e| e.id).collect();
                    if !report(&queue, &router, ids).await {
                        return;
                    }
                }
                Err(e) => {
                    let delivered = e.delivered().min(fresh.len());
                    if delivered > 0 {
                        queue
                            .delivered
                            .fetch_add(delivered as u64, Ordering::Relaxed);
                        let ids = fresh[..delivered].iter().map(|e| e.id).collect();
                        if !report(&queue, &router, ids).await {
                            return;
                        }
                    }
                    queue.failures.fetch_add(1, Ordering::Relaxed);
                    queue.failing.store(true, Ordering::Relaxed);
                    warn!(sink = %queue.id, kind = settings.kind, error = %e, retry_in_ms = backoff.as_millis() as u64, waiting = queue.depth(), "sink delivery failed");
                    failing = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(settings.backoff_max);
                }
            }
        }
    })
}

/// Removes delivered (or expired) entries and has the router delete them from the store.
/// `false` when the router is gone.
async fn report(queue: &SinkQueue, router: &RouterHandle, ids: Vec<u64>) -> bool {
    queue.remove(&ids);
    router
        .inputs
        .send(Input::OutboxDelivered {
            sink: queue.id.clone(),
            ids,
        })
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use herald_router::{OutboxEntry, Router, RouterSettings};

    use super::*;
    use crate::{Delivery, SinkError};

    /// Takes two entries of its first batch, then fails; takes everything afterwards.
    struct Flaky {
        seen: Arc<Mutex<Vec<u64>>>,
        calls: usize,
    }

    impl Sink for Flaky {
        fn deliver<'a>(&'a mut self, entries: &'a [OutboxEntry]) -> Delivery<'a> {
            Box::pin(async move {
                self.calls += 1;
                for (taken, entry) in entries.iter().enumerate() {
                    if self.calls == 1 && taken == 2 {
                        return Err(SinkError::Failed("down".into()).after(taken));
                    }
                    self.seen.lock().expect("lock").push(entry.id);
                }
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_batch_that_fails_part_way_is_retried_from_the_first_entry_not_taken() {
        let queue = Arc::new(SinkQueue::new("flaky", 100));
        let store = Box::new(herald_store::MemoryStore::new());
        let (router, _task) =
            Router::start(RouterSettings::default(), store, vec![queue.clone()], None)
                .expect("router");
        for id in 1..=5 {
            queue.push(OutboxEntry {
                id,
                payload: Bytes::from_static(b"{}"),
                added_ms: now_ms(),
            });
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Flaky {
            seen: seen.clone(),
            calls: 0,
        };
        let settings = RunnerSettings {
            backoff_min: Duration::from_millis(10),
            ..RunnerSettings::default()
        };
        let _runner = spawn(queue.clone(), Box::new(sink), router, settings);
        for _ in 0..200 {
            if queue.depth() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            *seen.lock().expect("lock"),
            [1, 2, 3, 4, 5],
            "each entry once"
        );
        assert_eq!(queue.delivered.load(Ordering::Relaxed), 5);
    }
}
