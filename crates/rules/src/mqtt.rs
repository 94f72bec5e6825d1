//! The `mqtt` sink: publishes each event on this broker, on a topic built from a template.

use herald_protocol::{QoS, Topic};
use herald_router::{Input, Message, OutboxEntry, RouterHandle, now_ms};
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::warn;

use crate::{Delivery, Sink, SinkError};

pub struct MqttSink {
    template: String,
    qos: QoS,
    router: RouterHandle,
}

impl MqttSink {
    pub fn new(template: String, qos: QoS, router: RouterHandle) -> MqttSink {
        MqttSink {
            template,
            qos,
            router,
        }
    }
}

/// Fills `{groupId}`, `{deviceId}`, `{clientId}` and `{eventType}` from the event; a field the
/// event lacks (a client id without a group) becomes `-`.
pub fn fill(template: &str, event: &Value) -> String {
    let mut topic = template.to_string();
    for key in ["groupId", "deviceId", "clientId", "eventType"] {
        let placeholder = format!("{{{key}}}");
        if topic.contains(&placeholder) {
            let value = event.get(key).and_then(Value::as_str).unwrap_or("-");
            topic = topic.replace(&placeholder, value);
        }
    }
    topic
}

impl Sink for MqttSink {
    fn deliver<'a>(&'a mut self, entries: &'a [OutboxEntry]) -> Delivery<'a> {
        Box::pin(async move {
            let mut waiting = Vec::with_capacity(entries.len());
            for entry in entries {
                let event: Value = serde_json::from_slice(&entry.payload).unwrap_or(Value::Null);
                let name = fill(&self.template, &event);
                let topic = match Topic::new(name.as_str(), usize::from(u16::MAX)) {
                    Ok(topic) => topic,
                    Err(e) => {
                        // Not deliverable on any retry: a client id that cannot be a topic level.
                        warn!(topic = %name, error = %e, "mqtt sink: event topic is not a valid topic; skipped");
                        continue;
                    }
                };
                let (done, rx) = oneshot::channel();
                let message = Message {
                    topic,
                    payload: entry.payload.clone(),
                    qos: self.qos,
                    retain: false,
                    published_at_ms: now_ms(),
                };
                let input = Input::Deliver {
                    message,
                    done: Some(done),
                };
                if self.router.inputs.send(input).await.is_err() {
                    return Err(SinkError::Failed("the broker is shutting down".into()));
                }
                waiting.push(rx);
            }
            // Answered in order: the ones before a failure are stored.
            for (stored, rx) in waiting.into_iter().enumerate() {
                rx.await.map_err(|_| {
                    SinkError::Failed("the broker could not store the message".into()).after(stored)
                })?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_take_event_fields() {
        let event = serde_json::json!({"groupId": "GID_demo", "clientId": "GID_demo@@@d", "eventType": "connect", "deviceId": null});
        assert_eq!(
            fill("$notice/{groupId}/{clientId}/{eventType}", &event),
            "$notice/GID_demo/GID_demo@@@d/connect"
        );
        assert_eq!(fill("x/{deviceId}", &event), "x/-");
    }
}
