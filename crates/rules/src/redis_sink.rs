//! The `redis` sink: `XADD <stream> [MAXLEN ~ n] * event <json> eventId <id>` per event.

use herald_router::OutboxEntry;
use redis::aio::ConnectionManager;

use crate::{Delivery, Sink, SinkError};

pub struct RedisSink {
    client: redis::Client,
    connection: Option<ConnectionManager>,
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

    async fn connection(&mut self) -> Result<&mut ConnectionManager, SinkError> {
        if self.connection.is_none() {
            let manager = ConnectionManager::new(self.client.clone())
                .await
                .map_err(|e| SinkError::Failed(format!("redis connect: {e}")))?;
            self.connection = Some(manager);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| SinkError::Failed("redis connection missing".into()))
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
            let connection = self.connection().await?;
            let result: redis::RedisResult<()> = pipe.query_async(connection).await;
            result.map_err(|e| SinkError::Failed(format!("redis XADD {stream}: {e}")))
        })
    }
}
