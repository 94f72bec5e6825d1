//! Presence events (DESIGN.md 5) through real sinks: the exact sequence and reason for every
//! way a channel ends, seq and eventId, takeover order, crash recovery, the retained snapshot.

use std::path::Path;
use std::time::Duration;

use herald_testkit::{
    BrokerProcess, RawClient, TestBroker, TestClient, demo_config, signature, signed_options,
};
use rumqttc::{MqttOptions, QoS};
use serde_json::Value;

use crate::QUIET;

const BIN: &str = env!("CARGO_BIN_EXE_herald");
pub(crate) const DEV: &str = "GID_demo@@@dev-1";

/// A backend key that may read the presence topics, an mqtt sink and a rule for every event.
pub const PRESENCE: &str = r#"
[[access_keys]]
id = "backend"
secret = "backend-secret"
subscribe = ["$notice/#", "$presence/#", "demo/#"]

[[sinks]]
id = "notices"
type = "mqtt"
topic = "$notice/{groupId}/{clientId}/{eventType}"
qos = 1

[[rules]]
id = "all-events"
kind = "status_notice"
source = { groups = ["GID_demo"], events = ["connect", "disconnect", "tcpclean"] }
sinks = ["notices"]
"#;

/// A backend with a persistent session, as docs/presence.md recommends: notices published
/// while it is away (a broker restart, say) are queued for it.
fn backend_options(addr: std::net::SocketAddr, id: &str) -> MqttOptions {
    let mut o = herald_testkit::options(addr, id, false);
    o.set_credentials(
        "Signature|backend|herald-demo",
        herald_auth::sign("backend-secret", id),
    );
    o
}

/// A backend subscribed to every notice.
pub(crate) async fn backend(addr: std::net::SocketAddr) -> TestClient {
    let mut b = TestClient::connected(backend_options(addr, "GID_demo@@@backend")).await;
    b.subscribe("$notice/GID_demo/#", QoS::AtLeastOnce).await;
    b
}

/// The next notice about `client`, skipping the backend's own.
pub(crate) async fn notice(backend: &mut TestClient, client: &str) -> Value {
    loop {
        let p = backend.next_publish().await;
        let event: Value = serde_json::from_slice(&p.payload).expect("JSON event");
        if event["clientId"] == client {
            assert_eq!(
                p.topic,
                format!(
                    "$notice/GID_demo/{client}/{}",
                    event["eventType"].as_str().expect("type")
                )
            );
            return event;
        }
    }
}

/// A CONNECT for `client_id` with a wrong password; returns the connection after its CONNACK.
async fn wrong_password(addr: std::net::SocketAddr, client_id: &str) -> RawClient {
    let mut raw = RawClient::connect(addr).await;
    raw.send(RawClient::connect_packet(
        client_id,
        Some("Signature|demo|herald-demo"),
        Some("wrong"),
        true,
    ))
    .await;
    assert!(matches!(
        raw.recv().await,
        Some(herald_protocol::Packet::ConnAck(_))
    ));
    raw
}

fn kind_reason(e: &Value) -> (String, Option<String>) {
    (
        e["eventType"].as_str().unwrap_or_default().to_string(),
        e["reason"].as_str().map(str::to_string),
    )
}

/// The next two notices about `client`: its `disconnect` and a `tcpclean`, both with
/// `client_disconnect`.
pub(crate) async fn expect_disconnected(backend: &mut TestClient, client: &str) {
    let reason = Some("client_disconnect");
    expect(&notice(backend, client).await, "disconnect", reason);
    expect(&notice(backend, client).await, "tcpclean", reason);
}

pub(crate) fn expect(e: &Value, kind: &str, reason: Option<&str>) {
    assert_eq!(
        kind_reason(e),
        (kind.to_string(), reason.map(str::to_string)),
        "{e}"
    );
}

#[tokio::test]
async fn events_carry_the_documented_fields() {
    let broker = TestBroker::demo(PRESENCE).await;
    let mut b = backend(broker.addr).await;
    let dev = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    let raw = loop {
        let p = b.next_publish().await;
        if p.topic.contains(DEV) {
            break String::from_utf8(p.payload.to_vec()).expect("UTF-8");
        }
    };
    // Keys in the order of DESIGN.md 5.1 (the first five are Alibaba's).
    let order = [
        "eventType",
        "clientId",
        "channelId",
        "clientIp",
        "time",
        "seq",
        "eventId",
        "groupId",
        "deviceId",
        "node",
        "cleanSession",
        "protocol",
        "username",
        "transport",
        "v",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|k| raw.find(&format!("\"{k}\":")).expect(k))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{raw}");
    let e: Value = serde_json::from_str(&raw).expect("JSON");
    assert_eq!(e["eventType"], "connect");
    assert_eq!(e["groupId"], "GID_demo");
    assert_eq!(e["deviceId"], "dev-1");
    assert_eq!(e["node"], "test-node");
    assert_eq!(e["transport"], "tcp");
    assert_eq!(e["username"], "Signature|demo|herald-demo");
    assert_eq!(e["channelId"].as_str().map(str::len), Some(32));
    assert!(
        e["clientIp"]
            .as_str()
            .expect("ip")
            .starts_with("127.0.0.1:")
    );
    let seq = e["seq"].as_u64().expect("seq");
    assert_eq!(e["eventId"], format!("{DEV}:{seq}"));
    assert!(e.get("password").is_none());
    dev.disconnect().await;
    let d = notice(&mut b, DEV).await;
    expect(&d, "disconnect", Some("client_disconnect"));
    let t = notice(&mut b, DEV).await;
    expect(&t, "tcpclean", Some("client_disconnect"));
    assert_eq!(d["seq"].as_u64(), Some(seq + 1));
    assert_eq!(t["seq"].as_u64(), Some(seq + 2));
    assert_eq!(t["channelId"], e["channelId"]);
    broker.stop().await;
}

#[tokio::test]
async fn every_way_a_channel_ends_has_its_reason() {
    let broker = TestBroker::demo(PRESENCE).await;
    let mut b = backend(broker.addr).await;

    // Socket dropped without DISCONNECT.
    let dev = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    expect(&notice(&mut b, DEV).await, "connect", None);
    dev.drop_connection();
    expect(
        &notice(&mut b, DEV).await,
        "tcpclean",
        Some("socket_closed"),
    );

    // Keepalive timeout (1 s keepalive, then silence).
    let mut raw = RawClient::connect(broker.addr).await;
    let mut connect = RawClient::connect_packet(
        DEV,
        Some("Signature|demo|herald-demo"),
        Some(&signature(DEV)),
        true,
    );
    if let herald_protocol::Packet::Connect(c) = &mut connect {
        c.keep_alive = 1;
    }
    raw.send(connect).await;
    expect(&notice(&mut b, DEV).await, "connect", None);
    expect(
        &notice(&mut b, DEV).await,
        "tcpclean",
        Some("keepalive_timeout"),
    );
    drop(raw);

    // Protocol error.
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send(RawClient::connect_packet(
        DEV,
        Some("Signature|demo|herald-demo"),
        Some(&signature(DEV)),
        true,
    ))
    .await;
    expect(&notice(&mut b, DEV).await, "connect", None);
    raw.send_bytes(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01])
        .await;
    expect(
        &notice(&mut b, DEV).await,
        "tcpclean",
        Some("protocol_error"),
    );

    // A refused CONNECT emits nothing.
    let mut raw = wrong_password(broker.addr, DEV).await;
    raw.expect_closed().await;
    b.expect_no_publish(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn takeover_reports_the_old_channel_before_the_new_one() {
    let broker = TestBroker::demo(PRESENCE).await;
    let mut b = backend(broker.addr).await;
    let _first = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    let c1 = notice(&mut b, DEV).await;
    let _second = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    let t1 = notice(&mut b, DEV).await;
    let c2 = notice(&mut b, DEV).await;
    expect(&t1, "tcpclean", Some("taken_over"));
    assert_eq!(t1["channelId"], c1["channelId"]);
    expect(&c2, "connect", None);
    assert_ne!(c2["channelId"], c1["channelId"]);
    let seqs: Vec<u64> = [&c1, &t1, &c2]
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    broker.stop().await;
}

/// DISCONNECT and a new CONNECT with the same id right after it, many times over: every
/// channel reports its `disconnect`, even when the broker takes the new CONNECT in before it
/// has read the old connection's DISCONNECT (the takeover waits for the old channel to read
/// what its client sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_just_before_a_reconnect_is_reported() {
    let broker = TestBroker::demo(PRESENCE).await;
    let mut b = backend(broker.addr).await;
    const CYCLES: usize = 20;
    for _ in 0..CYCLES {
        let c = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
        c.disconnect().await;
    }
    let mut got = Vec::new();
    for _ in 0..3 * CYCLES {
        got.push(kind_reason(&notice(&mut b, DEV).await));
    }
    let cycle = [
        ("connect".to_string(), None),
        (
            "disconnect".to_string(),
            Some("client_disconnect".to_string()),
        ),
        (
            "tcpclean".to_string(),
            Some("client_disconnect".to_string()),
        ),
    ];
    let expected: Vec<(String, Option<String>)> =
        cycle.iter().cloned().cycle().take(3 * CYCLES).collect();
    assert_eq!(got, expected);
    broker.stop().await;
}

/// A client that publishes at QoS 1, sends DISCONNECT in the same write and closes at once,
/// without waiting for its PUBACKs, many times over (distinct clients, no takeover): each
/// channel ends as the client asked (`disconnect`, then `tcpclean` with `client_disconnect`)
/// and every message is delivered. The broker's PUBACKs go to a connection that has already
/// gone: its task may have ended before the router acknowledges (which once read to the router
/// as a slow consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publishes_and_a_disconnect_sent_before_closing_are_all_taken() {
    publishes_and_disconnect_then_gone("quick", 100, 3, false).await;
}

/// The same with an abortive close (a reset): a PUBACK written before the task has read the
/// DISCONNECT fails, and what the client sent is still read (it once ended as `socket_closed`,
/// with the will published and the PUBLISHes after the failed write dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publishes_and_a_disconnect_sent_before_a_reset_are_all_taken() {
    publishes_and_disconnect_then_gone("reset", 100, 20, true).await;
}

/// A channel whose task has gone (its outbox closed) while the router still has its last
/// inputs: more QoS 1 PUBLISHes than an outbox holds, then its close with the reason. The
/// router's PUBACKs find the outbox closed; that is not a slow reader, and the channel ends
/// with the reason its task sent.
#[tokio::test]
async fn a_channel_whose_task_has_gone_ends_with_the_reason_the_task_sent() {
    use herald_router::{CloseReason, Input};
    let (broker, mut b, channel, rx) = direct_channel().await;
    drop(rx);
    let router = broker.broker().router().clone();
    for k in 1..=1100_u16 {
        let input = Input::Publish {
            channel: channel.clone(),
            publish: qos1_publish("demo/dev-1/gone", k, k.to_string()),
        };
        assert!(router.inputs.send(input).await.is_ok());
    }
    let reason = CloseReason::ClientDisconnect;
    assert!(
        router
            .inputs
            .send(Input::Closed { channel, reason })
            .await
            .is_ok()
    );
    expect_disconnected(&mut b, DEV).await;
    broker.stop().await;
}

/// A broker with [`PRESENCE`] whose sessions may hold every message, its backend, and a
/// clean-session watcher of `topic` at QoS 1 (its copies are not stored, so each PUBACK to a
/// publisher is sent at once, and may find the publisher's task already gone).
async fn broker_backend_watcher(topic: &str) -> (TestBroker, TestClient, TestClient) {
    let broker = TestBroker::demo(&format!(
        "{PRESENCE}\n[limits]\nmax_queued_messages = 100000\n"
    ))
    .await;
    let b = backend(broker.addr).await;
    let mut watcher =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@watcher", true)).await;
    watcher.subscribe(topic, QoS::AtLeastOnce).await;
    (broker, b, watcher)
}

/// A QoS 1 PUBLISH to `topic` with packet id `id`.
fn qos1_publish(topic: &str, id: u16, payload: String) -> herald_protocol::Publish {
    herald_protocol::Publish {
        dup: false,
        qos: herald_protocol::QoS::AtLeastOnce,
        retain: false,
        topic: herald_protocol::Topic::from_trusted(topic),
        packet_id: herald_protocol::PacketId::new(id),
        payload: bytes::Bytes::from(payload),
    }
}

/// QoS 1 PUBLISHes to `topic` with ids 1..=`count` and payloads `payload(id)`, then a
/// DISCONNECT (to send in one write).
fn publishes_then_disconnect(
    topic: &str,
    count: u16,
    payload: impl Fn(u16) -> String,
) -> Vec<herald_protocol::Packet> {
    use herald_protocol::Packet;
    (1..=count)
        .map(|k| Packet::Publish(qos1_publish(topic, k, payload(k))))
        .chain([Packet::Disconnect])
        .collect()
}

/// The distinct payloads `watcher` receives until it has `wanted`, or nothing more comes for
/// 3 s (the caller's assertions then say what is missing).
async fn payloads(watcher: &mut TestClient, wanted: usize) -> std::collections::BTreeSet<String> {
    let mut messages = std::collections::BTreeSet::new();
    while messages.len() < wanted {
        match watcher.next_incoming(Duration::from_secs(3)).await {
            Some(Ok(rumqttc::Packet::Publish(p))) => {
                messages.insert(String::from_utf8_lossy(&p.payload).to_string());
            }
            Some(Ok(_)) => continue,
            _ => break,
        }
    }
    messages
}

/// A parked client sends more small QoS 1 PUBLISHes than a channel's outbox holds (1,024
/// packets), then DISCONNECT, and connects again at once: whether its old channel reads them
/// itself or a takeover finds them in its socket (and routes them with its outbox closed, so
/// that the router's unwritten PUBACKs cannot fill it; the test does not force that order), the
/// old channel ends as its client asked, before the new one's `connect`, and every message is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_finds_more_publishes_than_the_outbox_holds_ends_cleanly() {
    const MESSAGES: u16 = 2000;
    let id = "GID_demo@@@many";
    let (broker, mut b, mut watcher) = broker_backend_watcher("demo/many").await;
    let mut old = RawClient::signed(broker.addr, id, 60).await;
    expect(&notice(&mut b, id).await, "connect", None);
    // Idle past `limits.park_idle_ms`: parked.
    tokio::time::sleep(Duration::from_millis(250)).await;
    old.send_all(publishes_then_disconnect("demo/many", MESSAGES, |k| {
        k.to_string()
    }))
    .await;
    let _new = RawClient::signed(broker.addr, id, 60).await;
    let clean = Some("client_disconnect");
    expect(&notice(&mut b, id).await, "disconnect", clean);
    expect(&notice(&mut b, id).await, "tcpclean", clean);
    expect(&notice(&mut b, id).await, "connect", None);
    let messages = payloads(&mut watcher, usize::from(MESSAGES)).await;
    assert_eq!(messages.len(), usize::from(MESSAGES));
    drop(old);
    broker.stop().await;
}

/// `cycles` clients `GID_demo@@@<name>-<i>`, each: CONNECT, `per_cycle` QoS 1 PUBLISHes and
/// a DISCONNECT in one write, then the socket closed (reset if `abort`) without reading.
async fn publishes_and_disconnect_then_gone(
    name: &str,
    cycles: usize,
    per_cycle: u16,
    abort: bool,
) {
    let (broker, mut b, mut watcher) = broker_backend_watcher("demo/quick").await;
    let clients: Vec<String> = (0..cycles)
        .map(|i| format!("GID_demo@@@{name}-{i}"))
        .collect();
    for (i, id) in clients.iter().enumerate() {
        let mut raw = RawClient::signed(broker.addr, id, 60).await;
        raw.send_all(publishes_then_disconnect("demo/quick", per_cycle, |k| {
            format!("{i}-{k}")
        }))
        .await;
        if abort {
            raw.abort();
        }
    }
    let wanted_messages = cycles * usize::from(per_cycle);
    let messages = payloads(&mut watcher, wanted_messages).await;
    let mut events: std::collections::BTreeMap<String, Vec<(String, Option<String>)>> =
        std::collections::BTreeMap::new();
    let mut seen_events = 0;
    while seen_events < 3 * cycles {
        let p = match b.next_incoming(Duration::from_secs(3)).await {
            Some(Ok(rumqttc::Packet::Publish(p))) => p,
            Some(Ok(_)) => continue,
            _ => break,
        };
        let event: Value = serde_json::from_slice(&p.payload).expect("JSON event");
        let client = event["clientId"].as_str().unwrap_or_default().to_string();
        if clients.contains(&client) {
            events.entry(client).or_default().push(kind_reason(&event));
            seen_events += 1;
        }
    }
    let clean = Some("client_disconnect".to_string());
    let cycle = vec![
        ("connect".to_string(), None),
        ("disconnect".to_string(), clean.clone()),
        ("tcpclean".to_string(), clean),
    ];
    for id in &clients {
        assert_eq!(events.get(id), Some(&cycle), "{id}");
    }
    assert_eq!(messages.len(), wanted_messages);
    broker.stop().await;
}

/// A CONNECT for `DEV` sent straight to the router, with its own outbox.
fn connect_request(outbox: herald_router::Outbox) -> herald_router::ConnectRequest {
    herald_router::ConnectRequest {
        channel: herald_router::ChannelId::random(),
        client_id: herald_protocol::ClientId::parse_alibaba(DEV, 64).expect("client id"),
        clean_session: true,
        will: None,
        username: Some("Signature|demo|herald-demo".into()),
        protocol: herald_protocol::Protocol::V311,
        peer: "127.0.0.1:40000".parse().expect("addr"),
        transport: herald_router::Transport::Tcp,
        outbox,
    }
}

/// A broker with [`PRESENCE`], its backend, and a channel of `DEV` connected straight through
/// the router (its CONNACK and its `connect` notice taken): a channel without a task.
async fn direct_channel() -> (
    TestBroker,
    TestClient,
    herald_router::ChannelRef,
    herald_router::OutboxReceiver,
) {
    let broker = TestBroker::demo(PRESENCE).await;
    let mut b = backend(broker.addr).await;
    let (outbox, mut rx) = herald_router::channel_outbox(16);
    let request = connect_request(outbox);
    let channel = herald_router::ChannelRef::new(request.client_id.clone(), request.channel);
    let router = broker.broker().router().clone();
    let sent = router
        .inputs
        .send(herald_router::Input::Connect(Box::new(request)))
        .await;
    assert!(sent.is_ok());
    assert!(is_connack(rx.recv().await));
    expect(&notice(&mut b, DEV).await, "connect", None);
    (broker, b, channel, rx)
}

fn is_connack(out: Option<herald_router::Outgoing>) -> bool {
    matches!(
        out,
        Some(herald_router::Outgoing::Packet(
            herald_protocol::Packet::ConnAck(_)
        ))
    )
}

/// An old channel that does not end when a takeover asks (here: a channel with no task, whose
/// outbox nobody reads) holds the new CONNECT up for at most `TAKEOVER_WAIT` (500 ms), then
/// ends as `taken_over`. What the new connection sent meanwhile (a SUBSCRIBE before its
/// CONNACK) is handled after its CONNECT.
#[tokio::test]
async fn a_takeover_of_a_channel_that_does_not_answer_goes_on_after_half_a_second() {
    use herald_router::{ChannelRef, CloseReason, Input, Outgoing, channel_outbox};
    let (broker, mut b, old, mut old_rx) = direct_channel().await;
    let router = broker.broker().router().clone();
    let old_id = old.id;
    let (new_outbox, mut new_rx) = channel_outbox(16);
    let new = connect_request(new_outbox);
    let new_channel = ChannelRef::new(new.client_id.clone(), new.channel);
    let started = std::time::Instant::now();
    assert!(
        router
            .inputs
            .send(Input::Connect(Box::new(new)))
            .await
            .is_ok()
    );
    let subscribe = Input::Subscribe {
        channel: new_channel,
        packet_id: herald_protocol::PacketId::new(7).expect("id"),
        filters: vec![(
            "demo/dev-1/#".into(),
            Some(herald_protocol::QoS::AtLeastOnce),
        )],
    };
    assert!(router.inputs.send(subscribe).await.is_ok());
    // The old channel is asked to end; nothing answers for it.
    assert!(matches!(
        old_rx.recv().await,
        Some(Outgoing::Close(CloseReason::TakenOver))
    ));
    assert!(is_connack(new_rx.recv().await));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "the CONNACK came after {waited:?}, before the old channel's time was up"
    );
    assert!(
        matches!(
            new_rx.recv().await,
            Some(Outgoing::Packet(herald_protocol::Packet::SubAck { .. }))
        ),
        "the SUBSCRIBE sent before the CONNACK is answered after it"
    );
    let t = notice(&mut b, DEV).await;
    expect(&t, "tcpclean", Some("taken_over"));
    assert_eq!(t["channelId"], old_id.to_string());
    expect(&notice(&mut b, DEV).await, "connect", None);
    broker.stop().await;
}

/// The old connection read the DISCONNECT itself and has gone (its outbox closed, its close on
/// the way) when the router takes the new CONNECT: the takeover waits for that close, and the
/// old channel ends as `client_disconnect`, at once.
#[tokio::test]
async fn a_takeover_of_a_channel_whose_task_has_just_ended_waits_for_its_close() {
    use herald_router::{CloseReason, Input, channel_outbox};
    let (broker, mut b, old_channel, old_rx) = direct_channel().await;
    let router = broker.broker().router().clone();
    drop(old_rx);
    let (new_outbox, mut new_rx) = channel_outbox(16);
    let started = std::time::Instant::now();
    let new = Input::Connect(Box::new(connect_request(new_outbox)));
    assert!(router.inputs.send(new).await.is_ok());
    let closed = Input::Closed {
        channel: old_channel,
        reason: CloseReason::ClientDisconnect,
    };
    assert!(router.inputs.send(closed).await.is_ok());
    assert!(is_connack(new_rx.recv().await));
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "no timeout waited"
    );
    expect_disconnected(&mut b, DEV).await;
    expect(&notice(&mut b, DEV).await, "connect", None);
    broker.stop().await;
}

#[tokio::test]
async fn seq_survives_restarts_and_shutdown_reports_server_shutdown() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let events = dir.path().join("events.jsonl");
    let extra = format!(
        "{PRESENCE}\n[[sinks]]\nid = \"file\"\ntype = \"file\"\npath = \"{}\"\n\n[[rules]]\nid = \"to-file\"\nkind = \"status_notice\"\nsinks = [\"file\"]\n",
        events.display()
    );
    let config = demo_config(&dir.path().join("data"), &extra);
    for _ in 0..2 {
        let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
        let _dev = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
        let status = tokio::task::spawn_blocking(move || broker.signal_and_wait(15))
            .await
            .expect("join");
        assert_eq!(status.code(), Some(0));
    }
    let lines: Vec<Value> = herald_testkit::json_lines(&events)
        .into_iter()
        .filter(|e| e["clientId"] == DEV)
        .collect();
    let got: Vec<(String, Option<String>, u64)> = lines
        .iter()
        .map(|e| {
            let (k, r) = kind_reason(e);
            (k, r, e["seq"].as_u64().expect("seq"))
        })
        .collect();
    let server_shutdown = Some("server_shutdown".to_string());
    assert_eq!(
        got,
        vec![
            ("connect".into(), None, 1),
            ("tcpclean".into(), server_shutdown.clone(), 2),
            ("connect".into(), None, 3),
            ("tcpclean".into(), server_shutdown, 4),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_every_open_channel_gets_broker_restart_before_new_connections() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let events = dir.path().join("events.jsonl");
    let extra = format!(
        "{PRESENCE}\n[[sinks]]\nid = \"file\"\ntype = \"file\"\npath = \"{}\"\n\n[[rules]]\nid = \"to-file\"\nkind = \"status_notice\"\nsinks = [\"file\"]\n",
        events.display()
    );
    let config = demo_config(&dir.path().join("data"), &extra);
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let mut b = backend(broker.addr).await;
    let ids: Vec<String> = (0..5).map(|i| format!("GID_demo@@@crash-{i}")).collect();
    let mut clients = Vec::new();
    for id in &ids {
        clients.push(TestClient::connected(signed_options(broker.addr, id, true)).await);
        expect(&notice(&mut b, id).await, "connect", None);
    }
    broker.kill();
    drop(clients);

    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let mut b = backend(broker.addr).await;
    // The mqtt sink's outbox survived too: the backend learns of the crash first.
    expect(
        &notice(&mut b, &ids[0]).await,
        "tcpclean",
        Some("broker_restart"),
    );
    let again = TestClient::connected(signed_options(broker.addr, &ids[0], true)).await;
    expect(&notice(&mut b, &ids[0]).await, "connect", None);
    drop(again);
    // The file sink saw, for every crashed channel, tcpclean broker_restart right after its
    // connect, and before the new connect of crash-0.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // At least once: an entry delivered just before the kill may come again after the restart,
    // identical, with the same eventId. Consumers (and this test) deduplicate by eventId.
    let mut seen = std::collections::HashMap::new();
    let mut all: Vec<Value> = Vec::new();
    for e in herald_testkit::json_lines(&events) {
        let id = e["eventId"].as_str().expect("eventId").to_string();
        match seen.get(&id) {
            Some(first) => assert_eq!(first, &e, "same eventId, different event"),
            None => {
                seen.insert(id, e.clone());
                all.push(e);
            }
        }
    }
    for id in &ids {
        let mine: Vec<(String, Option<String>)> = all
            .iter()
            .filter(|e| e["clientId"] == id.as_str())
            .map(kind_reason)
            .collect();
        assert_eq!(mine[0], ("connect".to_string(), None), "{id}: {mine:?}");
        assert_eq!(
            mine[1],
            ("tcpclean".to_string(), Some("broker_restart".to_string())),
            "{id}: {mine:?}"
        );
    }
    let restart_positions: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, e)| e["reason"] == "broker_restart")
        .map(|(i, _)| i)
        .collect();
    let reconnect = all
        .iter()
        .rposition(|e| e["clientId"] == ids[0].as_str() && e["eventType"] == "connect")
        .expect("reconnect");
    assert!(restart_positions.iter().all(|&p| p < reconnect));
    broker.kill();
}

#[tokio::test]
async fn the_retained_snapshot_tells_late_subscribers_the_state() {
    let broker = TestBroker::demo(PRESENCE).await;
    let dev = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    let mut late = TestClient::connected(backend_options(broker.addr, "GID_demo@@@late")).await;
    late.subscribe(&format!("$presence/{DEV}"), QoS::AtLeastOnce)
        .await;
    let p = late.next_publish().await;
    assert!(p.retain);
    let state: Value = serde_json::from_slice(&p.payload).expect("JSON");
    assert_eq!(state["online"], true);
    assert_eq!(state["lastEvent"], "connect");
    dev.drop_connection();
    let p = late.next_publish().await;
    let state: Value = serde_json::from_slice(&p.payload).expect("JSON");
    assert_eq!(state["online"], false);
    assert_eq!(state["reason"], "socket_closed");
    // Keys that do not list the presence topics cannot read them.
    let mut device =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@nosy", true)).await;
    let codes = device
        .subscribe(&format!("$presence/{DEV}"), QoS::AtLeastOnce)
        .await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Failure]);
    let codes = device.subscribe("$notice/#", QoS::AtLeastOnce).await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Failure]);

    // A wildcard subscription gets every snapshot, in the documented key order; and so it does
    // after a restart, from the store.
    let keys = [
        "clientId",
        "online",
        "since",
        "channelId",
        "clientIp",
        "seq",
        "lastEvent",
        "reason",
        "node",
        "v",
    ];
    let mut broker = broker;
    for round in 0..2 {
        let mut all = TestClient::connected(backend_options(broker.addr, "GID_demo@@@all")).await;
        all.subscribe("$presence/#", QoS::AtLeastOnce).await;
        let mut states = Vec::new();
        while let Some(Ok(packet)) = all.next_incoming(Duration::from_millis(500)).await {
            if let rumqttc::Packet::Publish(p) = packet {
                assert!(p.retain, "round {round}");
                states.push((
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                ));
            }
        }
        let (_, dev_state) = states
            .iter()
            .find(|(topic, _)| *topic == format!("$presence/{DEV}"))
            .unwrap_or_else(|| panic!("round {round}: no snapshot of {DEV} in {states:?}"));
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| dev_state.find(&format!("\"{k}\":")).expect("key present"))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{dev_state}");
        let state: Value = serde_json::from_str(dev_state).expect("JSON");
        assert_eq!(state["online"], false, "round {round}");
        assert_eq!(state["reason"], "socket_closed", "round {round}");
        all.disconnect().await;
        if round == 0 {
            broker = broker.restart().await;
        }
    }
    broker.stop().await;
}

/// Every `$presence` snapshot, by topic, that a new subscription to `$presence/#` receives.
async fn snapshots(addr: std::net::SocketAddr) -> std::collections::BTreeMap<String, String> {
    let mut all = TestClient::connected(backend_options(addr, "GID_demo@@@all")).await;
    all.subscribe("$presence/#", QoS::AtLeastOnce).await;
    let mut states = std::collections::BTreeMap::new();
    while let Some(Ok(packet)) = all.next_incoming(Duration::from_millis(500)).await {
        if let rumqttc::Packet::Publish(p) = packet {
            assert!(p.retain);
            states.insert(p.topic, String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    all.disconnect().await;
    states
}

/// The snapshots and open channels are not stored with each event but read back at start from
/// each client's newest history entry; after a refused login (its `connect_failed` event the
/// newest entry) the snapshot, and the channel if one is open, are stored as they were. Either
/// way, what comes back after SIGKILL is what was there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_come_back_after_sigkill_as_they_were() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let extra = format!(
        "{PRESENCE}\n[[rules]]\nid = \"refusals\"\nkind = \"status_notice\"\nsource = {{ events = [\"connect_failed\"] }}\nsinks = [\"notices\"]\n\n[presence]\nconnect_failed = true\n"
    );
    let config = demo_config(&dir.path().join("data"), &extra);
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let mut b = backend(broker.addr).await;
    let id = |name: &str| format!("GID_demo@@@snap-{name}");
    // gone: connected and dropped. refused: the same, then a login with a wrong password.
    // online: still connected when the broker is killed.
    let mut online_connect = Value::Null;
    for name in ["gone", "refused", "online"] {
        let client = TestClient::connected(signed_options(broker.addr, &id(name), true)).await;
        let connect = notice(&mut b, &id(name)).await;
        expect(&connect, "connect", None);
        if name == "online" {
            online_connect = connect;
            std::mem::forget(client);
        } else {
            client.drop_connection();
            expect(
                &notice(&mut b, &id(name)).await,
                "tcpclean",
                Some("socket_closed"),
            );
        }
    }
    let _raw = wrong_password(broker.addr, &id("refused")).await;
    let refused = notice(&mut b, &id("refused")).await;
    expect(&refused, "connect_failed", Some("bad_username_or_password"));
    // A refused login for a client id whose channel is open: its newest event is no longer the
    // connect, so the open channel is recorded apart, and still gets its broker_restart.
    let _raw = wrong_password(broker.addr, &id("online")).await;
    let failed = notice(&mut b, &id("online")).await;
    expect(&failed, "connect_failed", Some("bad_username_or_password"));
    let before = snapshots(broker.addr).await;
    let topic = |name: &str| format!("$presence/{}", id(name));
    assert!(before.contains_key(&topic("gone")), "{before:?}");
    assert!(before.contains_key(&topic("refused")), "{before:?}");
    let refused_state: Value = serde_json::from_str(&before[&topic("refused")]).expect("JSON");
    assert_eq!(refused_state["lastEvent"], "tcpclean");
    assert_eq!(
        refused_state["seq"].as_u64().map(|s| s + 1),
        refused["seq"].as_u64()
    );
    // The open channel's snapshot is still its connect (a refused login changes no state),
    // with that event's seq, channel, address and time.
    let online_state: Value = serde_json::from_str(&before[&topic("online")]).expect("JSON");
    assert_eq!(online_state["online"], true, "{online_state}");
    assert_eq!(online_state["lastEvent"], "connect");
    assert_eq!(online_state["seq"], online_connect["seq"]);
    assert_eq!(online_state["channelId"], online_connect["channelId"]);
    assert_eq!(online_state["clientIp"], online_connect["clientIp"]);
    assert_eq!(online_state["since"], online_connect["time"]);
    assert_eq!(
        online_state["seq"].as_u64().map(|s| s + 1),
        failed["seq"].as_u64()
    );
    broker.kill();

    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let mut b = backend(broker.addr).await;
    let restart = notice(&mut b, &id("online")).await;
    expect(&restart, "tcpclean", Some("broker_restart"));
    assert_eq!(
        restart["seq"].as_u64(),
        failed["seq"].as_u64().map(|s| s + 1)
    );
    let after = snapshots(broker.addr).await;
    // Byte for byte what they were, rebuilt from history or read back as stored.
    for name in ["gone", "refused"] {
        assert_eq!(after.get(&topic(name)), before.get(&topic(name)), "{name}");
    }
    let online: Value = serde_json::from_str(&after[&topic("online")]).expect("JSON");
    assert_eq!(online["online"], false);
    assert_eq!(online["reason"], "broker_restart");
    // Seqs go on from the newest history entry: the refused client's next event follows its
    // connect_failed.
    let again = TestClient::connected(signed_options(broker.addr, &id("refused"), true)).await;
    let connect = notice(&mut b, &id("refused")).await;
    expect(&connect, "connect", None);
    assert_eq!(
        connect["seq"].as_u64(),
        refused["seq"].as_u64().map(|s| s + 1)
    );
    again.drop_connection();
    let closed = notice(&mut b, &id("refused")).await;
    expect(&closed, "tcpclean", Some("socket_closed"));
    broker.kill();

    // The snapshot stored at the refused login is stale now that other events followed: after
    // another SIGKILL the start deletes it (else it would come back, as of before the refused
    // login) and rebuilds the snapshot from the newest entry.
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let last = snapshots(broker.addr).await;
    let state: Value = serde_json::from_str(&last[&topic("refused")]).expect("JSON");
    assert_eq!(state["seq"], closed["seq"]);
    assert_eq!(state["lastEvent"], "tcpclean");
    assert_eq!(state["channelId"], closed["channelId"]);
    broker.kill();

    // With snapshots turned off there are none, stored or rebuilt; turned on again, they are
    // rebuilt from the history.
    let off = config.replace(
        "connect_failed = true",
        "connect_failed = true\nsnapshot_topic = false",
    );
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &off);
    assert_eq!(snapshots(broker.addr).await, Default::default());
    broker.kill();
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    assert_eq!(
        snapshots(broker.addr).await.get(&topic("refused")),
        Some(&last[&topic("refused")])
    );
    broker.kill();
}

#[tokio::test]
async fn refused_logins_can_be_audited_with_connect_failed() {
    let audit = "[[rules]]\nid = \"audit\"\nkind = \"status_notice\"\nsource = { events = [\"connect_failed\"] }\nsinks = [\"notices\"]\n";
    let extra = format!("[presence]\nconnect_failed = true\n{PRESENCE}\n{audit}");
    let broker = TestBroker::demo(&extra).await;
    let mut b = backend(broker.addr).await;
    let _refused = wrong_password(broker.addr, DEV).await;
    let failed = notice(&mut b, DEV).await;
    expect(&failed, "connect_failed", Some("bad_username_or_password"));
    assert_eq!(
        failed["clientIp"]
            .as_str()
            .map(|ip| ip.starts_with("127.0.0.1:")),
        Some(true)
    );
    let _dev = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    let connect = notice(&mut b, DEV).await;
    expect(&connect, "connect", None);
    assert_eq!(
        connect["seq"].as_u64(),
        failed["seq"].as_u64().map(|s| s + 1)
    );
    broker.stop().await;
}
