//! TLS, WebSocket and WebSocket-over-TLS listeners with real clients; client certificates; the
//! WebSocket path; presence events name the transport.

use std::net::SocketAddr;
use std::time::Duration;

use herald_router::Transport as Kind;
use herald_testkit::{TestBroker, TestClient, TestPki, signed_options};
use rumqttc::{QoS, TlsConfiguration, Transport};

fn listeners(pki: &TestPki, client_ca: bool) -> String {
    let ca = if client_ca {
        format!("client_ca = \"{}\"\n", pki.path("ca.pem").display())
    } else {
        String::new()
    };
    format!(
        r#"
[listeners.tls]
bind = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
{ca}
[listeners.ws]
bind = "127.0.0.1:0"

[listeners.wss]
bind = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
"#,
        cert = pki.path("server.pem").display(),
        key = pki.path("server.key").display(),
    )
}

fn endpoint(broker: &TestBroker, kind: Kind) -> SocketAddr {
    broker
        .broker()
        .endpoints
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, a)| *a)
        .unwrap_or_else(|| panic!("no {} listener", kind.as_str()))
}

fn over(
    broker: &TestBroker,
    pki: &TestPki,
    kind: Kind,
    id: &str,
    client_cert: bool,
) -> rumqttc::MqttOptions {
    let addr = endpoint(broker, kind);
    let mut o = match kind {
        Kind::Ws => signed_options_at(
            &format!("ws://127.0.0.1:{}/mqtt", addr.port()),
            addr.port(),
            id,
        ),
        Kind::Wss => signed_options_at(
            &format!("wss://127.0.0.1:{}/mqtt", addr.port()),
            addr.port(),
            id,
        ),
        _ => signed_options(addr, id, true),
    };
    let tls = || TlsConfiguration::Rustls(pki.client_config(client_cert));
    match kind {
        Kind::Tls => o.set_transport(Transport::Tls(tls())),
        Kind::Ws => o.set_transport(Transport::Ws),
        Kind::Wss => o.set_transport(Transport::Wss(tls())),
        Kind::Tcp => &mut o,
    };
    o
}

fn signed_options_at(url: &str, port: u16, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, url, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    o.set_credentials(herald_testkit::DEMO_USER, herald_testkit::signature(id));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_every_transport_talk_to_each_other() {
    let pki = TestPki::new();
    let dir = tempfile::TempDir::new().expect("temp dir");
    let events = dir.path().join("events.jsonl");
    let extra = format!(
        "{}\n[[sinks]]\nid = \"file\"\ntype = \"file\"\npath = \"{}\"\n\n[[rules]]\nid = \"to-file\"\nkind = \"status_notice\"\nsinks = [\"file\"]\n",
        listeners(&pki, false),
        events.display()
    );
    let broker = TestBroker::demo(&extra).await;
    let mut sub =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@sub-tcp", true)).await;
    sub.subscribe("demo/up/#", QoS::AtLeastOnce).await;
    for kind in [Kind::Tls, Kind::Ws, Kind::Wss] {
        let id = format!("GID_demo@@@dev-{}", kind.as_str());
        let mut device = TestClient::connect(over(&broker, &pki, kind, &id, false))
            .await
            .unwrap_or_else(|e| panic!("{} client connects: {e}", kind.as_str()))
            .0;
        // A payload larger than one TCP segment and than a small WebSocket frame.
        let payload = vec![kind as u8; 40_000];
        device
            .publish(
                &format!("demo/up/{}", kind.as_str()),
                QoS::AtLeastOnce,
                false,
                &payload,
            )
            .await;
        let got = sub.next_publish().await;
        assert_eq!(got.topic, format!("demo/up/{}", kind.as_str()));
        assert_eq!(got.payload.len(), 40_000);
        // And the other way round.
        device.subscribe("demo/back", QoS::AtLeastOnce).await;
        sub.publish("demo/back", QoS::AtLeastOnce, false, b"pong")
            .await;
        assert_eq!(&device.next_publish().await.payload[..], b"pong");
        device.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = herald_testkit::json_lines(&events);
    for kind in ["tls", "ws", "wss"] {
        let id = format!("GID_demo@@@dev-{kind}");
        let connect = events
            .iter()
            .find(|e| e["clientId"] == id.as_str() && e["eventType"] == "connect")
            .unwrap_or_else(|| panic!("no connect event for {id}"));
        assert_eq!(connect["transport"], kind);
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_requires_client_certificates() {
    let pki = TestPki::new();
    let broker = TestBroker::demo(&listeners(&pki, true)).await;
    let refused =
        TestClient::connect(over(&broker, &pki, Kind::Tls, "GID_demo@@@nocert", false)).await;
    assert!(
        refused.is_err(),
        "a client without a certificate must not get in"
    );
    let accepted =
        TestClient::connect(over(&broker, &pki, Kind::Tls, "GID_demo@@@withcert", true)).await;
    assert!(accepted.is_ok(), "{:?}", accepted.err());
    broker.stop().await;
}

#[tokio::test]
async fn websocket_upgrades_elsewhere_than_the_path_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let broker = TestBroker::demo(&listeners(&pki, false)).await;
    let addr = endpoint(&broker, Kind::Ws);
    for (path, protocol, status) in [
        ("/other", "mqtt", "404"),
        ("/mqtt", "chat", "400"),
        ("/mqtt", "mqtt", "101"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answer")
            .expect("read");
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{path} {protocol}: {head}"
        );
        if status == "101" {
            assert!(
                head.to_ascii_lowercase()
                    .contains("sec-websocket-protocol: mqtt"),
                "{head}"
            );
        }
    }
    broker.stop().await;
}

#[test]
fn a_bad_certificate_is_a_config_error_at_start() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").expect("write");
    let config = format!(
        "[listeners.tls]\ncert = \"{0}/missing.pem\"\nkey = \"{0}/missing.key\"\n[listeners.wss]\ncert = \"{0}/junk.pem\"\nkey = \"{0}/junk.pem\"\n",
        dir.path().display()
    );
    let errors = herald::config::Config::parse(&config, &|_| None).expect_err("invalid");
    let text = errors.to_string();
    assert!(text.contains("listeners.tls.cert"), "{text}");
    assert!(
        text.contains("listeners.wss.cert") || text.contains("listeners.wss.key"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_paho_mqtt_speaks_websocket_and_tls() {
    let pki = TestPki::new();
    let broker = TestBroker::demo(&listeners(&pki, false)).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/interop/paho_transports.py");
    let args = vec![
        endpoint(&broker, Kind::Ws).port().to_string(),
        endpoint(&broker, Kind::Tls).port().to_string(),
        pki.path("ca.pem").display().to_string(),
        herald_testkit::DEMO_USER.to_string(),
        herald_testkit::signature("GID_demo@@@py-ws"),
        herald_testkit::signature("GID_demo@@@py-tls"),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .args(args)
            .output()
            .expect("python3 runs")
    })
    .await
    .expect("join");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_packet_may_span_websocket_frames_and_a_frame_may_hold_several() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let pki = TestPki::new();
    let broker = TestBroker::open(&listeners(&pki, false)).await;
    let addr = endpoint(&broker, Kind::Ws);
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("ws://{addr}/mqtt")
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().expect("header"));
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrade");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"mqtt"[..])
    );
    // CONNECT in three frames.
    let connect = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04wsid";
    for part in [&connect[..3], &connect[3..11], &connect[11..]] {
        ws.send(Message::Binary(bytes::Bytes::copy_from_slice(part)))
            .await
            .expect("send");
    }
    let Some(Ok(Message::Binary(connack))) = ws.next().await else {
        panic!("CONNACK frame")
    };
    assert_eq!(&connack[..], b"\x20\x02\x00\x00");
    // Two PINGREQs in one frame: two PINGRESPs come back.
    ws.send(Message::Binary(bytes::Bytes::from_static(
        b"\xc0\x00\xc0\x00",
    )))
    .await
    .expect("send");
    let mut got = Vec::new();
    while got.len() < 4 {
        let Some(Ok(Message::Binary(b))) = ws.next().await else {
            panic!("PINGRESP frames")
        };
        got.extend_from_slice(&b);
    }
    assert_eq!(got, b"\xd0\x00\xd0\x00");
    // A text frame is not MQTT: the connection closes.
    ws.send(Message::text("hello")).await.expect("send");
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("closed in time");
    assert!(
        matches!(end, None | Some(Ok(Message::Close(_))) | Some(Err(_))),
        "{end:?}"
    );
    broker.stop().await;
}
