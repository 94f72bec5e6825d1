//! Sinks: where rules deliver. Each configured sink gets a task that reads its durable outbox
//! (owned jointly with the router, see `herald_router::outbox`) from the front, delivers in
//! order, retries with exponential backoff while the sink is down, and reports what it
//! delivered so the router deletes it from the store. A slow or failing sink only holds up
//! its own outbox: never MQTT traffic, never other sinks.
//!
//! Rule matching itself happens in the router, in the same transaction that stores the event.

mod file;
mod mqtt;
mod redis_sink;
mod runner;
mod webhook;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use herald_auth::Secret;
use herald_router::{OutboxEntry, RouterHandle, SinkQueue};
use tokio::task::JoinHandle;

pub use runner::RunnerSettings;
pub use webhook::signature;

/// Why a delivery failed; the runner retries.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Failed(String),
    /// The first `delivered` entries of the batch were accepted, then `error`: the runner
    /// retries from the first one that was not, instead of sending the others again.
    #[error("{error} (after {delivered} accepted)")]
    Partial {
        delivered: usize,
        error: Box<SinkError>,
    },
}

impl SinkError {
    /// This error, met after the first `delivered` entries of a batch were accepted.
    pub fn after(self, delivered: usize) -> SinkError {
        match (delivered, self) {
            (0, error) => error,
            (delivered, SinkError::Partial { error, .. }) => {
                SinkError::Partial { delivered, error }
            }
            (delivered, error) => SinkError::Partial {
                delivered,
                error: Box::new(error),
            },
        }
    }

    /// How many entries of the batch were accepted before the failure.
    pub fn delivered(&self) -> usize {
        match self {
            SinkError::Failed(_) => 0,
            SinkError::Partial { delivered, .. } => *delivered,
        }
    }
}

/// The future a sink's delivery returns.
pub type Delivery<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// A destination for outbox entries. `deliver` gets entries in order and succeeds only when
/// all of them were accepted by the destination; a sink that takes them one by one says how
/// many it got through before a failure ([`SinkError::after`]).
pub trait Sink: Send + 'static {
    fn deliver<'a>(&'a mut self, entries: &'a [OutboxEntry]) -> Delivery<'a>;
}

/// What kind of sink, with its own settings (DESIGN.md 6).
#[derive(Debug, Clone)]
pub enum SinkKind {
    /// Publish on this broker. `topic` may use `{groupId}`, `{deviceId}`, `{clientId}`,
    /// `{eventType}`.
    Mqtt {
        topic: String,
        qos: herald_protocol::QoS,
    },
    /// HTTP POST of each event, signed with `X-Herald-Signature: sha256=<hex HMAC>` when a
    /// secret is set.
    Webhook {
        url: String,
        secret: Option<Secret>,
        timeout: Duration,
    },
    /// JSON lines appended to a file.
    File { path: PathBuf },
    /// `XADD <stream> * event <json>` on a Redis server.
    Redis {
        url: String,
        stream: String,
        maxlen: Option<usize>,
    },
}

impl SinkKind {
    pub fn name(&self) -> &'static str {
        match self {
            SinkKind::Mqtt { .. } => "mqtt",
            SinkKind::Webhook { .. } => "webhook",
            SinkKind::File { .. } => "file",
            SinkKind::Redis { .. } => "redis",
        }
    }
}

/// A configured sink.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    pub id: String,
    pub kind: SinkKind,
    /// Entries kept at most; beyond it the oldest is dropped, counted and logged.
    pub outbox_max: usize,
    /// Entries older than this are dropped, counted and logged.
    pub outbox_max_age: Duration,
}

impl SinkSettings {
    /// The outbox queue the router fills for this sink.
    pub fn queue(&self) -> Arc<SinkQueue> {
        Arc::new(SinkQueue::new(self.id.clone(), self.outbox_max))
    }
}

/// Builds the sink and starts its task on `queue`.
pub fn start(
    settings: &SinkSettings,
    queue: Arc<SinkQueue>,
    router: RouterHandle,
) -> Result<JoinHandle<()>, SinkError> {
    let sink: Box<dyn Sink> = match &settings.kind {
        SinkKind::Mqtt { topic, qos } => {
            Box::new(mqtt::MqttSink::new(topic.clone(), *qos, router.clone()))
        }
        SinkKind::Webhook {
            url,
            secret,
            timeout,
        } => Box::new(webhook::WebhookSink::new(url, secret.clone(), *timeout)?),
        SinkKind::File { path } => Box::new(file::FileSink::new(path.clone())),
        SinkKind::Redis {
            url,
            stream,
            maxlen,
        } => Box::new(redis_sink::RedisSink::new(url, stream.clone(), *maxlen)?),
    };
    let runner = RunnerSettings {
        max_age: settings.outbox_max_age,
        kind: settings.kind.name(),
        ..RunnerSettings::default()
    };
    Ok(runner::spawn(queue, sink, router, runner))
}

/// Starts a task that feeds `queue` to a sink of the caller's (tests use a capturing sink).
pub fn start_custom(
    queue: Arc<SinkQueue>,
    sink: Box<dyn Sink>,
    router: RouterHandle,
    settings: RunnerSettings,
) -> JoinHandle<()> {
    runner::spawn(queue, sink, router, settings)
}
