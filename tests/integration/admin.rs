//! The admin HTTP API (DESIGN.md 7) against the real broker, with a plain HTTP/1.1 client:
//! a device seen online, kicked and seen offline, its presence history, a publish that reaches
//! a subscriber, refusals, and the metrics.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use herald_testkit::{TestBroker, TestClient, signed_options};
use rumqttc::QoS;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEV: &str = "GID_demo@@@dev-1";

/// An access key that may use the admin API.
pub(crate) const ADMIN_KEY: &str = r#"
[[access_keys]]
id = "ops"
secret = "ops-secret"
admin = true
"#;

pub(crate) const OPS: (&str, &str) = ("ops", "ops-secret");

pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on its own connection (`Connection: close`), read to the end.
pub(crate) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    credentials: Option<(&str, &str)>,
    body: Option<&Value>,
) -> Reply {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some((id, secret)) = credentials {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        request.push_str(&format!("Authorization: Basic {encoded}\r\n"));
    }
    let body = body.map(Value::to_string).unwrap_or_default();
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let mut stream = TcpStream::connect(addr).await.expect("connect to admin");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut raw))
        .await
        .expect("answer within 15 s")
        .expect("read answer");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut body = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut chunked: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = chunked
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = String::from_utf8_lossy(&chunked[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .expect("chunk size");
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&chunked[start..start + size]);
        chunked = &chunked[start + size + 2..];
    }
}

pub(crate) async fn get(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, Some(OPS), None).await
}

pub(crate) fn admin_addr(broker: &TestBroker) -> SocketAddr {
    broker.broker().admin_addr.expect("admin API on")
}

/// The presence history of `client`, once it holds `count` events (they are read from the
/// store, which the router writes asynchronously).
pub(crate) async fn history(addr: SocketAddr, client: &str, count: usize) -> Vec<Value> {
    for _ in 0..100 {
        let reply = get(addr, &format!("/api/v1/clients/{client}/events")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let events = reply.json()["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if events.len() >= count {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("history of {client} never reached {count} events");
}

#[tokio::test]
async fn a_device_is_seen_online_kicked_and_seen_offline() {
    let broker = TestBroker::demo(ADMIN_KEY).await;
    let admin = admin_addr(&broker);
    let health = get(admin, "/api/v1/health").await;
    assert_eq!(health.json(), json!({"status": "ok", "node": "test-node"}));

    let mut device = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    let view = get(admin, &format!("/api/v1/clients/{DEV}")).await.json();
    assert_eq!(view["clientId"], DEV);
    assert_eq!(view["online"], true);
    let channels = view["channels"].as_array().expect("channels");
    assert_eq!(channels.len(), 1);
    assert!(
        channels[0]["channelId"]
            .as_str()
            .is_some_and(|c| c.len() == 32)
    );
    assert!(
        channels[0]["clientIp"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("127.0.0.1:"))
    );
    assert!(channels[0]["connectedAt"].as_u64().is_some_and(|t| t > 0));
    assert_eq!(channels[0]["transport"], "tcp");
    assert!(channels[0]["protocol"].is_string());
    assert_eq!(view["lastEvent"]["eventType"], "connect");
    // The channel's connect time is its connect event's.
    assert_eq!(channels[0]["connectedAt"], view["lastEvent"]["time"]);
    let seq = view["seq"].as_u64().expect("seq");

    let kick = format!("/api/v1/clients/{DEV}/connection");
    let reply = http(admin, "DELETE", &kick, Some(OPS), None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"kicked": true}));
    device.closed().await;

    let view = get(admin, &format!("/api/v1/clients/{DEV}")).await.json();
    assert_eq!(view["online"], false);
    assert_eq!(view["channels"], json!([]));
    assert!(view["seq"].as_u64().expect("seq") > seq);
    assert_eq!(view["lastEvent"]["reason"], "kicked");
    let again = http(admin, "DELETE", &kick, Some(OPS), None).await;
    assert_eq!(again.status, 404, "{}", again.text());
    assert_eq!(again.json()["code"], "not_found");

    let events = history(admin, DEV, 2).await;
    let kinds: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (e["eventType"].as_str().unwrap_or(""), e["reason"].as_str()))
        .collect();
    assert_eq!(kinds, [("connect", None), ("tcpclean", Some("kicked"))]);
    assert!(events[0]["seq"].as_u64() < events[1]["seq"].as_u64());

    let offline = get(admin, "/api/v1/clients?online=false&group=GID_demo")
        .await
        .json();
    assert!(
        offline["clients"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["clientId"] == DEV))
    );

    // The last event is read from the history, so a restart keeps it.
    let before = get(admin, &format!("/api/v1/clients/{DEV}")).await.json();
    assert_eq!(before["lastEvent"], events[1]);
    let broker = broker.restart().await;
    let admin = admin_addr(&broker);
    let after = get(admin, &format!("/api/v1/clients/{DEV}")).await.json();
    assert_eq!(after["seq"], before["seq"]);
    assert_eq!(after["lastEvent"], before["lastEvent"]);
    broker.stop().await;
}

#[tokio::test]
async fn a_published_message_reaches_a_subscribed_device() {
    let broker = TestBroker::demo(ADMIN_KEY).await;
    let admin = admin_addr(&broker);
    let mut device = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    device.subscribe("demo/admin/#", QoS::AtLeastOnce).await;

    let text = json!({"topic": "demo/admin/text", "payload": "hello", "qos": 1});
    let reply = http(admin, "POST", "/api/v1/messages", Some(OPS), Some(&text)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"published": true}));
    let publish = device.next_publish().await;
    assert_eq!(publish.topic, "demo/admin/text");
    assert_eq!(&publish.payload[..], b"hello");
    assert_eq!(publish.qos, QoS::AtLeastOnce);

    let binary = json!({"topic": "demo/admin/bin", "payload": "AAEC/w==", "encoding": "base64"});
    let reply = http(admin, "POST", "/api/v1/messages", Some(OPS), Some(&binary)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let publish = device.next_publish().await;
    assert_eq!(publish.topic, "demo/admin/bin");
    assert_eq!(&publish.payload[..], [0u8, 1, 2, 255]);
    assert_eq!(publish.qos, QoS::AtMostOnce);

    let reserved = json!({"topic": "$notice/GID_demo/x", "payload": "forged"});
    let reply = http(
        admin,
        "POST",
        "/api/v1/messages",
        Some(OPS),
        Some(&reserved),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("topic"))
    );
    broker.stop().await;
}

#[tokio::test]
async fn refusals_name_their_reason() {
    let broker = TestBroker::demo(ADMIN_KEY).await;
    let admin = admin_addr(&broker);

    let ids: Vec<String> = (0..101).map(|i| format!("GID_demo@@@d{i}")).collect();
    let batch = json!({ "clientIds": ids });
    let reply = http(
        admin,
        "POST",
        "/api/v1/clients/query",
        Some(OPS),
        Some(&batch),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.json()["code"], "bad_request");
    assert!(
        reply.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("clientIds"))
    );

    let ok = json!({ "clientIds": [DEV] });
    let reply = http(admin, "POST", "/api/v1/clients/query", Some(OPS), Some(&ok)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["clients"][0]["online"], false);

    let reply = http(admin, "GET", "/api/v1/health", None, None).await;
    assert_eq!(reply.status, 401);
    assert!(
        reply.headers.contains(r#"Basic realm="herald""#),
        "{}",
        reply.headers
    );
    let reply = http(admin, "GET", "/metrics", Some(("ops", "wrong")), None).await;
    assert_eq!(reply.status, 401);
    // The demo key is valid but has no admin right.
    let demo = Some(("demo", "demo-secret"));
    let reply = http(admin, "GET", "/api/v1/health", demo, None).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.json()["code"], "forbidden");
    broker.stop().await;
}

/// The value of the sample `name` (with its labels) in a metrics text.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// An mqtt sink that gets every presence event, so the sink metrics have a member.
const NOTICES: &str = r#"
[[sinks]]
id = "notices"
type = "mqtt"
topic = "$notice/{groupId}/{clientId}/{eventType}"
qos = 1

[[rules]]
id = "all-events"
kind = "status_notice"
source = { events = ["connect", "disconnect", "tcpclean"] }
sinks = ["notices"]
"#;

#[tokio::test]
async fn metrics_count_connections_and_presence_events() {
    let broker = TestBroker::demo(&format!("{ADMIN_KEY}{NOTICES}")).await;
    let admin = admin_addr(&broker);
    let device = TestClient::connected(signed_options(broker.addr, DEV, true)).await;
    let reply = get(admin, "/metrics").await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    assert_eq!(sample(&text, "herald_connections"), Some(1), "{text}");
    assert_eq!(
        sample(&text, r#"herald_presence_events_total{type="connect"}"#),
        Some(1),
        "{text}"
    );
    for name in [
        "herald_messages_received_total",
        "herald_messages_sent_total",
        "herald_qos0_dropped_total",
        "herald_queue_dropped_total",
        "herald_queue_expired_total",
        r#"herald_sink_outbox_depth{sink="notices"}"#,
        r#"herald_sink_delivered_total{sink="notices"}"#,
        r#"herald_sink_failures_total{sink="notices"}"#,
        r#"herald_sink_dropped_total{sink="notices"}"#,
    ] {
        assert!(text.contains(name), "{name} missing in\n{text}");
    }

    device.disconnect().await;
    let mut last = String::new();
    for _ in 0..100 {
        last = get(admin, "/metrics").await.text();
        let delivered = sample(&last, r#"herald_sink_delivered_total{sink="notices"}"#);
        if sample(&last, r#"herald_presence_events_total{type="tcpclean"}"#) == Some(1)
            && delivered == Some(3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sample(&last, "herald_connections"), Some(0), "{last}");
    assert_eq!(
        sample(&last, r#"herald_presence_events_total{type="disconnect"}"#),
        Some(1),
        "{last}"
    );
    assert_eq!(
        sample(&last, r#"herald_presence_events_total{type="tcpclean"}"#),
        Some(1),
        "{last}"
    );
    // connect, disconnect and tcpclean went through the sink's outbox.
    assert_eq!(
        sample(&last, r#"herald_sink_delivered_total{sink="notices"}"#),
        Some(3),
        "{last}"
    );
    assert_eq!(
        sample(&last, r#"herald_sink_outbox_depth{sink="notices"}"#),
        Some(0),
        "{last}"
    );
    broker.stop().await;
}
