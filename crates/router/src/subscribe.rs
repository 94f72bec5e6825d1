//! SUBSCRIBE and UNSUBSCRIBE: the session's filters, the index, and retained messages.

use std::collections::BTreeMap;
use std::ops::Bound;

use herald_protocol::topic::matches;
use herald_protocol::{Packet, PacketId, QoS, SubAckCode};
use herald_store::Op;
use tracing::warn;

use crate::router::{Deferred, Router};
use crate::types::{ChannelRef, Message};

impl Router {
    pub(crate) fn handle_subscribe(
        &mut self,
        channel: ChannelRef,
        packet_id: PacketId,
        filters: Vec<(String, Option<QoS>)>,
    ) {
        let max = self.settings.max_subscriptions;
        let Some(session) = self.session_of(&channel) else {
            return;
        };
        let client = session.client_id.clone();
        let mut codes = Vec::with_capacity(filters.len());
        let mut granted = Vec::new();
        for (filter, qos) in filters {
            let Some(qos) = qos else {
                codes.push(SubAckCode::Failure);
                continue;
            };
            if !session.subscriptions.contains_key(&filter) && session.subscriptions.len() >= max {
                warn!(client_id = %client, limit = "limits.max_subscriptions", max, "subscription refused");
                codes.push(SubAckCode::Failure);
                continue;
            }
            session.subscriptions.insert(filter.clone(), qos);
            codes.push(SubAckCode::Granted(qos));
            granted.push((filter, qos));
        }
        let persistent = session.persistent;
        let record = (persistent && !granted.is_empty()).then(|| session.record());
        let mut retained = Vec::new();
        for (filter, qos) in &granted {
            self.tree.insert(filter, &client, *qos);
            for message in retained_matching(&self.retained, filter) {
                retained.push((message.clone(), *qos));
            }
            for message in self.snapshots_matching(filter) {
                retained.push((message, *qos));
            }
        }
        let durable = record.is_some();
        if let Some(record) = record {
            self.persister.stage(Op::PutSession {
                client_id: client.to_string(),
                record,
            });
        }
        self.reply(
            channel,
            Deferred::SubAck(Packet::SubAck { packet_id, codes }, retained),
            durable,
        );
    }

    pub(crate) fn handle_unsubscribe(
        &mut self,
        channel: ChannelRef,
        packet_id: PacketId,
        filters: Vec<String>,
    ) {
        let Some(session) = self.session_of(&channel) else {
            return;
        };
        let client = session.client_id.clone();
        let removed: Vec<String> = filters
            .into_iter()
            .filter(|f| session.subscriptions.remove(f).is_some())
            .collect();
        let record = (session.persistent && !removed.is_empty()).then(|| session.record());
        for filter in &removed {
            self.tree.remove(filter, &client);
        }
        let durable = record.is_some();
        if let Some(record) = record {
            self.persister.stage(Op::PutSession {
                client_id: client.to_string(),
                record,
            });
        }
        self.reply(
            channel,
            Deferred::Send(Packet::UnsubAck(packet_id)),
            durable,
        );
    }
}

/// The retained messages `filter` matches. Retained messages are kept in topic order, so only
/// the topics that start with the filter's literal part (the levels before its first wildcard)
/// are looked at: subscribing to `dev/1/cmd` costs one lookup however many other topics have a
/// retained message, not a scan of all of them.
pub(crate) fn retained_matching<'a>(
    retained: &'a BTreeMap<String, Message>,
    filter: &'a str,
) -> impl Iterator<Item = &'a Message> + 'a {
    let literal = literal_prefix(filter);
    retained
        .range::<str, _>((Bound::Included(literal), Bound::Unbounded))
        .take_while(move |(topic, _)| topic.starts_with(literal))
        .filter(move |(topic, _)| matches(filter, topic))
        .map(|(_, message)| message)
}

/// The part of `filter` before its first wildcard level, without the `/` that ends it: `a/b`
/// for `a/b/+` and for `a/b/#` (which also matches `a/b` itself), the whole filter when it has
/// no wildcard, and the empty string for `#` or `+/x`.
fn literal_prefix(filter: &str) -> &str {
    // `end`: where the literal levels seen so far end; `start`: where the next level starts.
    let (mut end, mut start) = (0, 0);
    for level in filter.split('/') {
        if level == "+" || level == "#" {
            return &filter[..end];
        }
        end = start + level.len();
        start = end + 1;
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::{QoS, Topic};

    #[test]
    fn literal_prefixes() {
        assert_eq!(literal_prefix("a/b/c"), "a/b/c");
        assert_eq!(literal_prefix("a/b/+"), "a/b");
        assert_eq!(literal_prefix("a/b/#"), "a/b");
        assert_eq!(literal_prefix("a/+/c"), "a");
        assert_eq!(literal_prefix("#"), "");
        assert_eq!(literal_prefix("+/x"), "");
        assert_eq!(literal_prefix("$presence/#"), "$presence");
        assert_eq!(literal_prefix("/+"), "");
        assert_eq!(literal_prefix("a//+"), "a/");
    }

    #[test]
    fn retained_messages_are_found_by_prefix_with_the_usual_matching() {
        let topics = [
            "a",
            "a/b",
            "a/b/c",
            "ab",
            "ab/c",
            "$presence/x",
            "$SYS/y",
            "b",
            "/a",
            "a//c",
        ];
        let retained: BTreeMap<String, Message> = topics
            .iter()
            .map(|t| {
                let message = Message {
                    topic: Topic::new(*t, 64).expect("topic"),
                    payload: bytes::Bytes::from_static(b"r"),
                    qos: QoS::AtMostOnce,
                    retain: true,
                    published_at_ms: 0,
                };
                (t.to_string(), message)
            })
            .collect();
        for filter in [
            "a",
            "a/#",
            "a/+",
            "a/b/#",
            "+",
            "#",
            "+/c",
            "ab/#",
            "$presence/+",
            "/+",
            "a/+/c",
            "missing/#",
        ] {
            let mut found: Vec<&str> = retained_matching(&retained, filter)
                .map(|m| m.topic.as_str())
                .collect();
            let mut expected: Vec<&str> = topics
                .iter()
                .copied()
                .filter(|t| matches(filter, t))
                .collect();
            found.sort();
            expected.sort();
            assert_eq!(found, expected, "{filter}");
        }
    }
}
