//! Group commit: one thread owns the [`Store`] and applies every batch that queued up while it
//! was busy as one (with `RedbStore`, one record of its write-ahead log). The router stages ops
//! under a ticket, sends the batch without blocking on the disk, and learns through a
//! [`Report`] when tickets are durable; only then does it send the acknowledgements that depend
//! on them.

use std::thread::JoinHandle;

use herald_store::{Op, Store};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

/// How many queued requests one commit may take at most.
const MAX_REQUESTS_PER_COMMIT: usize = 512;

/// One entry of a client's presence history: (seq, time in ms, event JSON).
pub type HistoryEntry = (u64, u64, bytes::Bytes);

enum Request {
    Apply {
        ticket: u64,
        ops: Vec<Op>,
    },
    Flush {
        done: Option<oneshot::Sender<()>>,
    },
    /// A read, answered after the writes queued before it.
    History {
        client_id: String,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<HistoryEntry>, String>>,
    },
    /// Single events by `(client id, seq)`, answered after the writes queued before it.
    Events {
        wanted: Vec<(String, u64)>,
        reply: oneshot::Sender<Result<Vec<Option<bytes::Bytes>>, String>>,
    },
}

/// Reads presence history through the storage thread. Holds no strong reference to it, so the
/// thread still ends when the router does.
#[derive(Debug, Clone)]
pub struct HistoryReader {
    tx: mpsc::WeakSender<Request>,
}

impl HistoryReader {
    /// Events of `client_id` with `from_ms <= time <= to_ms`, oldest first, at most `limit`.
    pub async fn history(
        &self,
        client_id: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, String> {
        let tx = self.tx.upgrade().ok_or("the broker is shutting down")?;
        let (reply, rx) = oneshot::channel();
        let request = Request::History {
            client_id: client_id.to_string(),
            from_ms,
            to_ms,
            limit,
            reply,
        };
        tx.send(request)
            .await
            .map_err(|_| "the broker is shutting down")?;
        rx.await
            .map_err(|_| "the storage thread stopped".to_string())?
    }

    /// The stored events `(client id, seq)`, each `None` where there is none, in the order
    /// asked for.
    pub async fn events(
        &self,
        wanted: Vec<(String, u64)>,
    ) -> Result<Vec<Option<bytes::Bytes>>, String> {
        let tx = self.tx.upgrade().ok_or("the broker is shutting down")?;
        let (reply, rx) = oneshot::channel();
        tx.send(Request::Events { wanted, reply })
            .await
            .map_err(|_| "the broker is shutting down")?;
        rx.await
            .map_err(|_| "the storage thread stopped".to_string())?
    }
}

/// What the writer thread tells the router after each commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Every ticket up to and including `up_to` is durable.
    Committed { up_to: u64 },
    /// Tickets `from..=to` could not be written; their acknowledgements must not be sent.
    Failed { from: u64, to: u64, error: String },
}

/// The router's side of the writer thread.
pub struct Persister {
    tx: mpsc::Sender<Request>,
    staged: Vec<Op>,
    /// The ticket the staged ops will be sent under.
    next_ticket: u64,
}

/// Starts the writer thread. Reports arrive on the returned receiver; the thread ends, after
/// closing the store ([`Store::close`]), when the `Persister` is dropped.
#[allow(clippy::type_complexity)]
pub fn start(
    mut store: Box<dyn Store>,
) -> std::io::Result<(Persister, mpsc::UnboundedReceiver<Report>, JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Request>(1024);
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("herald-store".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut requests = vec![first];
                while requests.len() < MAX_REQUESTS_PER_COMMIT {
                    match rx.try_recv() {
                        Ok(request) => requests.push(request),
                        Err(_) => break,
                    }
                }
                commit(store.as_mut(), requests, &report_tx);
            }
            if let Err(e) = store.close() {
                error!(error = %e, "closing the storage at shutdown failed");
            }
        })?;
    let persister = Persister {
        tx,
        staged: Vec::new(),
        next_ticket: 1,
    };
    Ok((persister, report_rx, thread))
}

fn commit(store: &mut dyn Store, requests: Vec<Request>, reports: &mpsc::UnboundedSender<Report>) {
    let mut ops = Vec::new();
    let mut tickets: Option<(u64, u64)> = None;
    let mut flushes = Vec::new();
    let mut reads = Vec::new();
    for request in requests {
        match request {
            Request::Apply { ticket, ops: batch } => {
                // The first batch's list becomes the group's, instead of a copy of it.
                if ops.is_empty() {
                    ops = batch;
                } else {
                    ops.extend(batch);
                }
                tickets = Some(tickets.map_or((ticket, ticket), |(from, _)| (from, ticket)));
            }
            Request::Flush { done } => flushes.push(done),
            read @ (Request::History { .. } | Request::Events { .. }) => reads.push(read),
        }
    }
    if let Some((from, to)) = tickets {
        let report = match store.apply(&ops) {
            Ok(()) => Report::Committed { up_to: to },
            Err(e) => {
                error!(error = %e, from, to, ops = ops.len(), "storage write failed; the affected acknowledgements are withheld");
                Report::Failed {
                    from,
                    to,
                    error: e.to_string(),
                }
            }
        };
        // The router may be gone at shutdown; nothing is left to tell then.
        let _ = reports.send(report);
    }
    if !flushes.is_empty() {
        if let Err(e) = store.flush() {
            error!(error = %e, "storage flush failed");
        }
        for done in flushes.into_iter().flatten() {
            let _ = done.send(());
        }
    }
    for read in reads {
        match read {
            Request::History {
                client_id,
                from_ms,
                to_ms,
                limit,
                reply,
            } => {
                let result = store
                    .history(&client_id, from_ms, to_ms, limit)
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            Request::Events { wanted, reply } => {
                let result = store.history_entries(&wanted).map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            Request::Apply { .. } | Request::Flush { .. } => {}
        }
    }
}

impl Persister {
    /// A handle for history reads.
    pub fn reader(&self) -> HistoryReader {
        HistoryReader {
            tx: self.tx.downgrade(),
        }
    }

    /// Adds an op to the open batch and returns the ticket it will be durable under.
    pub fn stage(&mut self, op: Op) -> u64 {
        self.staged.push(op);
        self.next_ticket
    }

    /// The ticket of the open batch, if it has ops.
    pub fn open_ticket(&self) -> Option<u64> {
        (!self.staged.is_empty()).then_some(self.next_ticket)
    }

    /// The last ticket sent to the writer (0 if none).
    pub fn last_sent_ticket(&self) -> u64 {
        self.next_ticket - 1
    }

    /// Sends the open batch to the writer. Waits only when the writer is 1024 batches behind:
    /// that is the backpressure of a slow disk.
    pub async fn send_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.staged);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if self.tx.send(Request::Apply { ticket, ops }).await.is_err() {
            error!(ticket, "storage thread is gone; batch not written");
        }
    }

    /// Asks the writer to make everything durable against power loss; answers when done.
    pub async fn flush(&mut self) -> oneshot::Receiver<()> {
        self.send_staged().await;
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Request::Flush { done: Some(done) }).await;
        rx
    }

    /// A flush that nobody waits for (the interval timer).
    pub async fn flush_in_background(&mut self) {
        self.send_staged().await;
        let _ = self.tx.send(Request::Flush { done: None }).await;
    }
}
