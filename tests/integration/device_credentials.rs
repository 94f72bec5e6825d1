//! Device credential mode (DESIGN.md 3.3) against the real broker: register, get, refresh and
//! unregister through the admin API; real clients connecting with the credential, bound to one
//! client id; the old secret refused at once after a refresh, live connections closed with
//! `tcpclean` reason `auth_revoked`; credentials kept across a restart.

use std::net::SocketAddr;

use herald_testkit::{TestBroker, TestClient, options};
use rumqttc::{QoS, SubscribeReasonCode};
use serde_json::{Value, json};

use crate::admin::{ADMIN_KEY, OPS, admin_addr, get, history, http};

const DEV: &str = "GID_demo@@@cred-1";

fn user(key_id: &str) -> String {
    format!("DeviceCredential|{key_id}|herald-demo")
}

async fn device(
    addr: SocketAddr,
    id: &str,
    key_id: &str,
    secret: &str,
) -> Result<TestClient, String> {
    let mut options = options(addr, id, true);
    options.set_credentials(user(key_id), herald_auth::sign(secret, id));
    TestClient::connect(options)
        .await
        .map(|(client, _)| client)
        // `NotAuthorized` out of "Connection refused, return code: `NotAuthorized`".
        .map_err(|e| e.split('`').nth(1).unwrap_or(&e).to_owned())
}

async fn register(admin: SocketAddr, client_id: &str) -> Value {
    let body = json!({ "clientId": client_id });
    let reply = http(
        admin,
        "POST",
        "/api/v1/device-credentials",
        Some(OPS),
        Some(&body),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

fn key_and_secret(credential: &Value) -> (String, String) {
    (
        credential["deviceAccessKeyId"]
            .as_str()
            .expect("key id")
            .to_owned(),
        credential["deviceAccessKeySecret"]
            .as_str()
            .expect("secret")
            .to_owned(),
    )
}

#[tokio::test]
async fn register_connect_refresh_and_unregister() {
    let broker = TestBroker::demo(ADMIN_KEY).await;
    let admin = admin_addr(&broker);
    let credential = register(admin, DEV).await;
    assert_eq!(credential["clientId"], DEV);
    let (key_id, secret) = key_and_secret(&credential);
    assert!(secret.len() >= 22, "at least 128 bits: {secret}");

    let body = json!({ "clientId": DEV });
    let again = http(
        admin,
        "POST",
        "/api/v1/device-credentials",
        Some(OPS),
        Some(&body),
    )
    .await;
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(again.json()["code"], "conflict");
    let bad = json!({ "clientId": "GID_nope@@@x" });
    let bad = http(
        admin,
        "POST",
        "/api/v1/device-credentials",
        Some(OPS),
        Some(&bad),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(
        bad.json()["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("clientId:"))
    );
    let shown = get(admin, &format!("/api/v1/device-credentials/{DEV}")).await;
    assert_eq!(shown.status, 200, "{}", shown.text());
    assert_eq!(shown.json(), credential);

    // Connects as its own client id only; publishes and subscribes under the parent topics.
    let mut live = device(broker.addr, DEV, &key_id, &secret)
        .await
        .expect("connects");
    assert_eq!(
        live.subscribe("demo/#", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    assert_eq!(
        live.subscribe("demo/p2p/GID_demo@@@other", QoS::AtLeastOnce)
            .await,
        [SubscribeReasonCode::Failure]
    );
    live.publish("demo/up", QoS::AtLeastOnce, false, b"hi")
        .await;
    assert_eq!(live.next_publish().await.topic, "demo/up");
    let other = "GID_demo@@@cred-2";
    assert_eq!(
        device(broker.addr, other, &key_id, &secret)
            .await
            .err()
            .as_deref(),
        Some("NotAuthorized"),
        "bound to one client id"
    );
    assert_eq!(
        device(broker.addr, DEV, &key_id, "wrong-secret")
            .await
            .err()
            .as_deref(),
        Some("BadUserNamePassword")
    );
    assert_eq!(
        device(broker.addr, DEV, "DKnope", &secret)
            .await
            .err()
            .as_deref(),
        Some("NotAuthorized")
    );

    // Refresh: a new secret; the old one is refused at once and its live connection ends.
    let refresh = format!("/api/v1/device-credentials/{DEV}/refresh");
    let refreshed = http(admin, "POST", &refresh, Some(OPS), None).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text());
    let (new_key, new_secret) = key_and_secret(&refreshed.json());
    assert_eq!(new_key, key_id);
    assert_ne!(new_secret, secret);
    assert_eq!(
        device(broker.addr, DEV, &key_id, &secret)
            .await
            .err()
            .as_deref(),
        Some("BadUserNamePassword"),
        "the old secret stops working at once"
    );
    live.closed().await;
    let events = history(admin, DEV, 2).await;
    let closed = events
        .iter()
        .find(|e| e["eventType"] == "tcpclean")
        .expect("tcpclean");
    assert_eq!(closed["reason"], "auth_revoked", "{events:?}");
    let mut live = device(broker.addr, DEV, &key_id, &new_secret)
        .await
        .expect("new secret");

    // Unregister: the live connection ends, and the credential is gone.
    let path = format!("/api/v1/device-credentials/{DEV}");
    let gone = http(admin, "DELETE", &path, Some(OPS), None).await;
    assert_eq!(gone.status, 200, "{}", gone.text());
    assert_eq!(gone.json(), json!({"unregistered": true}));
    live.closed().await;
    assert_eq!(get(admin, &path).await.status, 404);
    assert_eq!(
        http(admin, "DELETE", &path, Some(OPS), None).await.status,
        404
    );
    assert_eq!(
        http(admin, "POST", &refresh, Some(OPS), None).await.status,
        404
    );
    assert_eq!(
        device(broker.addr, DEV, &key_id, &new_secret)
            .await
            .err()
            .as_deref(),
        Some("NotAuthorized")
    );
}

#[tokio::test]
async fn credentials_survive_a_restart() {
    let broker = TestBroker::demo(ADMIN_KEY).await;
    let admin = admin_addr(&broker);
    let (key_id, secret) = key_and_secret(&register(admin, DEV).await);
    let refresh = format!("/api/v1/device-credentials/{DEV}/refresh");
    let refreshed = http(admin, "POST", &refresh, Some(OPS), None).await;
    let (_, new_secret) = key_and_secret(&refreshed.json());

    let broker = broker.restart().await;
    let admin = admin_addr(&broker);
    let shown = get(admin, &format!("/api/v1/device-credentials/{DEV}")).await;
    assert_eq!(shown.status, 200, "{}", shown.text());
    let mut live = device(broker.addr, DEV, &key_id, &new_secret)
        .await
        .expect("connects");
    live.publish("demo/x", QoS::AtLeastOnce, false, b"after restart")
        .await;
    assert_eq!(
        device(broker.addr, DEV, &key_id, &secret)
            .await
            .err()
            .as_deref(),
        Some("BadUserNamePassword")
    );
}
