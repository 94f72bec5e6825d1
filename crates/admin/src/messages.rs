//! `POST /api/v1/messages` (SendMessage): publish a message from outside the broker, the
//! `inflow` source of DESIGN.md 6. Answers only once every copy that must be kept is durable.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use herald_protocol::topic::validate_name;
use herald_protocol::{QoS, Topic};
use herald_router::{Input, Message, now_ms};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::AdminState;
use crate::error::ApiError;
use crate::input;

/// How long a publish waits for its copies to be durable before answering 503.
const DURABLE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    #[default]
    Utf8,
    Base64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PublishRequest {
    topic: String,
    payload: String,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    encoding: Encoding,
}

#[derive(Debug, Serialize)]
pub(crate) struct Published {
    published: bool,
}

/// Checks the request and builds the message the router will route.
fn message(request: PublishRequest, max_topic_len: usize) -> Result<Message, ApiError> {
    validate_name(&request.topic, max_topic_len)
        .map_err(|e| ApiError::bad("topic", e.to_string()))?;
    if herald_auth::is_broker_topic(&request.topic) {
        let first_level = request.topic.split('/').next().unwrap_or_default();
        return Err(ApiError::bad(
            "topic",
            format!("{first_level}/ topics belong to the broker"),
        ));
    }
    let qos = QoS::from_u8(request.qos)
        .ok_or_else(|| ApiError::bad("qos", format!("must be 0, 1 or 2, got {}", request.qos)))?;
    let payload = match request.encoding {
        Encoding::Utf8 => Bytes::from(request.payload),
        Encoding::Base64 => STANDARD
            .decode(request.payload.as_bytes())
            .map(Bytes::from)
            .map_err(|_| ApiError::bad("payload", "not valid standard Base64"))?,
    };
    Ok(Message {
        topic: Topic::from_trusted(request.topic),
        payload,
        qos,
        retain: request.retain,
        published_at_ms: now_ms(),
    })
}

/// `POST /api/v1/messages` with `{topic, payload, qos, retain, encoding}`.
pub(crate) async fn publish(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Published>, ApiError> {
    let request: PublishRequest = input::json_body(&headers, body)?;
    let message = message(request, state.max_topic_len)?;
    let (done, durable) = oneshot::channel();
    let delivered = async {
        let input = Input::Deliver {
            message,
            done: Some(done),
        };
        if state.router.inputs.send(input).await.is_err() {
            return Err(ApiError::Unavailable("the router has stopped".into()));
        }
        // The router drops `done` when the copies could not be stored.
        durable.await.map_err(|_| {
            ApiError::Unavailable(
                "the message could not be stored; online subscribers may have received it".into(),
            )
        })
    };
    match tokio::time::timeout(DURABLE_WAIT, delivered).await {
        Ok(Ok(())) => Ok(Json(Published { published: true })),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::Unavailable(format!(
            "the message was not durable within {} s; it may still be published",
            DURABLE_WAIT.as_secs()
        ))),
    }
}
