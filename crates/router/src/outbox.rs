//! Each sink's outbox as the router and the sink's task share it: entries already durable in
//! the store, in id order, waiting to be delivered. The router appends (after commit) and drops
//! the oldest on overflow; the sink task reads from the front and reports what it delivered, which
//! the router then deletes from the store.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::Notify;

/// One durable entry of a sink's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Global, increasing: delivery order.
    pub id: u64,
    /// The JSON document to deliver.
    pub payload: Bytes,
    /// When it was added, ms since the Unix epoch.
    pub added_ms: u64,
}

/// A sink's outbox queue. The lock is held only to copy or remove entries, never across an await.
#[derive(Debug)]
pub struct SinkQueue {
    pub id: String,
    max_entries: usize,
    entries: Mutex<VecDeque<OutboxEntry>>,
    notify: Notify,
    /// Entries dropped because the outbox was full or too old.
    pub dropped: AtomicU64,
    /// Entries delivered.
    pub delivered: AtomicU64,
    /// Failed delivery attempts.
    pub failures: AtomicU64,
    /// Set while the sink's last delivery attempt failed.
    pub failing: std::sync::atomic::AtomicBool,
}

impl SinkQueue {
    pub fn new(id: impl Into<String>, max_entries: usize) -> SinkQueue {
        SinkQueue {
            id: id.into(),
            max_entries: max_entries.max(1),
            entries: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<OutboxEntry>> {
        // A panic while holding this lock cannot leave the deque half-changed.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends an entry; returns the oldest one if it had to make room.
    pub fn push(&self, entry: OutboxEntry) -> Option<OutboxEntry> {
        let dropped = {
            let mut entries = self.lock();
            let dropped = (entries.len() >= self.max_entries)
                .then(|| entries.pop_front())
                .flatten();
            entries.push_back(entry);
            dropped
        };
        if dropped.is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.notify_one();
        dropped
    }

    /// Copies of up to `max` entries from the front.
    pub fn peek(&self, max: usize) -> Vec<OutboxEntry> {
        self.lock().iter().take(max).cloned().collect()
    }

    /// Removes the entries with these ids (delivered, or dropped for age).
    ///
    /// Entries are in id order and are delivered from the front, so the ids are nearly always
    /// a prefix: popped without looking at the rest of the outbox (a backlog of 100,000 entries
    /// drained 64 at a time must not be scanned once per batch). Ids below the new front are
    /// gone already (dropped for room); only ids past it need a scan.
    pub fn remove(&self, ids: &[u64]) {
        let mut entries = self.lock();
        while entries.front().is_some_and(|e| ids.contains(&e.id)) {
            entries.pop_front();
        }
        if let Some(front) = entries.front().map(|e| e.id)
            && ids.iter().any(|id| *id > front)
        {
            entries.retain(|e| !ids.contains(&e.id));
        }
    }

    /// Waits until the outbox may have entries.
    pub async fn wait(&self) {
        if self.depth() > 0 {
            return;
        }
        self.notify.notified().await;
    }

    /// Entries waiting.
    pub fn depth(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> OutboxEntry {
        OutboxEntry {
            id,
            payload: Bytes::from_static(b"e"),
            added_ms: 0,
        }
    }

    fn ids(queue: &SinkQueue) -> Vec<u64> {
        queue.peek(usize::MAX).iter().map(|e| e.id).collect()
    }

    #[test]
    fn removal_takes_a_prefix_skips_gone_ids_and_finds_later_ones() {
        let queue = SinkQueue::new("s", 4);
        for id in 1..=5 {
            queue.push(entry(id));
        }
        // 1 was dropped for room; removing 1 and 2 removes 2.
        assert_eq!(ids(&queue), [2, 3, 4, 5]);
        queue.remove(&[1, 2]);
        assert_eq!(ids(&queue), [3, 4, 5]);
        // Not a prefix: 4 alone.
        queue.remove(&[4]);
        assert_eq!(ids(&queue), [3, 5]);
        queue.remove(&[3, 5]);
        assert_eq!(queue.depth(), 0);
        queue.remove(&[9]);
        assert_eq!(queue.depth(), 0);
    }
}
