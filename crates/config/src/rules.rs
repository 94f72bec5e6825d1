//! Validation of `[presence]`, `[[sinks]]` and `[[rules]]` (DESIGN.md 5 and 6).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use herald_auth::Secret;
use herald_protocol::QoS;
use herald_protocol::topic::validate_filter;
use herald_router::{EventKind, OutflowRule, PresenceSettings, StatusRule};
use herald_rules::{SinkKind, SinkSettings};

use crate::file::{ConfigFile, RuleDef, SinkDef};
use crate::validate::Errors;

fn is_sink_or_rule_id(id: &str) -> bool {
    (3..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The keys each sink type takes, besides id, type and the outbox bounds.
fn keys_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "mqtt" => &["topic", "qos"],
        "webhook" => &["url", "secret", "secret_env", "timeout_ms"],
        "file" => &["path"],
        "redis" => &["url", "stream", "maxlen"],
        _ => &[],
    }
}

fn present_keys(def: &SinkDef) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut add = |present: bool, key| {
        if present {
            keys.push(key);
        }
    };
    add(def.topic.is_some(), "topic");
    add(def.qos.is_some(), "qos");
    add(def.url.is_some(), "url");
    add(def.secret.is_some(), "secret");
    add(def.secret_env.is_some(), "secret_env");
    add(def.timeout_ms.is_some(), "timeout_ms");
    add(def.path.is_some(), "path");
    add(def.stream.is_some(), "stream");
    add(def.maxlen.is_some(), "maxlen");
    keys
}

fn sink(
    i: usize,
    def: &SinkDef,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> Option<SinkSettings> {
    let path = format!("sinks[{i}]");
    if !is_sink_or_rule_id(&def.id) {
        errors.add(format!("{path}.id"), "must be 3-64 chars of [A-Za-z0-9_-]");
    }
    for key in present_keys(def) {
        if !keys_of(&def.kind).contains(&key) {
            errors.add(
                format!("{path}.{key}"),
                format!("not a key of a sink of type {:?}", def.kind),
            );
        }
    }
    let required = |value: &Option<String>, key: &str, errors: &mut Errors| -> Option<String> {
        match value {
            Some(v) if !v.is_empty() => Some(v.clone()),
            _ => {
                errors.add(
                    format!("{path}.{key}"),
                    format!("required for a {} sink", def.kind),
                );
                None
            }
        }
    };
    let kind = match def.kind.as_str() {
        "mqtt" => {
            let topic = required(&def.topic, "topic", errors)?;
            let qos = match def.qos.map(QoS::from_u8).unwrap_or(Some(QoS::AtLeastOnce)) {
                Some(qos) => qos,
                None => {
                    errors.add(format!("{path}.qos"), "must be 0, 1 or 2");
                    QoS::AtLeastOnce
                }
            };
            SinkKind::Mqtt { topic, qos }
        }
        "webhook" => {
            let url = required(&def.url, "url", errors)?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                errors.add(format!("{path}.url"), "must start with http:// or https://");
            }
            let secret = crate::validate::secret(&path, &def.secret, &def.secret_env, env, errors)
                .map(Secret::new);
            let timeout_ms = def.timeout_ms.unwrap_or(5000);
            if !(1..=600_000).contains(&timeout_ms) {
                errors.add(format!("{path}.timeout_ms"), "must be between 1 and 600000");
            }
            SinkKind::Webhook {
                url,
                secret,
                timeout: Duration::from_millis(timeout_ms),
            }
        }
        "file" => SinkKind::File {
            path: PathBuf::from(required(&def.path, "path", errors)?),
        },
        "redis" => {
            let url = required(&def.url, "url", errors)?;
            if !(url.starts_with("redis://") || url.starts_with("unix://")) {
                // rediss:// would need the Redis client's TLS support, which is not built in.
                errors.add(format!("{path}.url"), "must be a redis:// or unix:// URL");
            }
            let stream = def
                .stream
                .clone()
                .unwrap_or_else(|| "herald:presence".into());
            SinkKind::Redis {
                url,
                stream,
                maxlen: def.maxlen.map(|n| n as usize),
            }
        }
        other => {
            errors.add(
                format!("{path}.type"),
                format!("must be mqtt, webhook, file or redis, got {other:?}"),
            );
            return None;
        }
    };
    let outbox_max = errors.range(
        &format!("{path}.outbox_max"),
        def.outbox_max.unwrap_or(100_000),
        1,
        100_000_000,
    );
    let age = def.outbox_max_age_secs.unwrap_or(7 * 24 * 3600);
    if age == 0 {
        errors.add(format!("{path}.outbox_max_age_secs"), "must be at least 1");
    }
    Some(SinkSettings {
        id: def.id.clone(),
        kind,
        outbox_max,
        outbox_max_age: Duration::from_secs(age.max(1)),
    })
}

enum Rule {
    Status(StatusRule),
    Outflow(OutflowRule),
}

fn rule(
    i: usize,
    def: &RuleDef,
    groups: &[String],
    sinks: &HashSet<String>,
    errors: &mut Errors,
) -> Option<Rule> {
    let path = format!("rules[{i}]");
    if !is_sink_or_rule_id(&def.id) {
        errors.add(format!("{path}.id"), "must be 3-64 chars of [A-Za-z0-9_-]");
    }
    for (j, sink) in def.sinks.iter().enumerate() {
        if !sinks.contains(sink) {
            errors.add(
                format!("{path}.sinks[{j}]"),
                format!("no sink with id {sink:?}"),
            );
        }
    }
    if def.sinks.is_empty() {
        errors.add(format!("{path}.sinks"), "must name at least one sink");
    }
    match def.kind.as_str() {
        "status_notice" => {}
        "outflow" => return outflow(&path, def, errors).map(Rule::Outflow),
        "inflow" => {
            errors.add(
                format!("{path}.kind"),
                "inflow needs no rule: POST /api/v1/messages publishes on a topic",
            );
            return None;
        }
        other => {
            errors.add(
                format!("{path}.kind"),
                format!("must be status_notice, outflow or inflow, got {other:?}"),
            );
            return None;
        }
    }
    if def.source.topics.is_some() {
        errors.add(
            format!("{path}.source.topics"),
            "status_notice rules take groups and events, not topics",
        );
    }
    let rule_groups = def.source.groups.clone().unwrap_or_default();
    for (j, group) in rule_groups.iter().enumerate() {
        if !groups.contains(group) {
            errors.add(
                format!("{path}.source.groups[{j}]"),
                format!("group {group:?} is not declared in [[groups]]"),
            );
        }
    }
    let mut events = Vec::new();
    for (j, name) in def
        .source
        .events
        .clone()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match EventKind::parse(name) {
            Some(kind) => events.push(kind),
            None => errors.add(
                format!("{path}.source.events[{j}]"),
                format!("must be connect, disconnect, tcpclean or connect_failed, got {name:?}"),
            ),
        }
    }
    Some(Rule::Status(StatusRule {
        id: def.id.clone(),
        groups: rule_groups,
        events,
        sinks: def.sinks.clone(),
    }))
}

fn outflow(path: &str, def: &RuleDef, errors: &mut Errors) -> Option<OutflowRule> {
    if def.source.groups.is_some() || def.source.events.is_some() {
        errors.add(
            format!("{path}.source"),
            "outflow rules take topics, not groups or events",
        );
    }
    let filters = def.source.topics.clone().unwrap_or_default();
    if filters.is_empty() {
        errors.add(
            format!("{path}.source.topics"),
            "an outflow rule needs at least one topic filter",
        );
    }
    for (j, filter) in filters.iter().enumerate() {
        if let Err(e) = validate_filter(filter, usize::from(u16::MAX)) {
            errors.add(
                format!("{path}.source.topics[{j}]"),
                format!("invalid topic filter {filter:?}: {e}"),
            );
        }
    }
    Some(OutflowRule {
        id: def.id.clone(),
        filters,
        sinks: def.sinks.clone(),
    })
}

/// Validates presence, sinks and rules; returns the presence settings and the sinks.
pub fn validate(
    file: &ConfigFile,
    node_id: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> (PresenceSettings, Vec<SinkSettings>) {
    let mut sinks = Vec::new();
    let mut sink_ids = HashSet::new();
    for (i, def) in file.sinks.iter().enumerate() {
        if !sink_ids.insert(def.id.clone()) {
            errors.add(
                format!("sinks[{i}].id"),
                format!("duplicate sink {:?}", def.id),
            );
        }
        if let Some(settings) = sink(i, def, env, errors) {
            sinks.push(settings);
        }
    }
    let groups: Vec<String> = file.groups.iter().map(|g| g.id.clone()).collect();
    let mut rule_ids = HashSet::new();
    let mut rules = Vec::new();
    let mut outflow = Vec::new();
    for (i, def) in file.rules.iter().enumerate() {
        if !rule_ids.insert(def.id.clone()) {
            errors.add(
                format!("rules[{i}].id"),
                format!("duplicate rule {:?}", def.id),
            );
        }
        match rule(i, def, &groups, &sink_ids, errors) {
            Some(Rule::Status(r)) => rules.push(r),
            Some(Rule::Outflow(r)) => outflow.push(r),
            None => {}
        }
    }
    let history = errors.range(
        "presence.history_per_client",
        file.presence.history_per_client,
        1,
        100_000,
    ) as u64;
    let presence = PresenceSettings {
        node_id: node_id.to_string(),
        history_per_client: history,
        snapshot_topic: file.presence.snapshot_topic,
        connect_failed: file.presence.connect_failed,
        rules,
        outflow,
    };
    (presence, sinks)
}
