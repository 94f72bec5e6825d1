//! Token mode (DESIGN.md 3.2) against the real broker: tokens issued, queried and revoked
//! through the admin API, real clients connecting with them, publish and subscribe scoped by
//! the tokens' resources and actions, revocation and expiry closing live connections with
//! `tcpclean` reason `auth_revoked`, refresh through `$SYS/uploadToken`, and a restart.

use std::net::SocketAddr;
use std::time::Duration;

use herald_testkit::{TestBroker, TestClient, demo_config, options, signed_options};
use rumqttc::{QoS, SubscribeReasonCode};
use serde_json::{Value, json};

use crate::QUIET;
use crate::admin::{ADMIN_KEY, OPS, admin_addr, get, history, http};
use crate::parking::parked;

const DEV: &str = "GID_demo@@@tok-1";
const TOKEN_USER: &str = "Token|demo|herald-demo";

/// The demo broker with an admin key and tokens allowed to live as little as 1 s.
async fn broker() -> TestBroker {
    TestBroker::with_config(|dir| {
        demo_config(dir, ADMIN_KEY).replace("[instance]\n", "[instance]\nmin_token_ttl_secs = 1\n")
    })
    .await
}

fn now_ms() -> u64 {
    herald_auth::now_ms()
}

/// Issues a token and returns it.
async fn apply(admin: SocketAddr, resources: &[&str], actions: &str, ttl: Duration) -> String {
    let body = json!({
        "resources": resources,
        "actions": actions,
        "expireTime": now_ms() + ttl.as_millis() as u64,
    });
    let reply = http(admin, "POST", "/api/v1/tokens", Some(OPS), Some(&body)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let token = reply.json()["token"].as_str().expect("token").to_owned();
    assert!(token.len() >= 22, "at least 128 bits: {token}");
    token
}

async fn token_client(addr: SocketAddr, id: &str, password: &str) -> Result<TestClient, String> {
    let mut options = options(addr, id, true);
    options.set_credentials(TOKEN_USER, password);
    TestClient::connect(options)
        .await
        .map(|(client, _)| client)
        .map_err(|e| refusal_code(&e))
}

/// `NotAuthorized` out of rumqttc's "Connection refused, return code: `NotAuthorized`".
fn refusal_code(error: &str) -> String {
    error.split('`').nth(1).unwrap_or(error).to_owned()
}

/// The reason of the last event of `client` once it has `count` events.
async fn last_reason(admin: SocketAddr, client: &str, count: usize) -> Value {
    let events = history(admin, client, count).await;
    let last = events.last().expect("an event");
    assert_eq!(last["eventType"], "tcpclean", "{events:?}");
    last["reason"].clone()
}

const HOUR: Duration = Duration::from_secs(3600);

/// Revokes a token through the admin API; the reply.
async fn revoke(admin: SocketAddr, token: &str) -> crate::admin::Reply {
    http(
        admin,
        "DELETE",
        &format!("/api/v1/tokens/{token}"),
        Some(OPS),
        None,
    )
    .await
}

#[tokio::test]
async fn tokens_scope_publish_and_subscribe() {
    let broker = broker().await;
    let admin = admin_addr(&broker);
    let read = apply(admin, &["demo/in/#"], "R", HOUR).await;
    let write = apply(admin, &["demo/out/+"], "W", HOUR).await;

    let info = get(admin, &format!("/api/v1/tokens/{read}")).await;
    assert_eq!(info.status, 200, "{}", info.text());
    let info = info.json();
    assert_eq!(info["valid"], true);
    assert_eq!(info["resources"], json!(["demo/in/#"]));
    assert_eq!(info["actions"], "R");
    assert!(info["expireTime"].as_u64().is_some_and(|t| t > now_ms()));

    let mut listener =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@l", true)).await;
    listener.subscribe("demo/#", QoS::AtLeastOnce).await;
    let mut device = token_client(broker.addr, DEV, &format!("R|{read}|W|{write}"))
        .await
        .expect("valid tokens connect");
    assert_eq!(
        device.subscribe("demo/in/#", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    assert_eq!(
        device.subscribe("demo/out/x", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Failure],
        "a W token does not let the client read"
    );
    device
        .publish("demo/out/a", QoS::AtLeastOnce, false, b"up")
        .await;
    assert_eq!(listener.next_publish().await.topic, "demo/out/a");
    listener
        .publish("demo/in/cmd", QoS::AtLeastOnce, false, b"down")
        .await;
    assert_eq!(device.next_publish().await.topic, "demo/in/cmd");
    assert_eq!(listener.next_publish().await.topic, "demo/in/cmd");
    // Outside the W token's resources: refused like any denied publish (closed).
    device
        .client
        .publish("demo/in/x", QoS::AtLeastOnce, false, b"no")
        .await
        .expect("queue");
    device.closed().await;
    listener.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn token_refusals_and_admin_validation() {
    let broker = broker().await;
    let admin = admin_addr(&broker);
    let token = apply(admin, &["demo/#"], "R,W", HOUR).await;
    let addr = broker.addr;
    let refused = |password: String| async move { token_client(addr, DEV, &password).await };
    assert_eq!(
        refused("R|nope".into()).await.err().as_deref(),
        Some("BadUserNamePassword")
    );
    assert_eq!(
        refused(format!("R|{token}|W|nope")).await.err().as_deref(),
        Some("BadUserNamePassword"),
        "every token must be valid"
    );
    assert_eq!(
        refused(format!("X|{token}")).await.err().as_deref(),
        Some("BadUserNamePassword")
    );
    for user in ["Token|nokey|herald-demo", "Token|demo|other-instance"] {
        let mut options = options(broker.addr, DEV, true);
        options.set_credentials(user, format!("RW|{token}"));
        let refused = TestClient::connect(options)
            .await
            .err()
            .map(|e| refusal_code(&e));
        assert_eq!(refused.as_deref(), Some("NotAuthorized"), "{user}");
    }
    assert!(refused(format!("RW|{token}")).await.is_ok());

    let cases = [
        (
            json!({"resources": [], "actions": "R", "expireTime": now_ms() + 60_000}),
            "resources",
        ),
        (
            json!({"resources": ["a/#/b"], "actions": "R", "expireTime": now_ms() + 60_000}),
            "resources[0]",
        ),
        (
            json!({"resources": ["demo/#"], "actions": "RX", "expireTime": now_ms() + 60_000}),
            "actions",
        ),
        (
            json!({"resources": ["demo/#"], "actions": "R", "expireTime": now_ms()}),
            "expireTime",
        ),
        (
            json!({"resources": ["demo/#"], "actions": "R", "expireTime": now_ms() + 31 * 86_400_000}),
            "expireTime",
        ),
    ];
    for (body, field) in cases {
        let reply = http(admin, "POST", "/api/v1/tokens", Some(OPS), Some(&body)).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.starts_with(&format!("{field}:")), "{message}");
    }
    let unknown = get(admin, "/api/v1/tokens/never-issued").await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    let gone = http(
        admin,
        "DELETE",
        "/api/v1/tokens/never-issued",
        Some(OPS),
        None,
    )
    .await;
    assert_eq!(gone.status, 404, "{}", gone.text());
}

#[tokio::test]
async fn revocation_closes_the_connections_that_use_the_token() {
    let broker = broker().await;
    let admin = admin_addr(&broker);
    let token = apply(admin, &["demo/#"], "R,W", HOUR).await;
    let other = apply(admin, &["demo/#"], "R", HOUR).await;
    let mut device = token_client(broker.addr, DEV, &format!("RW|{token}"))
        .await
        .expect("connects");
    let bystander_id = "GID_demo@@@tok-2";
    let mut bystander = token_client(broker.addr, bystander_id, &format!("R|{other}"))
        .await
        .expect("connects");

    let reply = revoke(admin, &token).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"revoked": true}));
    device.closed().await;
    assert_eq!(last_reason(admin, DEV, 2).await, "auth_revoked");
    assert_eq!(
        token_client(broker.addr, DEV, &format!("RW|{token}"))
            .await
            .err()
            .as_deref(),
        Some("BadUserNamePassword"),
        "a revoked token is refused at once"
    );
    assert_eq!(
        get(admin, &format!("/api/v1/tokens/{token}")).await.status,
        404
    );
    // A connection on another token is untouched.
    bystander.subscribe("demo/#", QoS::AtMostOnce).await;
}

#[tokio::test]
async fn expiry_ends_connections_and_upload_token_extends_them() {
    let broker = broker().await;
    let admin = admin_addr(&broker);
    let short = apply(admin, &["demo/#"], "R", Duration::from_millis(1500)).await;
    let long = apply(admin, &["demo/#"], "R", HOUR).await;
    let mut refreshed = token_client(broker.addr, DEV, &format!("R|{short}"))
        .await
        .expect("connects");
    let expiring_id = "GID_demo@@@tok-3";
    let mut expiring = token_client(broker.addr, expiring_id, &format!("R|{short}"))
        .await
        .expect("connects");
    // The refresh is acknowledged (PUBACK) and not routed to anyone.
    let upload = json!({"token": long, "type": "R"}).to_string();
    refreshed
        .publish(
            "$SYS/uploadToken",
            QoS::AtLeastOnce,
            false,
            upload.as_bytes(),
        )
        .await;

    expiring.closed().await;
    assert_eq!(last_reason(admin, expiring_id, 2).await, "auth_revoked");
    let info = get(admin, &format!("/api/v1/tokens/{short}")).await.json();
    assert_eq!(info["valid"], false, "expired: {info}");
    assert_eq!(
        token_client(broker.addr, expiring_id, &format!("R|{short}"))
            .await
            .err()
            .as_deref(),
        Some("BadUserNamePassword")
    );
    // The refreshed client outlived its first token.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        refreshed.subscribe("demo/#", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // An invalid upload closes the connection (protocol_error).
    refreshed
        .client
        .publish(
            "$SYS/uploadToken",
            QoS::AtLeastOnce,
            false,
            br#"{"token":"nope","type":"R"}"#.to_vec(),
        )
        .await
        .expect("queue");
    refreshed.closed().await;
    assert_eq!(last_reason(admin, DEV, 2).await, "protocol_error");
}

#[tokio::test]
async fn tokens_survive_a_restart() {
    let broker = broker().await;
    let admin = admin_addr(&broker);
    let kept = apply(admin, &["demo/#"], "R,W", HOUR).await;
    let revoked = apply(admin, &["demo/#"], "R,W", HOUR).await;
    let reply = revoke(admin, &revoked).await;
    assert_eq!(reply.status, 200);

    let broker = broker.restart().await;
    let admin = admin_addr(&broker);
    let info = get(admin, &format!("/api/v1/tokens/{kept}")).await;
    assert_eq!(info.status, 200, "{}", info.text());
    assert_eq!(info.json()["actions"], "R,W");
    let mut device = token_client(broker.addr, DEV, &format!("RW|{kept}"))
        .await
        .expect("a stored token still works");
    device
        .publish("demo/x", QoS::AtLeastOnce, false, b"after restart")
        .await;
    assert_eq!(
        token_client(broker.addr, "GID_demo@@@tok-4", &format!("RW|{revoked}"))
            .await
            .err()
            .as_deref(),
        Some("BadUserNamePassword")
    );
}

#[tokio::test]
async fn parked_token_connections_end_at_revocation_and_at_expiry() {
    let broker = broker().await;
    let admin = admin_addr(&broker);
    let revoked = apply(admin, &["demo/#"], "R", HOUR).await;
    let short = apply(admin, &["demo/#"], "R", Duration::from_millis(2500)).await;
    let mut first = token_client(broker.addr, DEV, &format!("R|{revoked}"))
        .await
        .expect("connects");
    let expiring_id = "GID_demo@@@tok-3";
    let mut expiring = token_client(broker.addr, expiring_id, &format!("R|{short}"))
        .await
        .expect("connects");
    // Both idle: parked (the default `park_idle_ms` is 100), with no timer of their own.
    parked(&broker, 2).await;
    let started = std::time::Instant::now();
    let reply = revoke(admin, &revoked).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    first.closed().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a revocation reaches a parked connection at once: {:?}",
        started.elapsed()
    );
    assert_eq!(last_reason(admin, DEV, 2).await, "auth_revoked");
    // The other one is still parked, and ends when its token expires.
    parked(&broker, 1).await;
    expiring.closed().await;
    assert_eq!(last_reason(admin, expiring_id, 2).await, "auth_revoked");
    parked(&broker, 0).await;
}
