//! The `redis` sink: `XADD <stream> [MAXLEN ~ n] * event <json> eventId <id>` per event.

use std::time::Duration;

use herald_router::OutboxEntry;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use crate::{Delivery, Sink, SinkError};

/// How long one attempt to connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long Redis may take to answer one batch's pipeline (up to `batch` entries). Under the
/// client's default, 500 ms, a large batch to a busy Redis could fail although written, and
/// each retry would write it again.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisSink {
    client: redis::Client,
    /// Made at the first delivery; dropped after a failed one, so the next makes a new one.
    /// One attempt per delivery: the sink runner's backoff paces the retries (and logs each).
    connection: Option<MultiplexedConnection>,
    stream: String,
    maxlen: Option<usize>,
}

impl RedisSink {
    pub fn new(url: &str, stream: String, maxlen: Option<usize>) -> Result<RedisSink, SinkError> {
        let client =
            redis::Client::open(url).map_err(|e| SinkError::Failed(format!("redis url: {e}")))?;
        Ok(RedisSink {
            client,
            connection: None,
            stream,
            maxlen,
        })
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, SinkError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| SinkError::Failed(format!("redis connect: {e}")))?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }
}

fn event_id(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| {
            v.get("eventId")
                .and_then(|id| id.as_str())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

impl Sink for RedisSink {
    fn deliver<'a>(&'a mut self, entries: &'a [OutboxEntry]) -> Delivery<'a> {
        Box::pin(async move {
            let stream = self.stream.clone();
            let maxlen = self.maxlen;
            let mut pipe = redis::pipe();
            for entry in entries {
                let cmd = pipe.cmd("XADD").arg(&stream);
                if let Some(n) = maxlen {
                    cmd.arg("MAXLEN").arg("~").arg(n);
                }
                cmd.arg("*")
                    .arg("event")
                    .arg(entry.payload.as_ref())
                    .arg("eventId")
                    .arg(event_id(&entry.payload))
                    .ignore();
            }
            let mut connection = self.connection().await?;
            let result: redis::RedisResult<()> = pipe.query_async(&mut connection).await;
            result.map_err(|e| {
                // Whatever failed (the connection, a timeout, an error reply), the next
                // delivery starts on a new connection.
                self.connection = None;
                SinkError::Failed(format!("redis XADD {stream}: {e}"))
            })
        })
    }
}
