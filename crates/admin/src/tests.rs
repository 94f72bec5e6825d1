//! The admin app driven with `oneshot` (no socket) over a real router on an in-memory store:
//! refusals, bad input naming its field, client state through its life, and the metrics text.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use herald_auth::{AccessKey, AuthSettings, Authenticator, ClientIdFormat, Secret};
use herald_protocol::{ClientId, Packet, Protocol};
use herald_router::{
    ChannelId, CloseReason, ConnectRequest, Input, Outgoing, Router, RouterSettings, SinkQueue,
    Transport,
};
use herald_store::MemoryStore;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::{AdminState, app};

const ADMIN: (&str, &str) = ("ops", "ops-secret");
const DEVICE_KEY: (&str, &str) = ("device", "device-secret");
const DEV: &str = "GID_demo@@@dev-1";

fn key(id: &str, secret: &str, admin: bool) -> AccessKey {
    AccessKey {
        id: id.into(),
        secret: Secret::new(secret),
        publish: vec!["demo/#".into()],
        subscribe: vec!["demo/#".into()],
        admin,
    }
}

fn state() -> AdminState {
    let auth = Authenticator::new(AuthSettings {
        instance_id: "herald-test".into(),
        allow_anonymous: false,
        client_id_format: ClientIdFormat::Any,
        legacy_signature: false,
        access_keys: vec![
            key(ADMIN.0, ADMIN.1, true),
            key(DEVICE_KEY.0, DEVICE_KEY.1, false),
        ],
        groups: vec!["GID_demo".into()],
        parent_topics: Vec::new(),
        max_client_id_len: 64,
    });
    let sinks = vec![Arc::new(SinkQueue::new("hook", 10))];
    let (router, _task) = Router::start(
        RouterSettings::default(),
        Box::new(MemoryStore::new()),
        sinks.clone(),
        None,
    )
    .expect("router starts");
    AdminState {
        router,
        auth: Arc::new(auth),
        sinks,
        node_id: "node-7".into(),
        max_topic_len: 32,
        edge: None,
        min_token_ttl: Duration::from_secs(60),
    }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    /// Asserts a JSON error with this status and code whose message mentions `field`.
    fn refused(&self, status: StatusCode, code: &str, field: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let body = self.json();
        assert_eq!(body["code"], code, "{}", self.text);
        let message = body["message"].as_str().expect("message");
        assert!(message.contains(field), "{message:?} should name {field}");
    }
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

async fn send(state: &AdminState, request: Request<Body>) -> Answer {
    let response = app(state.clone())
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        text: String::from_utf8(bytes.to_vec()).expect("UTF-8"),
    }
}

async fn call(state: &AdminState, method: &str, uri: &str, body: Option<Value>) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, basic(ADMIN.0, ADMIN.1));
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    send(state, request.body(body).expect("request")).await
}

async fn get(state: &AdminState, uri: &str) -> Answer {
    call(state, "GET", uri, None).await
}

async fn post(state: &AdminState, uri: &str, body: Value) -> Answer {
    call(state, "POST", uri, Some(body)).await
}

fn with_auth(uri: &str, authorization: Option<&str>) -> Request<Body> {
    let mut request = Request::builder().uri(uri);
    if let Some(value) = authorization {
        request = request.header(header::AUTHORIZATION, value);
    }
    request.body(Body::empty()).expect("request")
}

#[tokio::test]
async fn every_route_needs_admin_credentials() {
    let state = state();
    let wrong = [
        None,
        Some(basic(ADMIN.0, "wrong")),
        Some(basic("nobody", ADMIN.1)),
        Some(basic(ADMIN.0, "")),
        Some(format!("Bearer {}", ADMIN.1)),
        Some("Basic !!!not-base64".to_string()),
        Some(format!("Basic {}", STANDARD.encode("no-colon"))),
    ];
    for uri in [
        "/api/v1/health",
        "/metrics",
        "/api/v1/clients",
        "/no/such/route",
    ] {
        for authorization in &wrong {
            let answer = send(&state, with_auth(uri, authorization.as_deref())).await;
            answer.refused(StatusCode::UNAUTHORIZED, "unauthorized", "credentials");
            assert_eq!(
                answer.headers[header::WWW_AUTHENTICATE],
                r#"Basic realm="herald""#
            );
        }
        let device = basic(DEVICE_KEY.0, DEVICE_KEY.1);
        let answer = send(&state, with_auth(uri, Some(&device))).await;
        answer.refused(StatusCode::FORBIDDEN, "forbidden", "device");
        assert!(!answer.text.contains(DEVICE_KEY.1));
    }
    let answer = send(
        &state,
        with_auth("/api/v1/health", Some(&basic(ADMIN.0, ADMIN.1))),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json(), json!({"status": "ok", "node": "node-7"}));
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let state = state();
    get(&state, "/api/v2/nothing")
        .await
        .refused(StatusCode::NOT_FOUND, "not_found", "route");
    call(&state, "PUT", "/api/v1/health", None).await.refused(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method",
    );
}

#[tokio::test]
async fn list_parameters_are_checked() {
    let state = state();
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("online=maybe", "online"),
        ("colour=blue", "colour"),
        ("group=a&group=b", "group"),
    ] {
        get(&state, &format!("/api/v1/clients?{query}"))
            .await
            .refused(StatusCode::BAD_REQUEST, "bad_request", field);
    }
    let answer = get(&state, "/api/v1/clients?group=&online=&cursor=&limit=").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json(), json!({"clients": [], "nextCursor": null}));
}

#[tokio::test]
async fn history_parameters_are_checked() {
    let state = state();
    for (query, field) in [
        ("from=yesterday", "from"),
        ("to=-5", "to"),
        ("from=10&to=5", "from"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("since=0", "since"),
    ] {
        get(&state, &format!("/api/v1/clients/{DEV}/events?{query}"))
            .await
            .refused(StatusCode::BAD_REQUEST, "bad_request", field);
    }
    let answer = get(&state, &format!("/api/v1/clients/{DEV}/events")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json(), json!({"events": []}));
}

#[tokio::test]
async fn batch_query_input_is_checked() {
    let state = state();
    let many: Vec<String> = (0..101).map(|i| format!("GID_demo@@@d{i}")).collect();
    let cases = [
        (json!({"clientIds": many}), "clientIds"),
        (json!({"clientIds": []}), "clientIds"),
        (json!({}), "clientIds"),
        (json!({"clientIds": "x"}), "clientIds"),
        (json!({"clientIds": ["a", ""]}), "clientIds[1]"),
        (json!({"clientIds": ["a"], "extra": 1}), "extra"),
        (json!(["a"]), "body"),
    ];
    for (body, field) in cases {
        post(&state, "/api/v1/clients/query", body).await.refused(
            StatusCode::BAD_REQUEST,
            "bad_request",
            field,
        );
    }
    let bad_json = Request::post("/api/v1/clients/query")
        .header(header::AUTHORIZATION, basic(ADMIN.0, ADMIN.1))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"clientIds\": ["))
        .expect("request");
    send(&state, bad_json)
        .await
        .refused(StatusCode::BAD_REQUEST, "bad_request", "body");
    let no_type = Request::post("/api/v1/clients/query")
        .header(header::AUTHORIZATION, basic(ADMIN.0, ADMIN.1))
        .body(Body::from(json!({"clientIds": ["a"]}).to_string()))
        .expect("request");
    send(&state, no_type).await.refused(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "Content-Type",
    );
}

#[tokio::test]
async fn publish_input_is_checked() {
    let state = state();
    let long = "a/".repeat(20);
    let cases = [
        (json!({"payload": "x"}), "topic"),
        (json!({"topic": "", "payload": "x"}), "topic"),
        (json!({"topic": "demo/+", "payload": "x"}), "topic"),
        (json!({"topic": "demo/#", "payload": "x"}), "topic"),
        (json!({"topic": long, "payload": "x"}), "topic"),
        (json!({"topic": "$SYS/x", "payload": "x"}), "topic"),
        (
            json!({"topic": "$notice/GID_demo/x", "payload": "x"}),
            "topic",
        ),
        (json!({"topic": "$presence/x", "payload": "x"}), "topic"),
        (json!({"topic": 7, "payload": "x"}), "topic"),
        (json!({"topic": "demo/a"}), "payload"),
        (json!({"topic": "demo/a", "payload": "x", "qos": 3}), "qos"),
        (
            json!({"topic": "demo/a", "payload": "x", "qos": 300}),
            "qos",
        ),
        (
            json!({"topic": "demo/a", "payload": "x", "qos": "1"}),
            "qos",
        ),
        (
            json!({"topic": "demo/a", "payload": "x", "retain": "yes"}),
            "retain",
        ),
        (
            json!({"topic": "demo/a", "payload": "x", "encoding": "hex"}),
            "encoding",
        ),
        (
            json!({"topic": "demo/a", "payload": "*", "encoding": "base64"}),
            "payload",
        ),
        (
            json!({"topic": "demo/a", "payload": "x", "colour": 1}),
            "colour",
        ),
    ];
    for (body, field) in cases {
        post(&state, "/api/v1/messages", body).await.refused(
            StatusCode::BAD_REQUEST,
            "bad_request",
            field,
        );
    }
    let ok = json!({"topic": "demo/a", "payload": "aGk=", "qos": 1, "retain": true, "encoding": "base64"});
    let answer = post(&state, "/api/v1/messages", ok).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json(), json!({"published": true}));
}

#[tokio::test]
async fn path_client_ids_are_checked() {
    let state = state();
    get(&state, "/api/v1/clients/%FF").await.refused(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "clientId",
    );
    call(
        &state,
        "DELETE",
        &format!("/api/v1/clients/{DEV}/connection"),
        None,
    )
    .await
    .refused(StatusCode::NOT_FOUND, "not_found", DEV);
}

/// Connects `id` straight to the router and waits for the CONNACK.
async fn connect(state: &AdminState, id: &str) -> (ChannelId, herald_router::OutboxReceiver) {
    let (outbox, mut rx) = herald_router::channel_outbox(16);
    let channel = ChannelId::random();
    let request = ConnectRequest {
        channel,
        client_id: ClientId::parse_any(id, 64).expect("id"),
        clean_session: false,
        will: None,
        username: None,
        protocol: Protocol::V311,
        peer: SocketAddr::from(([127, 0, 0, 1], 40_001)),
        transport: Transport::Tcp,
        outbox,
    };
    let input = Input::Connect(Box::new(request));
    state.router.inputs.send(input).await.expect("router");
    let connack = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert!(
        matches!(connack, Ok(Some(Outgoing::Packet(Packet::ConnAck(_))))),
        "{connack:?}"
    );
    (channel, rx)
}

#[tokio::test]
async fn a_client_through_connect_list_and_kick() {
    let state = state();
    let unknown = get(&state, &format!("/api/v1/clients/{DEV}")).await.json();
    assert_eq!(
        unknown,
        json!({"clientId": DEV, "online": false, "channels": [], "seq": 0, "lastEvent": null})
    );

    let (channel, mut outbox) = connect(&state, DEV).await;
    connect(&state, "GID_demo@@@dev-2").await;
    connect(&state, "GID_other@@@dev-3").await;
    let view = get(&state, &format!("/api/v1/clients/{DEV}")).await.json();
    assert_eq!(view["online"], true);
    assert_eq!(view["channels"][0]["channelId"], channel.to_string());
    assert_eq!(view["channels"][0]["clientIp"], "127.0.0.1:40001");
    assert_eq!(view["channels"][0]["transport"], "tcp");
    assert_eq!(view["lastEvent"]["eventType"], "connect");
    let seq = view["seq"].as_u64().expect("seq");
    assert!(seq > 0);

    let page = get(&state, "/api/v1/clients?group=GID_demo&limit=1")
        .await
        .json();
    assert_eq!(page["clients"][0]["clientId"], DEV);
    assert_eq!(page["nextCursor"], DEV);
    let page = get(
        &state,
        &format!("/api/v1/clients?group=GID_demo&limit=1&cursor={DEV}"),
    )
    .await;
    let page = page.json();
    assert_eq!(page["clients"][0]["clientId"], "GID_demo@@@dev-2");
    assert_eq!(page["nextCursor"], Value::Null);

    let batch = json!({"clientIds": [DEV, "GID_demo@@@never"]});
    let batch = post(&state, "/api/v1/clients/query", batch).await.json();
    assert_eq!(batch["clients"][0]["online"], true);
    assert_eq!(batch["clients"][1]["online"], false);

    let uri = format!("/api/v1/clients/{DEV}/connection");
    let answer = call(&state, "DELETE", &uri, None).await;
    assert_eq!(answer.json(), json!({"kicked": true}));
    let closed = tokio::time::timeout(Duration::from_secs(5), outbox.recv()).await;
    assert!(
        matches!(closed, Ok(Some(Outgoing::Close(CloseReason::Kicked)))),
        "{closed:?}"
    );
    let view = get(&state, &format!("/api/v1/clients/{DEV}")).await.json();
    assert_eq!(view["online"], false);
    assert!(view["seq"].as_u64().expect("seq") > seq);
    assert_eq!(view["lastEvent"]["reason"], "kicked");
    let offline = get(&state, "/api/v1/clients?online=false").await.json();
    assert_eq!(offline["clients"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn metrics_name_every_counter() {
    let state = state();
    connect(&state, DEV).await;
    let answer = get(&state, "/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.headers[header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|t| t.starts_with("application/openmetrics-text"))
    );
    for name in [
        "herald_connections 1",
        "herald_messages_received_total{qos=\"0\"} 0",
        "herald_messages_sent_total{qos=\"2\"} 0",
        "herald_qos0_dropped_total 0",
        "herald_queue_dropped_total 0",
        "herald_queue_expired_total 0",
        "herald_presence_events_total{type=\"connect\"} 1",
        "herald_presence_events_total{type=\"disconnect\"} 0",
        "herald_presence_events_total{type=\"tcpclean\"} 0",
        "herald_sink_outbox_depth{sink=\"hook\"} 0",
        "herald_sink_delivered_total{sink=\"hook\"} 0",
        "herald_sink_failures_total{sink=\"hook\"} 0",
        "herald_sink_dropped_total{sink=\"hook\"} 0",
    ] {
        assert!(
            answer.text.contains(name),
            "{name} missing in\n{}",
            answer.text
        );
    }
}

#[tokio::test]
async fn tokens_apply_query_and_revoke() {
    let state = state();
    let expire = herald_auth::now_ms() + 3_600_000;
    let body = json!({"resources": ["demo/#"], "actions": "R,W", "expireTime": expire});
    let applied = post(&state, "/api/v1/tokens", body).await;
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.text);
    let token = applied.json()["token"].as_str().expect("token").to_owned();
    let uri = format!("/api/v1/tokens/{token}");
    let info = get(&state, &uri).await;
    assert_eq!(
        info.json(),
        json!({"valid": true, "resources": ["demo/#"], "actions": "R,W", "expireTime": expire})
    );
    assert!(state.auth.registry().token(&token).is_some());
    let revoked = call(&state, "DELETE", &uri, None).await;
    assert_eq!(revoked.json(), json!({"revoked": true}));
    assert!(state.auth.registry().token(&token).is_none());
    get(&state, &uri)
        .await
        .refused(StatusCode::NOT_FOUND, "not_found", "token");
    let soon = json!({"resources": ["demo/#"], "actions": "R", "expireTime": expire - 3_599_000});
    post(&state, "/api/v1/tokens", soon).await.refused(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "expireTime",
    );
}

#[tokio::test]
async fn device_credentials_register_refresh_and_unregister() {
    let state = state();
    let uri = format!("/api/v1/device-credentials/{DEV}");
    get(&state, &uri)
        .await
        .refused(StatusCode::NOT_FOUND, "not_found", DEV);
    let registered = post(
        &state,
        "/api/v1/device-credentials",
        json!({"clientId": DEV}),
    )
    .await;
    assert_eq!(registered.status, StatusCode::OK, "{}", registered.text);
    let credential = registered.json();
    assert_eq!(credential["clientId"], DEV);
    post(
        &state,
        "/api/v1/device-credentials",
        json!({"clientId": DEV}),
    )
    .await
    .refused(StatusCode::CONFLICT, "conflict", DEV);
    post(&state, "/api/v1/device-credentials", json!({"client": DEV}))
        .await
        .refused(StatusCode::BAD_REQUEST, "bad_request", "client");
    assert_eq!(get(&state, &uri).await.json(), credential);
    let refreshed = post(&state, &format!("{uri}/refresh"), json!({}))
        .await
        .json();
    assert_eq!(
        refreshed["deviceAccessKeyId"],
        credential["deviceAccessKeyId"]
    );
    assert_ne!(
        refreshed["deviceAccessKeySecret"],
        credential["deviceAccessKeySecret"]
    );
    let removed = call(&state, "DELETE", &uri, None).await;
    assert_eq!(removed.json(), json!({"unregistered": true}));
    assert!(state.auth.registry().credential_of_client(DEV).is_none());
}
