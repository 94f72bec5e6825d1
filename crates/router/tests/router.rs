//! The router fed with `Input`s directly, no sockets: acknowledgements that wait for storage,
//! storage failures, presence event order, slow readers.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::{
    ClientId, ConnAck, ConnectReturnCode, Packet, Protocol, Publish, QoS, Topic,
};
use herald_router::{
    ChannelId, ChannelRef, CloseReason, ConnectRequest, Event, EventKind, Input, OutboxReceiver,
    Outgoing, Router, RouterHandle, RouterSettings, Transport, channel_outbox,
};
use herald_store::{MemoryStore, Op, Snapshot, Store, StoreError};
use tokio::sync::mpsc;

/// A store that fails every write while `failing` is set, like a full disk. Its state can be
/// shared with a second router, as a restart on the same data.
struct FlakyStore {
    inner: Arc<std::sync::Mutex<MemoryStore>>,
    failing: Arc<AtomicBool>,
}

impl FlakyStore {
    fn inner(&self) -> std::sync::MutexGuard<'_, MemoryStore> {
        self.inner.lock().expect("store lock")
    }
}

impl Store for FlakyStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.inner().load()
    }
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("no space left on device".into()));
        }
        self.inner().apply(ops)
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    fn history(
        &mut self,
        client_id: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64, Bytes)>, StoreError> {
        self.inner().history(client_id, from_ms, to_ms, limit)
    }
    fn history_entries(
        &mut self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        self.inner().history_entries(wanted)
    }
    fn last_events(&mut self, each: &mut herald_store::OnLastEvent<'_>) -> Result<(), StoreError> {
        self.inner().last_events(each)
    }
}

struct Harness {
    router: RouterHandle,
    events: mpsc::Receiver<Event>,
    failing: Arc<AtomicBool>,
    data: Arc<std::sync::Mutex<MemoryStore>>,
}

fn start(settings: RouterSettings) -> Harness {
    start_on(
        settings,
        Arc::new(std::sync::Mutex::new(MemoryStore::new())),
    )
}

/// A router on `data`: a restart when another router used it before.
fn start_on(settings: RouterSettings, data: Arc<std::sync::Mutex<MemoryStore>>) -> Harness {
    let failing = Arc::new(AtomicBool::new(false));
    let store = FlakyStore {
        inner: data.clone(),
        failing: failing.clone(),
    };
    let (events_tx, events) = mpsc::channel(1024);
    let (router, _task) = Router::start(settings, Box::new(store), Vec::new(), Some(events_tx))
        .expect("router starts");
    Harness {
        router,
        events,
        failing,
        data,
    }
}

struct Conn {
    channel: ChannelRef,
    outbox: OutboxReceiver,
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

impl Harness {
    async fn connect(&self, id: &str, clean: bool, capacity: usize) -> Conn {
        let mut conn = self.send_connect(id, clean, capacity).await;
        conn.expect_connack().await;
        conn
    }

    /// Sends a CONNECT without waiting for its CONNACK.
    async fn send_connect(&self, id: &str, clean: bool, capacity: usize) -> Conn {
        let (outbox, rx) = channel_outbox(capacity);
        let channel = ChannelId::random();
        let client_id = ClientId::parse_any(id, 64).expect("id");
        let request = ConnectRequest {
            channel,
            client_id: client_id.clone(),
            clean_session: clean,
            will: None,
            username: None,
            protocol: Protocol::V311,
            peer: peer(),
            transport: Transport::Tcp,
            outbox,
        };
        self.send(Input::Connect(Box::new(request))).await;
        Conn {
            channel: ChannelRef::new(client_id, channel),
            outbox: rx,
        }
    }

    /// `channel` subscribes to `filter` (packet id 1).
    async fn subscribe(&self, channel: &ChannelRef, filter: &str, qos: QoS) {
        self.send(Input::Subscribe {
            channel: channel.clone(),
            packet_id: pid(1),
            filters: vec![(filter.into(), Some(qos))],
        })
        .await;
    }

    /// The connection task of `channel` reports its end.
    async fn close(&self, channel: &ChannelRef, reason: CloseReason) {
        self.send(Input::Closed {
            channel: channel.clone(),
            reason,
        })
        .await;
    }

    async fn send(&self, input: Input) {
        self.router
            .inputs
            .send(input)
            .await
            .expect("router running");
    }

    async fn next_event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("event within 5 s")
            .expect("events open")
    }
}

impl Conn {
    async fn expect_connack(&mut self) {
        match self.next().await {
            Outgoing::Packet(Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Accepted,
                ..
            })) => {}
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn next(&mut self) -> Outgoing {
        tokio::time::timeout(Duration::from_secs(5), self.outbox.recv())
            .await
            .expect("output within 5 s")
            .expect("outbox open")
    }
}

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

fn publish(topic: &str, qos: QoS, id: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Topic::new(topic, 128).expect("topic"),
        packet_id: (qos != QoS::AtMostOnce).then(|| pid(id)),
        payload: Bytes::from_static(b"x"),
    }
}

#[tokio::test]
async fn a_failed_write_withholds_the_puback_and_closes_the_publisher() {
    let h = start(RouterSettings::default());
    let mut sub = h.connect("sub", false, 64).await;
    h.subscribe(&sub.channel, "t", QoS::AtLeastOnce).await;
    assert!(matches!(
        sub.next().await,
        Outgoing::Packet(Packet::SubAck { .. })
    ));
    h.close(&sub.channel, CloseReason::SocketClosed).await;

    let mut publisher = h.connect("pub", true, 64).await;
    h.send(Input::Publish {
        channel: publisher.channel.clone(),
        publish: publish("t", QoS::AtLeastOnce, 7),
    })
    .await;
    assert!(matches!(publisher.next().await, Outgoing::Packet(Packet::PubAck(id)) if id == pid(7)));

    h.failing.store(true, Ordering::SeqCst);
    h.send(Input::Publish {
        channel: publisher.channel.clone(),
        publish: publish("t", QoS::AtLeastOnce, 8),
    })
    .await;
    match publisher.next().await {
        Outgoing::Close(CloseReason::StorageFailure) => {}
        other => panic!("expected the channel to close, got {other:?}"),
    }
}

#[tokio::test]
async fn a_close_whose_write_failed_still_gets_its_broker_restart() {
    let mut h = start(RouterSettings::default());
    let first = h.connect("dev", true, 64).await;
    assert_eq!(h.next_event().await.kind, EventKind::Connect);
    // The tcpclean's batch fails: the event is not handed on.
    h.failing.store(true, Ordering::SeqCst);
    h.close(&first.channel, CloseReason::SocketClosed).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.failing.store(false, Ordering::SeqCst);
    // The client's next connect is stored: the first channel's connect is no longer its
    // newest history entry, yet that channel never had a tcpclean.
    let second = h.connect("dev", true, 64).await;
    let connect = h.next_event().await;
    assert_eq!(
        (connect.kind, connect.channel),
        (EventKind::Connect, second.channel.id)
    );

    let mut again = start_on(RouterSettings::default(), h.data.clone());
    let mut closed = Vec::new();
    for _ in 0..2 {
        let event = again.next_event().await;
        assert_eq!(
            (event.kind, event.reason),
            (EventKind::TcpClean, Some(CloseReason::BrokerRestart))
        );
        closed.push(event.channel);
    }
    closed.sort();
    let mut expected = vec![first.channel.id, second.channel.id];
    expected.sort();
    assert_eq!(closed, expected);
}

#[tokio::test]
async fn takeover_ends_the_old_channel_before_the_new_one_connects() {
    let mut h = start(RouterSettings::default());
    let mut old = h.connect("dev", true, 64).await;
    let first = h.next_event().await;
    assert_eq!(
        (first.kind, first.channel),
        (EventKind::Connect, old.channel.id)
    );
    let mut new = h.send_connect("dev", true, 64).await;
    // The old channel is asked to end, and the new CONNECT waits until it has: its task
    // reports how it ended (here: nothing came from its client before).
    assert!(matches!(
        old.next().await,
        Outgoing::Close(CloseReason::TakenOver)
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), new.outbox.recv())
            .await
            .is_err(),
        "no CONNACK before the old channel has ended"
    );
    h.close(&old.channel, CloseReason::TakenOver).await;
    new.expect_connack().await;
    let clean = h.next_event().await;
    assert_eq!(
        (clean.kind, clean.channel, clean.reason),
        (
            EventKind::TcpClean,
            old.channel.id,
            Some(CloseReason::TakenOver)
        )
    );
    let connect = h.next_event().await;
    assert_eq!(
        (connect.kind, connect.channel),
        (EventKind::Connect, new.channel.id)
    );
    // A second report of the old channel's end: no second event for it.
    h.close(&old.channel, CloseReason::SocketClosed).await;
    h.close(&new.channel, CloseReason::ClientDisconnect).await;
    let disconnect = h.next_event().await;
    assert_eq!(
        (disconnect.kind, disconnect.channel),
        (EventKind::Disconnect, new.channel.id)
    );
    let clean = h.next_event().await;
    assert_eq!(
        (clean.kind, clean.channel, clean.reason),
        (
            EventKind::TcpClean,
            new.channel.id,
            Some(CloseReason::ClientDisconnect)
        )
    );
}

#[tokio::test]
async fn a_reader_whose_outbox_fills_is_closed_as_a_slow_consumer() {
    let mut h = start(RouterSettings::default());
    let mut slow = h.connect("slow", true, 4).await;
    h.subscribe(&slow.channel, "s", QoS::AtLeastOnce).await;
    let publisher = h.connect("pub", true, 64).await;
    for i in 1..=10 {
        h.send(Input::Publish {
            channel: publisher.channel.clone(),
            publish: publish("s", QoS::AtLeastOnce, i),
        })
        .await;
    }
    let _connect_events = (h.next_event().await, h.next_event().await);
    let ended = h.next_event().await;
    assert_eq!(
        (ended.kind, ended.reason),
        (EventKind::TcpClean, Some(CloseReason::SlowConsumer))
    );
    // What was queued before the end is still readable; then the outbox closes.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), slow.outbox.recv()).await {
    }
}

/// A client reading `$presence/#` whose outbox is full when it closes: its own `tcpclean`
/// snapshot cannot be delivered to it, which must not end the channel a second time (a second
/// `tcpclean`, the connections gauge counted down twice).
#[tokio::test]
async fn a_channel_whose_own_close_snapshot_overflows_its_outbox_ends_once() {
    let mut h = start(RouterSettings::default());
    // Room for the SUBACK and the client's own retained snapshot, nothing more.
    let watcher = h.connect("watcher", true, 2).await;
    h.subscribe(&watcher.channel, "$presence/#", QoS::AtLeastOnce)
        .await;
    let connected = h.next_event().await;
    assert_eq!(connected.kind, EventKind::Connect);
    h.close(&watcher.channel, CloseReason::SocketClosed).await;
    let ended = h.next_event().await;
    assert_eq!(
        (ended.kind, ended.reason),
        (EventKind::TcpClean, Some(CloseReason::SocketClosed))
    );
    let more = tokio::time::timeout(Duration::from_millis(500), h.events.recv()).await;
    assert!(more.is_err(), "a second event: {more:?}");
    assert_eq!(
        herald_router::RouterStats::get(&h.router.stats.connections),
        0,
        "the connections gauge"
    );
}

#[tokio::test]
async fn qos0_to_an_offline_session_is_dropped_and_counted() {
    let h = start(RouterSettings::default());
    let sub = h.connect("sub0", false, 64).await;
    h.subscribe(&sub.channel, "z", QoS::AtMostOnce).await;
    h.close(&sub.channel, CloseReason::SocketClosed).await;
    let publisher = h.connect("pub0", true, 64).await;
    h.send(Input::Publish {
        channel: publisher.channel.clone(),
        publish: publish("z", QoS::AtMostOnce, 0),
    })
    .await;
    for _ in 0..50 {
        if herald_router::RouterStats::get(&h.router.stats.qos0_dropped) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("drop not counted");
}

#[tokio::test]
async fn client_pages_follow_id_order_within_a_group() {
    let h = start(RouterSettings::default());
    let mut conns = Vec::new();
    for id in [
        "GID_bbb@@@1",
        "GID_aaa@@@2",
        "plain",
        "GID_aaaa@@@x",
        "GID_aaa@@@1",
    ] {
        conns.push(h.connect(id, true, 64).await);
    }
    // "GID_aaa@@@2" goes offline.
    h.close(&conns[1].channel, CloseReason::SocketClosed).await;
    let h = &h;
    let page = |group: Option<&str>, online: Option<bool>, after: Option<&str>, limit: usize| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let input = Input::ListClients {
            group: group.map(str::to_string),
            online,
            after: after.map(str::to_string),
            limit,
            reply,
        };
        async move {
            h.send(input).await;
            let states = tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .expect("answer in time")
                .expect("answer");
            states.into_iter().map(|s| s.client_id).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        page(None, None, None, 10).await,
        [
            "GID_aaa@@@1",
            "GID_aaa@@@2",
            "GID_aaaa@@@x",
            "GID_bbb@@@1",
            "plain"
        ]
    );
    assert_eq!(page(Some("GID_aaa"), None, None, 1).await, ["GID_aaa@@@1"]);
    assert_eq!(
        page(Some("GID_aaa"), None, Some("GID_aaa@@@1"), 1).await,
        ["GID_aaa@@@2"]
    );
    assert!(
        page(Some("GID_aaa"), None, Some("GID_aaa@@@2"), 5)
            .await
            .is_empty(),
        "GID_aaaa is another group"
    );
    // A cursor from before the group starts the page at the group.
    assert_eq!(
        page(Some("GID_bbb"), None, Some("A"), 5).await,
        ["GID_bbb@@@1"]
    );
    assert_eq!(
        page(Some("GID_aaa"), Some(true), None, 5).await,
        ["GID_aaa@@@1"]
    );
    assert_eq!(page(None, None, Some("GID_bbb@@@1"), 5).await, ["plain"]);
}

/// The `$presence` snapshots a new subscription to `filter` receives, as JSON.
async fn snapshots_seen(h: &Harness, id: &str, filter: &str) -> Vec<serde_json::Value> {
    let mut watcher = h.connect(id, true, 64).await;
    h.subscribe(&watcher.channel, filter, QoS::AtLeastOnce)
        .await;
    assert!(matches!(
        watcher.next().await,
        Outgoing::Packet(Packet::SubAck { .. })
    ));
    // The retained snapshots follow the SUBACK, in the same router step.
    let mut seen = Vec::new();
    while let Ok(Some(out)) =
        tokio::time::timeout(Duration::from_millis(100), watcher.outbox.recv()).await
    {
        match out {
            Outgoing::Packet(Packet::Publish(p)) => {
                seen.push(serde_json::from_slice(&p.payload).expect("JSON"))
            }
            other => panic!("expected snapshots, got {other:?}"),
        }
    }
    h.close(&watcher.channel, CloseReason::SocketClosed).await;
    seen
}

/// A connected client's snapshot is read from its channel (not kept apart); it says what the
/// connect event said, is replaced by the channel's end, and can be cleared by a publish on
/// its topic while the channel is open.
#[tokio::test]
async fn a_connected_client_s_snapshot_is_its_connect_until_the_channel_ends() {
    let mut h = start(RouterSettings::default());
    let dev = h.connect("dev", true, 64).await;
    let connect = h.next_event().await;
    let of_dev = |all: &[serde_json::Value]| {
        all.iter()
            .filter(|s| s["clientId"] == "dev")
            .cloned()
            .collect::<Vec<_>>()
    };
    for filter in ["$presence/dev", "$presence/#"] {
        let seen = of_dev(&snapshots_seen(&h, "watcher", filter).await);
        assert_eq!(seen.len(), 1, "{filter}: {seen:?}");
        let state = &seen[0];
        assert_eq!(state["online"], true);
        assert_eq!(state["lastEvent"], "connect");
        assert_eq!(state["seq"], connect.seq);
        assert_eq!(state["since"], connect.time_ms);
        assert_eq!(state["channelId"], connect.channel.to_string());
        assert_eq!(state["clientIp"], peer().to_string());
        assert_eq!(state["reason"], serde_json::Value::Null);
        // The watcher's own connect and tcpclean.
        h.next_event().await;
        h.next_event().await;
    }

    // An empty retained message on the topic clears it.
    let publisher = h.connect("publisher", true, 64).await;
    h.next_event().await;
    let mut clear = publish("$presence/dev", QoS::AtMostOnce, 0);
    clear.retain = true;
    clear.payload = Bytes::new();
    h.send(Input::Publish {
        channel: publisher.channel.clone(),
        publish: clear,
    })
    .await;
    let seen = of_dev(&snapshots_seen(&h, "watcher", "$presence/#").await);
    assert!(seen.is_empty(), "cleared: {seen:?}");
    h.next_event().await;
    h.next_event().await;

    // The channel's end sets it again.
    h.close(&dev.channel, CloseReason::SocketClosed).await;
    let clean = h.next_event().await;
    assert_eq!(clean.kind, EventKind::TcpClean);
    let seen = of_dev(&snapshots_seen(&h, "watcher", "$presence/dev").await);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["online"], false);
    assert_eq!(seen[0]["lastEvent"], "tcpclean");
    assert_eq!(seen[0]["reason"], "socket_closed");
    assert_eq!(seen[0]["seq"], clean.seq);
    assert_eq!(seen[0]["since"], clean.time_ms);
}
