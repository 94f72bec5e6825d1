//! Health, client state (one, a batch, a page), presence history and kick (DESIGN.md 5.5 and
//! 7). Every answer comes from the router; nothing is cached here.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use herald_router::{ChannelInfo, ClientState, Input, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::warn;

use crate::error::ApiError;
use crate::input::{self, Params};
use crate::{AdminState, ROUTER_WAIT};

/// How long the router has to answer the health check.
const HEALTH_WAIT: Duration = Duration::from_secs(1);
/// The most client ids one batch query may ask for.
const MAX_BATCH: usize = 100;
/// The largest page of clients or events.
const MAX_LIMIT: u64 = 1000;
/// The page size when none is given.
const DEFAULT_LIMIT: u64 = 100;

type Answer<T> = Result<Json<T>, ApiError>;

#[derive(Debug, Serialize)]
pub(crate) struct Health {
    status: &'static str,
    node: String,
}

/// Liveness and readiness: the router answers an empty query within a second.
pub(crate) async fn health(State(state): State<Arc<AdminState>>) -> Answer<Health> {
    state
        .ask(HEALTH_WAIT, |reply| Input::QueryClients {
            ids: Vec::new(),
            reply,
        })
        .await?;
    Ok(Json(Health {
        status: "ok",
        node: state.node_id.clone(),
    }))
}

/// One client as the API shows it (QuerySessionByClientId).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClientView {
    client_id: String,
    online: bool,
    channels: Vec<ChannelInfo>,
    seq: u64,
    /// The event with that seq as emitted, read from the history; `null` for a client without
    /// events.
    last_event: Option<Box<RawValue>>,
}

/// The views of `states`, each with its last event read from the presence history. The router
/// reports states only once their events are durable, so the event with each `seq` is there.
async fn views(state: &AdminState, states: Vec<ClientState>) -> Result<Vec<ClientView>, ApiError> {
    let wanted: Vec<(String, u64)> = states
        .iter()
        .filter(|s| s.seq > 0)
        .map(|s| (s.client_id.clone(), s.seq))
        .collect();
    let mut events = Vec::new().into_iter();
    if !wanted.is_empty() {
        events = read_store(state.router.history.events(wanted))
            .await?
            .into_iter();
    }
    Ok(states
        .into_iter()
        .map(|s| {
            let event = if s.seq > 0 {
                events.next().flatten()
            } else {
                None
            };
            let last_event = event.and_then(|json| raw_json(&s.client_id, s.seq, &json));
            ClientView {
                client_id: s.client_id,
                online: s.online,
                channels: s.channels,
                seq: s.seq,
                last_event,
            }
        })
        .collect())
}

/// A read through the storage thread, within the router's wait; 503 when it fails or is late.
async fn read_store<T>(read: impl Future<Output = Result<T, String>>) -> Result<T, ApiError> {
    match tokio::time::timeout(ROUTER_WAIT, read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(ApiError::Unavailable(error)),
        Err(_) => Err(ApiError::Unavailable(
            "the store did not answer in time".into(),
        )),
    }
}

/// The stored event `seq` of `client_id` as it was emitted (key order kept). The router only
/// emits valid JSON; anything else is logged and left out.
fn raw_json(client_id: &str, seq: u64, bytes: &[u8]) -> Option<Box<RawValue>> {
    let raw = std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| RawValue::from_string(text.to_string()).ok());
    if raw.is_none() {
        warn!(
            client_id,
            seq, "a stored presence event is not JSON; left out"
        );
    }
    raw
}

async fn query_states(state: &AdminState, ids: Vec<String>) -> Result<Vec<ClientView>, ApiError> {
    let states = state
        .ask(ROUTER_WAIT, |reply| Input::QueryClients { ids, reply })
        .await?;
    views(state, states).await
}

/// `GET /api/v1/clients/{clientId}`
pub(crate) async fn one(
    State(state): State<Arc<AdminState>>,
    path: Result<Path<String>, PathRejection>,
) -> Answer<ClientView> {
    let id = input::path_client_id(path)?;
    let view = query_states(&state, vec![id]).await?.into_iter().next();
    view.map(Json)
        .ok_or_else(|| ApiError::Unavailable("the router answered no state".into()))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct BatchQuery {
    client_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Clients {
    clients: Vec<ClientView>,
}

/// `POST /api/v1/clients/query` with `{"clientIds": [...]}` (BatchQuerySessionByClientIds).
pub(crate) async fn query(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer<Clients> {
    let BatchQuery { client_ids } = input::json_body(&headers, body)?;
    if client_ids.is_empty() || client_ids.len() > MAX_BATCH {
        return Err(ApiError::bad(
            "clientIds",
            format!("expected 1 to {MAX_BATCH} ids, got {}", client_ids.len()),
        ));
    }
    for (i, id) in client_ids.iter().enumerate() {
        input::client_id(&format!("clientIds[{i}]"), id)?;
    }
    let clients = query_states(&state, client_ids).await?;
    Ok(Json(Clients { clients }))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Page {
    clients: Vec<ClientView>,
    /// The `cursor` of the next page, or `null` on the last one.
    next_cursor: Option<String>,
}

/// `GET /api/v1/clients?group=&online=&cursor=&limit=`: known clients in id order.
pub(crate) async fn list(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Answer<Page> {
    let params = Params::parse(query, &["group", "online", "cursor", "limit"])?;
    let group = params.get("group").map(str::to_string);
    let online = params.boolean("online")?;
    let after = params.get("cursor").map(str::to_string);
    let limit = params.number("limit", 1..=MAX_LIMIT, DEFAULT_LIMIT)? as usize;
    // One more than asked tells whether there is a next page.
    let mut states = state
        .ask(ROUTER_WAIT, |reply| Input::ListClients {
            group,
            online,
            after,
            limit: limit + 1,
            reply,
        })
        .await?;
    let more = states.len() > limit;
    states.truncate(limit);
    let next_cursor = more
        .then(|| states.last().map(|s| s.client_id.clone()))
        .flatten();
    Ok(Json(Page {
        clients: views(&state, states).await?,
        next_cursor,
    }))
}

#[derive(Debug, Serialize)]
pub(crate) struct Events {
    events: Vec<Box<RawValue>>,
}

/// `GET /api/v1/clients/{clientId}/events?from=&to=&limit=` (QueryMqttTraceDevice): presence
/// events with `from <= time <= to` (ms since the epoch), oldest first.
pub(crate) async fn events(
    State(state): State<Arc<AdminState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Answer<Events> {
    let id = input::path_client_id(path)?;
    let params = Params::parse(query, &["from", "to", "limit"])?;
    let from = params.millis("from", 0)?;
    let to = params.millis("to", now_ms())?;
    if from > to {
        return Err(ApiError::bad(
            "from",
            format!("must not be after to ({from} > {to})"),
        ));
    }
    let limit = params.number("limit", 1..=MAX_LIMIT, DEFAULT_LIMIT)? as usize;
    let entries = read_store(state.router.history.history(&id, from, to, limit)).await?;
    let events = entries
        .iter()
        .filter_map(|(seq, _, json)| raw_json(&id, *seq, json))
        .collect();
    Ok(Json(Events { events }))
}

#[derive(Debug, Serialize)]
pub(crate) struct Kicked {
    kicked: bool,
}

/// `DELETE /api/v1/clients/{clientId}/connection` (CloseConnection): closes the client's
/// channel with reason `kicked`; 404 when it has none.
pub(crate) async fn kick(
    State(state): State<Arc<AdminState>>,
    path: Result<Path<String>, PathRejection>,
) -> Answer<Kicked> {
    let id = input::path_client_id(path)?;
    let client_id = id.clone();
    let kicked = state
        .ask(ROUTER_WAIT, |reply| Input::Kick { client_id, reply })
        .await?;
    if !kicked {
        return Err(ApiError::NotFound(format!(
            "client {id:?} has no open connection"
        )));
    }
    Ok(Json(Kicked { kicked: true }))
}
