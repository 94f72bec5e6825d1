//! The router task: its state, its loop, and the acknowledgements that wait for the disk.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use herald_protocol::{ClientId, Packet, PacketId, QoS, Topic};
use herald_store::{Op, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::channel_outbox::SendError;
use crate::outbox::{OutboxEntry, SinkQueue};
use crate::persist::{self, Persister, Report};
use crate::presence::{Newest, ReadBack, SNAPSHOT_PREFIX, SnapshotState, read_newest};
use crate::session::{Queued, Session};
use crate::sessions::Sessions;
use crate::tree::SubscriptionTree;
use crate::types::{
    ChannelId, ChannelRef, ClientState, CloseReason, Event, EventKind, Input, Message,
    RouterSettings, now_ms,
};

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
    /// PUBLISH received from clients, by QoS.
    pub received_by_qos: [AtomicU64; 3],
    /// PUBLISH sent to clients, by QoS.
    pub sent_by_qos: [AtomicU64; 3],
    /// Presence events emitted: connect, disconnect, tcpclean, connect_failed.
    pub presence_events: [AtomicU64; 4],
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
    /// Presence history reads.
    pub history: crate::persist::HistoryReader,
}

impl RouterHandle {
    /// Hands `input` to the router; the future answers `false` when the router has stopped.
    /// It does not wait while the router's queue has room (nearly always); only the waiting
    /// send is boxed, so a connection task does not carry that state (a few hundred bytes)
    /// through its idle time.
    pub fn route(&self, input: Input) -> Route {
        Route::new(&self.inputs, input)
    }

    /// Closes every channel and waits until their events are durable.
    pub async fn close_all(&self) {
        let (done, rx) = oneshot::channel();
        if self.inputs.send(Input::CloseAll { done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Closes every channel, makes everything durable and waits for the router to stop.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.inputs.send(Input::Shutdown { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The future of [`RouterHandle::route`]: `true` once the router has the input.
pub enum Route {
    Done(bool),
    Waiting(Pin<Box<dyn Future<Output = bool> + Send>>),
}

impl Route {
    fn new(inputs: &mpsc::Sender<Input>, input: Input) -> Route {
        match inputs.try_send(input) {
            Ok(()) => Route::Done(true),
            Err(mpsc::error::TrySendError::Full(input)) => {
                let inputs = inputs.clone();
                Route::Waiting(Box::pin(async move { inputs.send(input).await.is_ok() }))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Route::Done(false),
        }
    }
}

impl Future for Route {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        match self.get_mut() {
            Route::Done(delivered) => Poll::Ready(*delivered),
            Route::Waiting(send) => send.as_mut().poll(cx),
        }
    }
}

/// An acknowledgement that waits for a ticket to be durable (or for earlier ones of the same
/// channel, to keep their order).
pub(crate) enum Deferred {
    Send(Packet),
    /// A SUBACK, then the retained messages the new subscriptions match.
    SubAck(Packet, Vec<(Message, QoS)>),
    /// A presence event and its outbox entries, for the sinks and the event listener.
    Presence(Event, Vec<(Arc<SinkQueue>, OutboxEntry)>),
    /// Outbox entries of an `outflow` rule.
    Outbox(Vec<(Arc<SinkQueue>, OutboxEntry)>),
    /// Tells an internal publisher (the admin API, the `mqtt` sink) that its message is durable.
    Notify(oneshot::Sender<()>),
    /// Answers a query once the state it reports is durable, so that the events it names can
    /// be read back from the store.
    Answer(oneshot::Sender<Vec<ClientState>>, Vec<ClientState>),
}

struct Pending {
    ticket: u64,
    /// The channel the action answers, if any: its actions keep their order.
    channel: Option<ChannelRef>,
    action: Deferred,
}

/// The broker's state. Owned by one task; see the crate docs.
pub struct Router {
    pub(crate) settings: RouterSettings,
    pub(crate) sessions: Sessions,
    pub(crate) tree: SubscriptionTree,
    pub(crate) retained: BTreeMap<String, Message>,
    pub(crate) persister: Persister,
    pub(crate) next_seq: u64,
    pub(crate) stats: Arc<RouterStats>,
    pub(crate) events: Option<mpsc::Sender<Event>>,
    /// Every client id known (any that ever had a presence event, or a session): its last
    /// presence seq and its compact `$presence/<clientId>` snapshot (not in `retained`). One
    /// entry per client rather than a map each; in id order, for the admin API's pages.
    pub(crate) known: BTreeMap<ClientId, crate::presence::Known>,
    /// Channels with a record in the store's `channels` table (a channel whose client's newest
    /// event became a refused connect, or one an older build recorded): deleted when the
    /// channel ends. Empty in the steady state: an open channel is otherwise known from its
    /// client's newest history entry.
    pub(crate) stored_channels: HashSet<ChannelId>,
    pub(crate) sinks: HashMap<String, Arc<SinkQueue>>,
    pub(crate) next_outbox_id: u64,
    pending: VecDeque<Pending>,
    /// The user names channels gave most recently, newest first: a new channel with one of
    /// them shares its allocation.
    pub(crate) recent_usernames: VecDeque<Arc<str>>,
    pending_per_channel: HashMap<ChannelId, usize>,
    /// The highest ticket known durable.
    committed: u64,
    /// CONNECTs that take over a client id whose channel is still open, each waiting until
    /// that channel has read what its client sent before it ends (`connect.rs`).
    pub(crate) takeovers: HashMap<ClientId, crate::connect::Takeover>,
}

impl Router {
    /// Loads the store, starts the storage thread and the router task.
    pub fn start(
        settings: RouterSettings,
        mut store: Box<dyn Store>,
        sinks: Vec<Arc<SinkQueue>>,
        events: Option<mpsc::Sender<Event>>,
    ) -> Result<(RouterHandle, JoinHandle<()>), StoreError> {
        let snapshot = store.load()?;
        Router::start_loaded(settings, store, snapshot, sinks, events)
    }

    /// [`Router::start`] with the snapshot already read from `store` (the caller takes what
    /// the router does not own, such as tokens and device credentials, out of it first).
    pub fn start_loaded(
        settings: RouterSettings,
        mut store: Box<dyn Store>,
        snapshot: herald_store::Snapshot,
        sinks: Vec<Arc<SinkQueue>>,
        events: Option<mpsc::Sender<Event>>,
    ) -> Result<(RouterHandle, JoinHandle<()>), StoreError> {
        let read_back = read_newest(store.as_mut())?;
        let (persister, reports, thread) = persist::start(store)
            .map_err(|e| StoreError::Engine(format!("cannot start the storage thread: {e}")))?;
        let stats = Arc::new(RouterStats::default());
        let reader = persister.reader();
        let mut router = Router {
            settings,
            sessions: Sessions::new(),
            tree: SubscriptionTree::default(),
            retained: BTreeMap::new(),
            persister,
            next_seq: snapshot.next_seq,
            stats: stats.clone(),
            events,
            known: BTreeMap::new(),
            stored_channels: HashSet::new(),
            sinks: sinks.into_iter().map(|s| (s.id.clone(), s)).collect(),
            next_outbox_id: snapshot.next_outbox_id,
            pending: VecDeque::new(),
            recent_usernames: VecDeque::new(),
            pending_per_channel: HashMap::new(),
            committed: 0,
            takeovers: HashMap::new(),
        };
        router.restore(snapshot, read_back);
        let (tx, rx) = mpsc::channel(4096);
        let task = tokio::spawn(async move {
            router.run(rx, reports).await;
            // Dropping the router drops the persister; the thread closes the store and ends.
            drop(router);
            if tokio::task::spawn_blocking(move || thread.join())
                .await
                .is_err()
            {
                error!("storage thread did not end cleanly");
            }
        });
        Ok((
            RouterHandle {
                inputs: tx,
                stats,
                history: reader,
            },
            task,
        ))
    }

    /// `id` as the router already holds it (one shared allocation per client id), else parsed.
    pub(crate) fn known_client_id(
        &self,
        id: &str,
    ) -> Result<ClientId, herald_protocol::ClientIdError> {
        match self.known.get_key_value(id) {
            Some((client, _)) => Ok(client.clone()),
            None => ClientId::parse_any(id, usize::MAX),
        }
    }

    /// Takes the store's state back into memory: `snapshot`, and what each client's newest
    /// history entry says (`read_back`, from [`read_newest`]): its seq, its `$presence`
    /// snapshot and whether its channel is still open.
    fn restore(&mut self, snapshot: herald_store::Snapshot, read_back: ReadBack) {
        let ReadBack { newest, open } = read_back;
        let mut queues: HashMap<String, Vec<(u64, herald_store::StoredMessage)>> =
            snapshot.queues.into_iter().collect();
        let mut incoming_qos2: HashMap<String, Vec<u16>> =
            snapshot.incoming_qos2.into_iter().collect();
        let mut released: HashMap<String, Vec<u64>> = snapshot.released.into_iter().collect();
        // First, so that sessions and snapshots share these client ids' allocations.
        for (client, seq) in snapshot.client_seqs {
            if let Ok(client) = ClientId::parse_any(&client, usize::MAX) {
                self.known.insert(
                    client,
                    crate::presence::Known {
                        seq,
                        snapshot: None,
                    },
                );
            }
        }
        // A client's last seq is that of its newest history entry (the seqs above are what
        // older versions also wrote), and so, with snapshots on, is its snapshot.
        let snapshots_on = self.settings.presence.snapshot_topic;
        for (id, seq, read) in &newest {
            if let Ok(client) = self.known_client_id(id) {
                let plain_id = !client.as_str().contains(['/', '+', '#', '\0']);
                let known = self.known.entry(client).or_default();
                known.seq = known.seq.max(*seq);
                if snapshots_on
                    && plain_id
                    && let Newest::State(state) = read
                {
                    known.set_snapshot(state.clone());
                }
            }
        }
        let count = snapshot.sessions.len();
        for (id, record) in snapshot.sessions {
            let client = match self.known_client_id(&id) {
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
            let released_seqs = released.remove(&id).unwrap_or_default();
            for (seq, stored) in queues.remove(&id).unwrap_or_default() {
                // Whether it was sent before the restart is unknown: mark it as a redelivery.
                session.flow_mut().queue.push_back(Queued {
                    seq: Some(seq),
                    message: from_stored(stored),
                    dup: true,
                    released: released_seqs.binary_search(&seq).is_ok(),
                });
            }
            // QoS 2 messages this client published that were routed but not yet released: a
            // retransmission is acknowledged, not routed a second time.
            let awaiting_pubrel = incoming_qos2.remove(&id).unwrap_or_default();
            if !awaiting_pubrel.is_empty() {
                session
                    .flow_mut()
                    .incoming_qos2
                    .extend(awaiting_pubrel.into_iter().filter_map(PacketId::new));
            }
            self.sessions.insert(session);
        }
        for (client, _) in incoming_qos2 {
            self.persister
                .stage(Op::DeleteSession { client_id: client });
        }
        for (client, queue) in queues {
            warn!(client_id = %client, messages = queue.len(), "queued messages without a session; removing");
            self.persister
                .stage(Op::DeleteSession { client_id: client });
        }
        let node = self.settings.presence.node_id.clone();
        // A client's snapshot is rebuilt from its newest history entry. A stored one is used
        // only where that entry cannot give it (a refused connect, an unreadable entry, none),
        // and deleted elsewhere: left by a connect_failed since followed by other events, or
        // by an older build, which stored one with every event.
        let newest_of = |client: &str| {
            newest
                .binary_search_by(|(id, ..)| id.as_str().cmp(client))
                .ok()
                .map(|i| &newest[i].2)
        };
        for stored in snapshot.retained {
            let message = from_stored(stored);
            if let Some(client_id) = message.topic.as_str().strip_prefix(SNAPSHOT_PREFIX)
                && let Ok(client) = self.known_client_id(client_id)
            {
                if !snapshots_on || matches!(newest_of(client_id), Some(Newest::State(_))) {
                    self.persister.stage(Op::DeleteRetained {
                        topic: message.topic.to_string(),
                    });
                    continue;
                }
                // Presence snapshots this node wrote go back to their compact form.
                if let Some((id, state)) = SnapshotState::from_stored(&message.payload, &node)
                    && id == client_id
                {
                    self.known.entry(client).or_default().set_snapshot(state);
                    continue;
                }
            }
            self.retained.insert(message.topic.to_string(), message);
        }
        // Every session's client id is known to the admin API's listing, events or not.
        for client in self.sessions.iter().map(|s| &s.client_id) {
            self.known.entry(client.clone()).or_default();
        }
        for (sink, entries) in snapshot.outboxes {
            self.restore_outbox(sink, entries);
        }
        self.close_channels_left_open(snapshot.channels, open);
        info!(
            sessions = count,
            retained = self.retained.len(),
            presence_snapshots = self.known.values().filter(|k| k.snapshot.is_some()).count(),
            "state restored from storage"
        );
    }

    fn restore_outbox(&mut self, sink: String, entries: Vec<(u64, bytes::Bytes)>) {
        match self.sinks.get(&sink) {
            Some(queue) => {
                let queue = queue.clone();
                let mut dropped = 0;
                for (id, payload) in entries {
                    // The age bound restarts here: when an entry was added is not stored.
                    let added_ms = now_ms();
                    if let Some(old) = queue.push(OutboxEntry {
                        id,
                        payload,
                        added_ms,
                    }) {
                        dropped += 1;
                        self.persister.stage(Op::DeleteOutbox {
                            sink: sink.clone(),
                            id: old.id,
                        });
                    }
                }
                if dropped > 0 {
                    warn!(sink = %sink, dropped, "stored outbox larger than outbox_max: its oldest entries are dropped");
                }
            }
            None => {
                warn!(sink = %sink, entries = entries.len(), "outbox of a sink that is no longer configured: its entries are dropped");
                for (id, _) in entries {
                    let sink = sink.clone();
                    self.persister.stage(Op::DeleteOutbox { sink, id });
                }
            }
        }
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
            let takeover_due = self.next_takeover_due();
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
                    // Inputs first in the select: a steady stream of them must not hold a
                    // takeover past its time.
                    self.end_overdue_takeovers();
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
                // A future that makes its timer only when polled: the router goes round this
                // loop for every batch of inputs, and a takeover rarely waits.
                _ = async {
                    match takeover_due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if takeover_due.is_some() => {
                    self.end_overdue_takeovers();
                    self.persister.send_staged().await;
                }
            }
        }
    }

    async fn shutdown(&mut self, reports: &mut mpsc::UnboundedReceiver<Report>) {
        self.close_all();
        let flushed = self.persister.flush().await;
        let _ = flushed.await;
        while let Ok(report) = reports.try_recv() {
            self.on_report(report);
        }
    }

    fn close_all(&mut self) {
        self.drop_takeovers(CloseReason::ServerShutdown);
        let channels: Vec<ChannelRef> = self
            .sessions
            .iter()
            .filter_map(Session::channel_ref)
            .collect();
        if !channels.is_empty() {
            info!(
                channels = channels.len(),
                "closing every channel for shutdown"
            );
        }
        for channel in channels {
            self.end_channel(&channel, CloseReason::ServerShutdown);
        }
    }

    /// The one dispatch of every input. Returns the reply of a shutdown request.
    pub(crate) fn handle(&mut self, input: Input) -> Option<oneshot::Sender<()>> {
        let input = self.hold_for_takeover(input)?;
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
            Input::Closed { channel, reason } => self.end_channel(&channel, reason),
            Input::Acknowledge { channel, packet } => {
                self.reply(channel, Deferred::Send(packet), false)
            }
            Input::Deliver { message, done } => {
                self.route(message);
                if let Some(done) = done {
                    self.defer(Deferred::Notify(done));
                }
            }
            Input::QueryClients { ids, reply } => {
                let states: Vec<ClientState> = ids.iter().map(|id| self.client_state(id)).collect();
                self.answer(reply, states);
            }
            Input::ListClients {
                group,
                online,
                after,
                limit,
                reply,
            } => {
                let page = self.list_clients(group.as_deref(), online, after.as_deref(), limit);
                self.answer(reply, page);
            }
            Input::Kick { client_id, reply } => {
                let channel = self
                    .sessions
                    .get(client_id.as_str())
                    .and_then(Session::channel_ref);
                if let Some(channel) = &channel {
                    info!(client_id = %client_id, %channel, "kicked through the admin API");
                    self.end_channel(channel, CloseReason::Kicked);
                }
                let _ = reply.send(channel.is_some());
            }
            Input::ConnectFailed(failed) => self.connect_failed(*failed),
            Input::CloseAll { done } => {
                self.close_all();
                self.defer(Deferred::Notify(done));
            }
            Input::OutboxDelivered { sink, ids } => {
                for id in ids {
                    let sink = sink.clone();
                    self.persister.stage(Op::DeleteOutbox { sink, id });
                }
            }
            Input::Persist { ops, done } => {
                self.stage_all(ops);
                self.defer(Deferred::Notify(done));
            }
            Input::Shutdown { done } => return Some(done),
        }
        None
    }

    /// The session attached to `channel`, if the channel is still live.
    pub(crate) fn session_of(&mut self, channel: &ChannelRef) -> Option<&mut Session> {
        self.sessions
            .get_mut(&channel.client)
            .filter(|s| s.channel_id() == Some(channel.id))
    }

    pub(crate) fn stage_all(&mut self, ops: Vec<Op>) {
        for op in ops {
            self.persister.stage(op);
        }
    }

    /// Sends `action` to `channel` now, or once the open batch is durable (`durable`), or after
    /// the channel's earlier deferred acknowledgements, whichever keeps the order.
    pub(crate) fn reply(&mut self, channel: ChannelRef, action: Deferred, durable: bool) {
        let open = if durable {
            self.persister.open_ticket()
        } else {
            None
        };
        let ticket = open.or_else(|| {
            self.pending_per_channel.contains_key(&channel.id).then(|| {
                self.persister
                    .open_ticket()
                    .unwrap_or(self.persister.last_sent_ticket())
            })
        });
        match ticket {
            None => self.execute(Some(channel), action),
            Some(ticket) => {
                *self.pending_per_channel.entry(channel.id).or_default() += 1;
                let channel = Some(channel);
                self.pending.push_back(Pending {
                    ticket,
                    channel,
                    action,
                });
            }
        }
    }

    /// Sends client states once the events whose seqs they report are durable (at once when
    /// nothing is waiting), so the caller can read those events from the store.
    fn answer(&mut self, reply: oneshot::Sender<Vec<ClientState>>, states: Vec<ClientState>) {
        if states.is_empty() {
            let _ = reply.send(states);
            return;
        }
        self.defer(Deferred::Answer(reply, states));
    }

    /// Runs `action` once everything staged so far is durable, after every earlier deferred
    /// action (at once if nothing is waiting).
    pub(crate) fn defer(&mut self, action: Deferred) {
        let ticket = self
            .persister
            .open_ticket()
            .unwrap_or(self.persister.last_sent_ticket());
        if self.pending.is_empty() && ticket <= self.committed {
            self.execute(None, action);
        } else {
            let channel = None;
            self.pending.push_back(Pending {
                ticket,
                channel,
                action,
            });
        }
    }

    fn execute(&mut self, channel: Option<ChannelRef>, action: Deferred) {
        let (packet, retained) = match action {
            Deferred::Send(packet) => (packet, Vec::new()),
            Deferred::SubAck(packet, retained) => (packet, retained),
            Deferred::Presence(event, outboxes) => return self.hand_off(event, outboxes),
            Deferred::Outbox(outboxes) => return self.fill_outboxes(outboxes),
            Deferred::Notify(done) => {
                let _ = done.send(());
                return;
            }
            Deferred::Answer(reply, states) => {
                let _ = reply.send(states);
                return;
            }
        };
        let Some(channel) = channel else { return };
        let Some(session) = self.session_of(&channel) else {
            return;
        };
        match session.send(packet) {
            Ok(()) => {}
            Err(SendError::Full) => return self.slow_consumer(&channel),
            // The task has ended; its `Input::Closed` is on the way with the reason.
            Err(SendError::Closed) => return,
        }
        for (message, qos) in retained {
            self.deliver(&channel.client, &message, qos, true);
        }
    }

    /// Counts and logs what a send dropped for age, and closes a channel that could not take
    /// what was sent.
    pub(crate) fn after_send(
        &mut self,
        channel: Option<ChannelRef>,
        outcome: crate::session::SendOutcome,
    ) {
        // Counted here, for every caller of `pump` (a new message, an acknowledgement that
        // freed the window, a reconnect), under each message's own QoS.
        let total: u64 = outcome.sent_by_qos.iter().sum();
        if total > 0 {
            RouterStats::add(&self.stats.messages_sent, total);
            for (qos, sent) in outcome.sent_by_qos.into_iter().enumerate() {
                if sent > 0 {
                    RouterStats::add(&self.stats.sent_by_qos[qos], sent);
                }
            }
        }
        if outcome.expired > 0 {
            RouterStats::add(&self.stats.queue_expired, outcome.expired);
            warn!(channel = ?channel.as_ref().map(|c| c.id), dropped = outcome.expired, limit = "limits.max_queue_age_secs", "queued messages expired before delivery");
        }
        if outcome.slow_consumer
            && let Some(channel) = channel
        {
            self.slow_consumer(&channel);
        }
    }

    pub(crate) fn slow_consumer(&mut self, channel: &ChannelRef) {
        warn!(%channel, "outbox full: the client does not read fast enough; closing");
        self.end_channel(channel, CloseReason::SlowConsumer);
    }

    fn on_report(&mut self, report: Report) {
        let (up_to, failed) = match report {
            Report::Committed { up_to } => (up_to, None),
            Report::Failed { from, to, error } => (to, Some((from, error))),
        };
        self.committed = self.committed.max(up_to);
        // Channels whose connect event was in the failed batches: never announced.
        let mut unannounced = Vec::new();
        while self.pending.front().is_some_and(|p| p.ticket <= up_to) {
            let Some(Pending {
                ticket,
                channel,
                action,
            }) = self.pending.pop_front()
            else {
                break;
            };
            if let Some(channel) = &channel
                && let Some(count) = self.pending_per_channel.get_mut(&channel.id)
            {
                *count -= 1;
                if *count == 0 {
                    self.pending_per_channel.remove(&channel.id);
                }
            }
            match (&failed, &channel) {
                (Some((from, error)), Some(channel)) if ticket >= *from => {
                    error!(%channel, %error, "closing a channel whose messages could not be stored; the client will resend them");
                    self.end_channel(channel, CloseReason::StorageFailure);
                }
                (Some((from, error)), None) if ticket >= *from => {
                    // A presence event whose seq was not stored is not handed on: its eventId
                    // could be issued again.
                    error!(%error, "an event or internal publish was dropped: its state could not be stored");
                    if let Deferred::Presence(event, _) = &action {
                        match event.kind {
                            EventKind::Connect => unannounced.push(event.channel),
                            EventKind::TcpClean if !unannounced.contains(&event.channel) => {
                                self.record_unstored_close(event);
                            }
                            _ => {}
                        }
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ChannelId;

    fn input() -> Input {
        Input::Closed {
            channel: ChannelRef::new(
                herald_protocol::ClientId::parse_any("dev-1", 64).expect("client id"),
                ChannelId(1),
            ),
            reason: CloseReason::Kicked,
        }
    }

    #[tokio::test]
    async fn route_hands_over_at_once_waits_when_full_and_fails_when_the_router_is_gone() {
        let (inputs, mut router) = mpsc::channel(1);
        assert!(matches!(Route::new(&inputs, input()), Route::Done(true)));
        // The queue is full: the route waits for room, and gets it once the router reads.
        let waiting = Route::new(&inputs, input());
        assert!(matches!(waiting, Route::Waiting(_)));
        let delivered = tokio::spawn(waiting);
        assert!(router.recv().await.is_some());
        assert!(delivered.await.expect("task"));
        assert!(router.recv().await.is_some());
        drop(router);
        assert!(!Route::new(&inputs, input()).await);
    }
}
