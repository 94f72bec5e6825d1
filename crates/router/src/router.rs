//! The router task: its state, its loop, and the acknowledgements that wait for the disk.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_protocol::{ClientId, Packet, QoS, Topic};
use herald_store::{Op, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::persist::{self, Persister, Report};
use crate::session::{Queued, Session};
use crate::tree::SubscriptionTree;
use crate::types::{ChannelId, CloseReason, Event, Input, Message, RouterSettings};

/// Counters the router keeps; read by the admin side and the tests.
#[derive(Debug, Default)]
pub struct RouterStats {
    pub connections: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    /// QoS 0 messages dropped because the subscriber was offline or its outbox full.
    pub qos0_dropped: AtomicU64,
    /// Queued messages dropped because a session's queue was full.
    pub queue_dropped: AtomicU64,
    /// Queued messages dropped for their age.
    pub queue_expired: AtomicU64,
    /// Presence events dropped because their consumer was full.
    pub events_dropped: AtomicU64,
}

impl RouterStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// How connection tasks reach the router.
#[derive(Debug, Clone)]
pub struct RouterHandle {
    pub inputs: mpsc::Sender<Input>,
    pub stats: Arc<RouterStats>,
}

impl RouterHandle {
    /// Closes every channel, makes everything durable and waits for the router to stop.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.inputs.send(Input::Shutdown { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// An acknowledgement that waits for a ticket to be durable (or for earlier ones of the same
/// channel, to keep their order).
pub(crate) enum Deferred {
    Send(Packet),
    /// A SUBACK, then the retained messages the new subscriptions match.
    SubAck(Packet, Vec<(Message, QoS)>),
}

struct Pending {
    ticket: u64,
    channel: ChannelId,
    action: Deferred,
}

/// The broker's state. Owned by one task; see the crate docs.
pub struct Router {
    pub(crate) settings: RouterSettings,
    pub(crate) sessions: HashMap<ClientId, Session>,
    pub(crate) channels: HashMap<ChannelId, ClientId>,
    pub(crate) tree: SubscriptionTree,
    pub(crate) retained: BTreeMap<String, Message>,
    pub(crate) persister: Persister,
    pub(crate) next_seq: u64,
    pub(crate) stats: Arc<RouterStats>,
    events: Option<mpsc::Sender<Event>>,
    pending: VecDeque<Pending>,
    pending_per_channel: HashMap<ChannelId, usize>,
}

impl Router {
    /// Loads the store, starts the storage thread and the router task.
    pub fn start(
        settings: RouterSettings,
        mut store: Box<dyn Store>,
        events: Option<mpsc::Sender<Event>>,
    ) -> Result<(RouterHandle, JoinHandle<()>), StoreError> {
        let snapshot = store.load()?;
        let (persister, reports, thread) = persist::start(store)
            .map_err(|e| StoreError::Engine(format!("cannot start the storage thread: {e}")))?;
        let stats = Arc::new(RouterStats::default());
        let mut router = Router {
            settings,
            sessions: HashMap::new(),
            channels: HashMap::new(),
            tree: SubscriptionTree::default(),
            retained: BTreeMap::new(),
            persister,
            next_seq: snapshot.next_seq,
            stats: stats.clone(),
            events,
            pending: VecDeque::new(),
            pending_per_channel: HashMap::new(),
        };
        router.restore(snapshot);
        let (tx, rx) = mpsc::channel(4096);
        let task = tokio::spawn(async move {
            router.run(rx, reports).await;
            // Dropping the router drops the persister; the thread flushes and ends.
            drop(router);
            if tokio::task::spawn_blocking(move || thread.join())
                .await
                .is_err()
            {
                error!("storage thread did not end cleanly");
            }
        });
        Ok((RouterHandle { inputs: tx, stats }, task))
    }

    fn restore(&mut self, snapshot: herald_store::Snapshot) {
        let mut queues: HashMap<String, Vec<(u64, herald_store::StoredMessage)>> =
            snapshot.queues.into_iter().collect();
        let count = snapshot.sessions.len();
        for (id, record) in snapshot.sessions {
            let client = match ClientId::parse_any(&id, usize::MAX) {
                Ok(client) => client,
                Err(e) => {
                    warn!(client_id = %id, error = %e, "stored session has an unusable client id; skipped");
                    continue;
                }
            };
            let mut session = Session::new(client.clone(), true);
            session.created_at_ms = record.created_at_ms;
            for (filter, qos) in record.subscriptions {
                let qos = QoS::from_u8(qos).unwrap_or(QoS::AtMostOnce);
                self.tree.insert(&filter, &client, qos);
                session.subscriptions.insert(filter, qos);
            }
            for (seq, stored) in queues.remove(&id).unwrap_or_default() {
                // Whether it was sent before the restart is unknown: mark it as a redelivery.
                session.queue.push_back(Queued {
                    seq: Some(seq),
                    message: from_stored(stored),
                    dup: true,
                });
            }
            self.sessions.insert(client, session);
        }
        for (client, queue) in queues {
            warn!(client_id = %client, messages = queue.len(), "queued messages without a session; removing");
            self.persister
                .stage(Op::DeleteSession { client_id: client });
        }
        for stored in snapshot.retained {
            let message = from_stored(stored);
            self.retained.insert(message.topic.to_string(), message);
        }
        info!(
            sessions = count,
            retained = self.retained.len(),
            "state restored from storage"
        );
    }

    async fn run(
        &mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut reports: mpsc::UnboundedReceiver<Report>,
    ) {
        let period = self
            .settings
            .flush_interval
            .unwrap_or(std::time::Duration::from_secs(3600));
        let mut flush_timer = tokio::time::interval(period);
        self.persister.send_staged().await;
        loop {
            tokio::select! {
                biased;
                Some(report) = reports.recv() => self.on_report(report),
                input = inputs.recv() => {
                    let Some(input) = input else { break };
                    let mut shutdown = self.handle(input);
                    while shutdown.is_none() {
                        match inputs.try_recv() {
                            Ok(input) => shutdown = self.handle(input),
                            Err(_) => break,
                        }
                    }
                    self.persister.send_staged().await;
                    if let Some(done) = shutdown {
                        self.shutdown(&mut reports).await;
                        let _ = done.send(());
                        break;
                    }
                }
                _ = flush_timer.tick(), if self.settings.flush_interval.is_some() => {
                    self.persister.flush_in_background().await;
                }
            }
        }
    }

    async fn shutdown(&mut self, reports: &mut mpsc::UnboundedReceiver<Report>) {
        let channels: Vec<ChannelId> = self.channels.keys().copied().collect();
        info!(
            channels = channels.len(),
            "closing every channel for shutdown"
        );
        for channel in channels {
            self.end_channel(channel, CloseReason::ServerShutdown);
        }
        let flushed = self.persister.flush().await;
        let _ = flushed.await;
        while let Ok(report) = reports.try_recv() {
            self.on_report(report);
        }
    }

    /// The one dispatch of every input. Returns the reply of a shutdown request.
    fn handle(&mut self, input: Input) -> Option<oneshot::Sender<()>> {
        match input {
            Input::Connect(request) => self.handle_connect(*request),
            Input::Publish { channel, publish } => self.handle_publish(channel, publish),
            Input::PubAck { channel, packet_id } => self.handle_puback(channel, packet_id),
            Input::PubRec { channel, packet_id } => self.handle_pubrec(channel, packet_id),
            Input::PubRel { channel, packet_id } => self.handle_pubrel(channel, packet_id),
            Input::PubComp { channel, packet_id } => self.handle_pubcomp(channel, packet_id),
            Input::Subscribe {
                channel,
                packet_id,
                filters,
            } => self.handle_subscribe(channel, packet_id, filters),
            Input::Unsubscribe {
                channel,
                packet_id,
                filters,
            } => self.handle_unsubscribe(channel, packet_id, filters),
            Input::Closed { channel, reason } => self.end_channel(channel, reason),
            Input::Shutdown { done } => return Some(done),
        }
        None
    }

    /// The session attached to `channel`, if the channel is still live.
    pub(crate) fn session_of(&mut self, channel: ChannelId) -> Option<&mut Session> {
        let client = self.channels.get(&channel)?;
        self.sessions
            .get_mut(client)
            .filter(|s| s.channel_id() == Some(channel))
    }

    pub(crate) fn stage_all(&mut self, ops: Vec<Op>) {
        for op in ops {
            self.persister.stage(op);
        }
    }

    pub(crate) fn emit(&self, event: Event) {
        debug!(event = event.kind.as_str(), client_id = %event.client_id, channel = %event.channel, reason = ?event.reason, "presence event");
        if let Some(events) = &self.events
            && events.try_send(event).is_err()
        {
            RouterStats::add(&self.stats.events_dropped, 1);
        }
    }

    /// Sends `action` to `channel` now, or once the open batch is durable (`durable`), or after
    /// the channel's earlier deferred acknowledgements, whichever keeps the order.
    pub(crate) fn reply(&mut self, channel: ChannelId, action: Deferred, durable: bool) {
        let open = if durable {
            self.persister.open_ticket()
        } else {
            None
        };
        let ticket = open.or_else(|| {
            self.pending_per_channel.contains_key(&channel).then(|| {
                self.persister
                    .open_ticket()
                    .unwrap_or(self.persister.last_sent_ticket())
            })
        });
        match ticket {
            None => self.execute(channel, action),
            Some(ticket) => {
                *self.pending_per_channel.entry(channel).or_default() += 1;
                self.pending.push_back(Pending {
                    ticket,
                    channel,
                    action,
                });
            }
        }
    }

    fn execute(&mut self, channel: ChannelId, action: Deferred) {
        let Some(session) = self.session_of(channel) else {
            return;
        };
        let (packet, retained) = match action {
            Deferred::Send(packet) => (packet, Vec::new()),
            Deferred::SubAck(packet, retained) => (packet, retained),
        };
        if !session.send(packet) {
            self.slow_consumer(channel);
            return;
        }
        let Some(client) = self.channels.get(&channel).cloned() else {
            return;
        };
        for (message, qos) in retained {
            self.deliver(&client, &message, qos, true);
        }
    }

    /// Counts and logs what a send dropped for age, and closes a channel that could not take
    /// what was sent.
    pub(crate) fn after_send(
        &mut self,
        channel: Option<ChannelId>,
        outcome: crate::session::SendOutcome,
    ) {
        if outcome.expired > 0 {
            RouterStats::add(&self.stats.queue_expired, outcome.expired);
            warn!(channel = ?channel, dropped = outcome.expired, limit = "limits.max_queue_age_secs", "queued messages expired before delivery");
        }
        if outcome.slow_consumer
            && let Some(channel) = channel
        {
            self.slow_consumer(channel);
        }
    }

    pub(crate) fn slow_consumer(&mut self, channel: ChannelId) {
        warn!(%channel, "outbox full: the client does not read fast enough; closing");
        self.end_channel(channel, CloseReason::SlowConsumer);
    }

    fn on_report(&mut self, report: Report) {
        let (up_to, failed) = match report {
            Report::Committed { up_to } => (up_to, None),
            Report::Failed { from, to, error } => (to, Some((from, error))),
        };
        while self.pending.front().is_some_and(|p| p.ticket <= up_to) {
            let Some(Pending {
                ticket,
                channel,
                action,
            }) = self.pending.pop_front()
            else {
                break;
            };
            if let Some(count) = self.pending_per_channel.get_mut(&channel) {
                *count -= 1;
                if *count == 0 {
                    self.pending_per_channel.remove(&channel);
                }
            }
            match &failed {
                Some((from, error)) if ticket >= *from => {
                    error!(%channel, %error, "closing a channel whose messages could not be stored; the client will resend them");
                    self.end_channel(channel, CloseReason::StorageFailure);
                }
                _ => self.execute(channel, action),
            }
        }
    }
}

pub(crate) fn to_stored(message: &Message) -> herald_store::StoredMessage {
    herald_store::StoredMessage {
        topic: message.topic.to_string(),
        payload: message.payload.clone(),
        qos: message.qos.as_u8(),
        retain: message.retain,
        published_at_ms: message.published_at_ms,
    }
}

fn from_stored(stored: herald_store::StoredMessage) -> Message {
    Message {
        topic: Topic::from_trusted(stored.topic),
        payload: stored.payload,
        qos: QoS::from_u8(stored.qos).unwrap_or(QoS::AtLeastOnce),
        retain: stored.retain,
        published_at_ms: stored.published_at_ms,
    }
}
