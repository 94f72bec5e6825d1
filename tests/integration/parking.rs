//! Parked connections (`limits.park_idle_ms`): an idle plain TCP connection gives up its task
//! and must still behave exactly as if it had one: deliveries, PINGREQ and acknowledgements,
//! keepalive expiry and the peer closing (with their presence events), takeover, shutdown, its
//! place under `max_connections`, half a packet at idle time, many connections cycling.

use std::time::Duration;

use herald_protocol::{Packet, Publish, QoS as PQoS};
use herald_testkit::{
    OPS_KEY, RawClient, TestBroker, TestClient, metric, signature, signed_options,
};
use rumqttc::QoS;

use crate::QUIET;
use crate::presence::{DEV, PRESENCE, backend, expect, expect_disconnected, notice};

/// Park after 100 ms of silence; the admin API for the gauge; presence notices.
fn config(park_idle_ms: u64) -> String {
    format!("{PRESENCE}{OPS_KEY}\n[limits]\npark_idle_ms = {park_idle_ms}\n")
}

/// Waits (at most 5 s) until `herald_connections_parked` is `want`.
pub(crate) async fn parked(broker: &TestBroker, want: u64) {
    let mut seen = 0;
    for _ in 0..100 {
        seen = metric(broker, "herald_connections_parked").await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{seen} connections parked, expected {want}");
}

/// `DEV` connected raw with `keep_alive` seconds, its `connect` notice taken from `backend`,
/// and parked (with the backend, two parked connections).
async fn parked_device(
    broker: &TestBroker,
    backend: &mut TestClient,
    keep_alive: u16,
) -> RawClient {
    let raw = RawClient::signed(broker.addr, DEV, keep_alive).await;
    expect(&notice(backend, DEV).await, "connect", None);
    parked(broker, 2).await;
    raw
}

#[tokio::test]
async fn a_parked_subscriber_gets_every_message_and_parks_again() {
    let broker = TestBroker::demo(&config(100)).await;
    let mut backend = backend(broker.addr).await;
    let mut sub = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    sub.subscribe("demo/parked/#", QoS::AtLeastOnce).await;
    let mut publisher =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@pub-1", true)).await;
    // The backend, the subscriber and the publisher: plain TCP, Signature passwords, all
    // three park once quiet.
    parked(&broker, 3).await;
    for round in 0..3u8 {
        publisher
            .publish("demo/parked/a", QoS::AtLeastOnce, false, &[round])
            .await;
        publisher
            .publish("demo/parked/b", QoS::AtMostOnce, false, &[round, 0])
            .await;
        let first = sub.next_publish().await;
        let second = sub.next_publish().await;
        assert_eq!(
            (&first.topic[..], &first.payload[..]),
            ("demo/parked/a", &[round][..])
        );
        assert_eq!(
            (&second.topic[..], &second.payload[..]),
            ("demo/parked/b", &[round, 0][..])
        );
        // Everyone goes quiet again and parks again.
        parked(&broker, 3).await;
    }
    assert_eq!(metric(&broker, "herald_connections ").await, 3);
    // Parking is not an event: the subscriber connected once and is still online.
    expect(&notice(&mut backend, DEV).await, "connect", None);
    expect(
        &notice(&mut backend, "GID_demo@@@pub-1").await,
        "connect",
        None,
    );
    backend.expect_no_publish(QUIET).await;
    broker.stop().await;
}

/// A raw QoS 0 subscriber of `topic` and a publisher, both parked; with the parker's write
/// count at that point.
async fn parked_subscriber(broker: &TestBroker, topic: &str) -> (RawClient, TestClient, u64) {
    let mut sub = RawClient::signed(broker.addr, DEV, 600).await;
    sub.send(Packet::Subscribe {
        packet_id: herald_protocol::PacketId::new(1).expect("id"),
        filters: vec![(topic.to_string(), PQoS::AtMostOnce)],
    })
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck { .. })));
    let publisher =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@pub-1", true)).await;
    parked(broker, 2).await;
    let before = metric(broker, "herald_parked_writes_total").await;
    (sub, publisher, before)
}

#[tokio::test]
async fn the_parker_writes_to_a_parked_subscriber_without_resuming_it() {
    let broker = TestBroker::demo(&config(100)).await;
    let (mut sub, mut publisher, before) = parked_subscriber(&broker, "demo/quiet").await;
    for round in 0..3u8 {
        publisher
            .publish("demo/quiet", QoS::AtMostOnce, false, &[round])
            .await;
        let Some(Packet::Publish(publish)) = sub.recv().await else {
            panic!("expected a PUBLISH");
        };
        assert_eq!(&publish.payload[..], &[round][..]);
    }
    // The subscriber sent nothing back, so each message was written by the parker.
    assert_eq!(
        metric(&broker, "herald_parked_writes_total").await - before,
        3
    );
    sub.send(Packet::PingReq).await;
    assert!(matches!(sub.recv().await, Some(Packet::PingResp)));
    broker.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_gets_everything_in_order_when_it_reads_again() {
    let broker = TestBroker::demo(&config(100)).await;
    let (mut sub, mut publisher, before) = parked_subscriber(&broker, "demo/bulk").await;
    // 200 x 60 KiB, one at a time, while the subscriber does not read: the parker writes the
    // first ones itself, until the loopback socket buffers (4 MiB to send, 6 to receive at
    // most) cannot take a whole message; then the connection resumes and its task writes
    // what the parker could not, then the rest.
    let count = 200u16;
    let payload = vec![7u8; 60 * 1024];
    for n in 0..count {
        let mut body = n.to_be_bytes().to_vec();
        body.extend_from_slice(&payload);
        publisher
            .publish("demo/bulk", QoS::AtMostOnce, false, &body)
            .await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let in_place = metric(&broker, "herald_parked_writes_total").await - before;
    assert!(
        (1..u64::from(count)).contains(&in_place),
        "{in_place} of {count} written by the parker: some, not all"
    );
    for n in 0..count {
        let Some(Packet::Publish(publish)) = sub.recv().await else {
            panic!("expected PUBLISH {n}");
        };
        assert_eq!(publish.payload.len(), 2 + payload.len());
        assert_eq!(
            &publish.payload[..2],
            &n.to_be_bytes()[..],
            "in order, none lost"
        );
    }
    sub.expect_silence(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_parked_connection_answers_pings_and_takes_qos1_acks() {
    let broker = TestBroker::demo(&config(100)).await;
    // A persistent session, so that an unacknowledged message would be sent again on return.
    let connect = |client: &str| {
        RawClient::connect_packet(
            client,
            Some(herald_testkit::DEMO_USER),
            Some(&signature(client)),
            false,
        )
    };
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send(connect(DEV)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    raw.send(Packet::Subscribe {
        packet_id: herald_protocol::PacketId::new(1).expect("id"),
        filters: vec![("demo/raw".to_string(), PQoS::AtLeastOnce)],
    })
    .await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck { .. })));
    parked(&broker, 1).await;
    raw.send(Packet::PingReq).await;
    assert!(matches!(raw.recv().await, Some(Packet::PingResp)));
    parked(&broker, 1).await;
    let mut publisher =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@pub-1", true)).await;
    publisher
        .publish("demo/raw", QoS::AtLeastOnce, false, b"to a parked client")
        .await;
    let Some(Packet::Publish(Publish {
        packet_id: Some(id),
        payload,
        ..
    })) = raw.recv().await
    else {
        panic!("expected a QoS 1 PUBLISH");
    };
    assert_eq!(&payload[..], b"to a parked client");
    // Not acknowledged yet: the router keeps it in flight while the connection parks again;
    // the PUBACK wakes it and is taken.
    parked(&broker, 2).await;
    raw.send(Packet::PubAck(id)).await;
    raw.expect_silence(QUIET).await;
    raw.send(Packet::Disconnect).await;
    raw.expect_closed().await;
    let mut back = RawClient::connect(broker.addr).await;
    back.send(connect(DEV)).await;
    assert!(matches!(back.recv().await, Some(Packet::ConnAck(_))));
    back.expect_silence(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn keepalive_expiry_and_a_closed_socket_end_parked_connections_with_their_events() {
    let broker = TestBroker::demo(&config(100)).await;
    let mut backend = backend(broker.addr).await;

    // Keepalive 1 s: parked after 100 ms, then silent until 1.5 s have passed.
    let mut raw = parked_device(&broker, &mut backend, 1).await;
    let started = std::time::Instant::now();
    expect(
        &notice(&mut backend, DEV).await,
        "tcpclean",
        Some("keepalive_timeout"),
    );
    raw.expect_closed().await;
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "keepalive expiry of a parked connection took {waited:?}"
    );

    // The peer closes a parked connection: noticed at once, not at the keepalive.
    let raw = parked_device(&broker, &mut backend, 60).await;
    drop(raw);
    let closed = tokio::time::timeout(Duration::from_secs(5), notice(&mut backend, DEV))
        .await
        .expect("tcpclean within 5 s");
    expect(&closed, "tcpclean", Some("socket_closed"));
    parked(&broker, 1).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_parked_connection_is_taken_over_and_closed_at_shutdown() {
    let broker = TestBroker::demo(&config(100)).await;
    let mut backend = backend(broker.addr).await;
    let mut old = parked_device(&broker, &mut backend, 60).await;
    let mut new = RawClient::signed(broker.addr, DEV, 60).await;
    expect(
        &notice(&mut backend, DEV).await,
        "tcpclean",
        Some("taken_over"),
    );
    expect(&notice(&mut backend, DEV).await, "connect", None);
    old.expect_closed().await;
    parked(&broker, 2).await;
    broker.stop().await;
    new.expect_closed().await;
}

/// A parked client sends DISCONNECT and connects again at once: the takeover resumes the
/// parked channel, which finds the DISCONNECT; no waiting for the takeover's time limit.
#[tokio::test]
async fn a_parked_connection_that_sent_disconnect_just_before_a_takeover_reports_it() {
    let broker = TestBroker::demo(&config(100)).await;
    let mut backend = backend(broker.addr).await;
    let mut old = parked_device(&broker, &mut backend, 60).await;
    old.send(Packet::Disconnect).await;
    let started = std::time::Instant::now();
    let _new = RawClient::signed(broker.addr, DEV, 60).await;
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(400),
        "CONNACK after {waited:?}"
    );
    expect_disconnected(&mut backend, DEV).await;
    expect(&notice(&mut backend, DEV).await, "connect", None);
    old.expect_closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn with_parking_off_idle_connections_keep_their_task() {
    let broker = TestBroker::demo(&config(0)).await;
    let mut raw = RawClient::signed(broker.addr, DEV, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric(&broker, "herald_connections_parked").await, 0);
    raw.send(Packet::PingReq).await;
    assert!(matches!(raw.recv().await, Some(Packet::PingResp)));
    broker.stop().await;
}

#[tokio::test]
async fn half_a_packet_at_idle_time_does_not_keep_a_connection_from_parking() {
    let broker = TestBroker::demo(&config(100)).await;
    let mut raw = RawClient::signed(broker.addr, DEV, 60).await;
    parked(&broker, 1).await;
    // Half a PINGREQ wakes it; the idle time passes with the byte buffered; then the rest.
    raw.send_bytes(&[0xC0]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    raw.send_bytes(&[0x00]).await;
    assert!(matches!(raw.recv().await, Some(Packet::PingResp)));
    // Parked again after the idle time, not at the keepalive deadline 90 s away.
    parked(&broker, 1).await;
    broker.stop().await;
}

#[tokio::test]
async fn many_connections_park_and_resume_again_and_again() {
    let broker = TestBroker::demo(&config(100)).await;
    let mut clients = Vec::new();
    for i in 0..80 {
        // Half without keepalive: parked with no deadline at all.
        let keep_alive = if i % 2 == 0 { 0 } else { 60 };
        clients.push(
            RawClient::signed(broker.addr, &format!("GID_demo@@@many-{i}"), keep_alive).await,
        );
    }
    // Each round leaves 40 stale deadlines in the parker's heap, so it is rebuilt on the way,
    // and slab slots are reused by other connections between rounds.
    for _ in 0..5 {
        parked(&broker, 80).await;
        for client in &mut clients {
            client.send(Packet::PingReq).await;
        }
        for client in &mut clients {
            assert!(matches!(client.recv().await, Some(Packet::PingResp)));
        }
    }
    parked(&broker, 80).await;
    // Deadlines still work after all that.
    let mut short = RawClient::signed(broker.addr, DEV, 1).await;
    parked(&broker, 81).await;
    tokio::time::timeout(Duration::from_secs(3), short.expect_closed())
        .await
        .expect("closed at its keepalive deadline");
    parked(&broker, 80).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_parked_connection_keeps_its_place_under_max_connections() {
    let broker = TestBroker::demo(&format!("{}max_connections = 1\n", config(100))).await;
    let mut first = RawClient::signed(broker.addr, DEV, 60).await;
    parked(&broker, 1).await;
    let mut second = RawClient::connect(broker.addr).await;
    second.expect_closed().await;
    first.send(Packet::PingReq).await;
    assert!(matches!(first.recv().await, Some(Packet::PingResp)));
    // Parked again, then closed by its client: its place is given back, and a new connection
    // is let in once the broker has seen the close.
    parked(&broker, 1).await;
    drop(first);
    for _ in 0..100 {
        if metric(&broker, "herald_connections").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut admitted = false;
    for _ in 0..20 {
        let mut third = RawClient::connect(broker.addr).await;
        third
            .send(RawClient::connect_packet(
                DEV,
                Some(herald_testkit::DEMO_USER),
                Some(&signature(DEV)),
                true,
            ))
            .await;
        if matches!(third.recv().await, Some(Packet::ConnAck(_))) {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "the closed connection's place was not given back");
    broker.stop().await;
}
