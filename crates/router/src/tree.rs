//! The subscription index: a trie over topic levels with `+` and `#` branches.
//!
//! Matching walks only the branches a topic can reach, so its cost grows with the topic's depth
//! and the number of matching filters, not with the number of subscriptions.

use std::collections::HashMap;

use herald_protocol::{ClientId, QoS};

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscribers of `<path>/#` (or `#` at the root).
    multi: HashMap<ClientId, QoS>,
    /// Subscribers of exactly `<path>`.
    exact: HashMap<ClientId, QoS>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.multi.is_empty()
            && self.exact.is_empty()
    }
}

/// Every subscription of every session, indexed by filter.
#[derive(Debug, Default)]
pub struct SubscriptionTree {
    root: Node,
}

impl SubscriptionTree {
    /// Adds or replaces `client`'s subscription to `filter`.
    pub fn insert(&mut self, filter: &str, client: &ClientId, qos: QoS) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            match level {
                "#" => {
                    node.multi.insert(client.clone(), qos);
                    return;
                }
                "+" => node = node.plus.get_or_insert_with(Box::default),
                _ => node = node.children.entry(level.into()).or_default(),
            }
        }
        node.exact.insert(client.clone(), qos);
    }

    /// Removes `client`'s subscription to `filter`; prunes branches left empty.
    pub fn remove(&mut self, filter: &str, client: &ClientId) {
        let levels: Vec<&str> = filter.split('/').collect();
        remove_at(&mut self.root, &levels, client);
    }

    /// Adds every subscriber whose filter matches `topic` to `out`, keeping the highest QoS
    /// per client when several of its filters match (MQTT-3.3.5-1).
    pub fn matches(&self, topic: &str, out: &mut HashMap<ClientId, QoS>) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, !dollar, out);
    }
}

fn remove_at(node: &mut Node, levels: &[&str], client: &ClientId) -> bool {
    match levels.split_first() {
        None => {
            node.exact.remove(client);
        }
        Some((&"#", _)) => {
            node.multi.remove(client);
        }
        Some((&"+", rest)) => {
            if let Some(plus) = node.plus.as_mut()
                && remove_at(plus, rest, client)
            {
                node.plus = None;
            }
        }
        Some((level, rest)) => {
            if let Some(child) = node.children.get_mut(*level)
                && remove_at(child, rest, client)
            {
                node.children.remove(*level);
            }
        }
    }
    node.is_empty()
}

fn add(out: &mut HashMap<ClientId, QoS>, subscribers: &HashMap<ClientId, QoS>) {
    for (client, qos) in subscribers {
        out.entry(client.clone())
            .and_modify(|q| *q = (*q).max(*qos))
            .or_insert(*qos);
    }
}

/// `wildcards`: whether `+` and `#` may match this level (not for the first level of a
/// `$` topic).
fn collect(node: &Node, levels: &[&str], wildcards: bool, out: &mut HashMap<ClientId, QoS>) {
    if wildcards {
        add(out, &node.multi);
    }
    let Some((level, rest)) = levels.split_first() else {
        add(out, &node.exact);
        return;
    };
    if let Some(child) = node.children.get(*level) {
        collect(child, rest, true, out);
    }
    if wildcards && let Some(plus) = &node.plus {
        collect(plus, rest, true, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::topic::matches;

    fn id(s: &str) -> ClientId {
        ClientId::parse_any(s, 64).expect("valid id")
    }

    #[test]
    fn agrees_with_the_reference_matcher() {
        let filters = [
            "#", "+", "a", "a/#", "a/+", "a/b", "a/+/c", "+/+", "/+", "+/b/#", "$SYS/#", "$SYS/+",
            "a/b/c/#",
        ];
        let topics = [
            "a", "a/b", "a/b/c", "a/x/c", "/a", "b", "$SYS/x", "$SYS", "a/", "x/b/y",
        ];
        let mut tree = SubscriptionTree::default();
        for (i, f) in filters.iter().enumerate() {
            tree.insert(f, &id(&format!("c{i}")), QoS::AtMostOnce);
        }
        for topic in topics {
            let mut got = HashMap::new();
            tree.matches(topic, &mut got);
            for (i, f) in filters.iter().enumerate() {
                assert_eq!(
                    got.contains_key(&id(&format!("c{i}"))),
                    matches(f, topic),
                    "{f} vs {topic}"
                );
            }
        }
    }

    #[test]
    fn overlapping_filters_give_the_highest_qos_and_removal_prunes() {
        let mut tree = SubscriptionTree::default();
        let c = id("c");
        tree.insert("a/#", &c, QoS::AtMostOnce);
        tree.insert("a/+", &c, QoS::ExactlyOnce);
        let mut got = HashMap::new();
        tree.matches("a/b", &mut got);
        assert_eq!(got.get(&c), Some(&QoS::ExactlyOnce));
        tree.remove("a/+", &c);
        tree.remove("a/#", &c);
        assert!(tree.root.is_empty());
    }
}
