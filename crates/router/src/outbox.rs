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
    pub fn remove(&self, ids: &[u64]) {
        self.lock().retain(|e| !ids.contains(&e.id));
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
