//! `GET /metrics`: the router's counters and the sinks' queues in the OpenMetrics text format
//! that Prometheus scrapes. A registry is built per request from the live atomics, so nothing
//! here keeps state of its own.

use herald_server::ServerStats;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use herald_router::{RouterStats, SinkQueue};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::AdminState;
use crate::error::ApiError;

/// The content type of the OpenMetrics text format, which `encode` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// The QoS label values, in the order of the router's per-QoS counters.
const QOS: [&str; 3] = ["0", "1", "2"];
/// The presence event types, in the order of the router's per-type counters.
const EVENT_TYPES: [&str; 4] = ["connect", "disconnect", "tcpclean", "connect_failed"];

pub(crate) async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut registry = registry(&state.router.stats, &state.sinks);
    if let Some(edge) = &state.edge {
        register_edge(&mut registry, edge);
    }
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &registry) {
        return ApiError::Unavailable(format!("cannot encode the metrics: {e}")).into_response();
    }
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

fn counter(value: &AtomicU64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(RouterStats::get(value));
    counter
}

/// A counter family with one member per label value. Counter names get `_total` appended.
fn family(label: &'static str, members: &[(String, u64)]) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (value, count) in members {
        family
            .get_or_create(&vec![(label, value.clone())])
            .inc_by(*count);
    }
    family
}

fn per_index<const N: usize>(names: &[&str; N], counters: &[AtomicU64; N]) -> Vec<(String, u64)> {
    names
        .iter()
        .zip(counters)
        .map(|(name, counter)| (name.to_string(), RouterStats::get(counter)))
        .collect()
}

fn per_sink(sinks: &[Arc<SinkQueue>], read: impl Fn(&SinkQueue) -> u64) -> Vec<(String, u64)> {
    sinks.iter().map(|s| (s.id.clone(), read(s))).collect()
}

/// A registry holding the current value of every metric.
pub(crate) fn registry(stats: &RouterStats, sinks: &[Arc<SinkQueue>]) -> Registry {
    let mut registry = Registry::default();
    let connections = Gauge::<i64>::default();
    connections.set(i64::try_from(RouterStats::get(&stats.connections)).unwrap_or(i64::MAX));
    registry.register("herald_connections", "Open client channels", connections);
    registry.register(
        "herald_messages_received",
        "PUBLISH packets received from clients, by QoS",
        family("qos", &per_index(&QOS, &stats.received_by_qos)),
    );
    registry.register(
        "herald_messages_sent",
        "PUBLISH packets sent to clients, by QoS",
        family("qos", &per_index(&QOS, &stats.sent_by_qos)),
    );
    registry.register(
        "herald_qos0_dropped",
        "QoS 0 messages dropped: subscriber offline or its outbox full",
        counter(&stats.qos0_dropped),
    );
    registry.register(
        "herald_queue_dropped",
        "Queued messages dropped because a session's queue was full",
        counter(&stats.queue_dropped),
    );
    registry.register(
        "herald_queue_expired",
        "Queued messages dropped for their age",
        counter(&stats.queue_expired),
    );
    registry.register(
        "herald_presence_events",
        "Presence events emitted, by type",
        family("type", &per_index(&EVENT_TYPES, &stats.presence_events)),
    );
    register_sinks(&mut registry, sinks);
    registry
}

/// What the listeners refused or slowed (abuse limits).
fn register_edge(registry: &mut Registry, edge: &ServerStats) {
    let refused = [
        ("max_connections", &edge.refused_max_connections),
        ("connect_rate", &edge.refused_connect_rate),
        ("banned", &edge.refused_banned),
        ("handshake", &edge.handshake_failures),
    ];
    let members: Vec<(String, u64)> = refused
        .iter()
        .map(|(k, v)| (k.to_string(), RouterStats::get(v)))
        .collect();
    registry.register(
        "herald_connections_refused",
        "Connections refused before CONNECT, by limit",
        family("limit", &members),
    );
    registry.register(
        "herald_auth_failures",
        "CONNECTs refused for their credentials",
        counter(&edge.auth_failures),
    );
    registry.register(
        "herald_auth_bans",
        "Source addresses banned for failed logins",
        counter(&edge.bans),
    );
    let parked = Gauge::<i64>::default();
    parked.set(i64::try_from(RouterStats::get(&edge.parked)).unwrap_or(i64::MAX));
    registry.register(
        "herald_connections_parked",
        "Idle plain TCP connections parked without a task (limits.park_idle_ms)",
        parked,
    );
    registry.register(
        "herald_parked_writes",
        "Packets the parker wrote to parked connections, which stayed parked",
        counter(&edge.parked_writes),
    );
    registry.register(
        "herald_publish_throttled",
        "PUBLISH packets delayed by the per-connection message or byte rate",
        counter(&edge.throttled),
    );
}

fn register_sinks(registry: &mut Registry, sinks: &[Arc<SinkQueue>]) {
    let depth = Family::<Labels, Gauge>::default();
    for sink in sinks {
        let entries = i64::try_from(sink.depth()).unwrap_or(i64::MAX);
        depth
            .get_or_create(&vec![("sink", sink.id.clone())])
            .set(entries);
    }
    registry.register(
        "herald_sink_outbox_depth",
        "Entries waiting in each sink's durable outbox",
        depth,
    );
    registry.register(
        "herald_sink_delivered",
        "Outbox entries each sink delivered",
        family("sink", &per_sink(sinks, |s| RouterStats::get(&s.delivered))),
    );
    registry.register(
        "herald_sink_failures",
        "Failed delivery attempts of each sink",
        family("sink", &per_sink(sinks, |s| RouterStats::get(&s.failures))),
    );
    registry.register(
        "herald_sink_dropped",
        "Outbox entries each sink dropped (outbox full or too old)",
        family("sink", &per_sink(sinks, |s| RouterStats::get(&s.dropped))),
    );
}
