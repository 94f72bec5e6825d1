//! SUBSCRIBE and UNSUBSCRIBE: the session's filters, the index, and retained messages.

use herald_protocol::topic::matches;
use herald_protocol::{Packet, PacketId, QoS, SubAckCode};
use herald_store::Op;
use tracing::warn;

use crate::router::{Deferred, Router};
use crate::types::ChannelId;

impl Router {
    pub(crate) fn handle_subscribe(
        &mut self,
        channel: ChannelId,
        packet_id: PacketId,
        filters: Vec<(String, Option<QoS>)>,
    ) {
        let max = self.settings.max_subscriptions;
        let Some(session) = self.session_of(channel) else {
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
            for (topic, message) in &self.retained {
                if matches(filter, topic) {
                    retained.push((message.clone(), *qos));
                }
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
        channel: ChannelId,
        packet_id: PacketId,
        filters: Vec<String>,
    ) {
        let Some(session) = self.session_of(channel) else {
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
