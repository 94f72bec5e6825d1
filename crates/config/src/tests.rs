use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn errors(text: &str) -> Vec<String> {
    match Config::parse(text, &no_env) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn the_shipped_config_parses_to_the_demo() {
    let text = include_str!("../../../config/herald.toml");
    let config = Config::parse(text, &no_env).expect("shipped config is valid");
    assert_eq!(config.auth.instance_id, "herald-demo");
    assert_eq!(config.auth.groups, vec!["GID_demo".to_string()]);
    assert_eq!(config.auth.parent_topics, vec!["demo".to_string()]);
    assert!(!config.auth.allow_anonymous);
    assert_eq!(
        config.auth.client_id_format,
        herald_auth::ClientIdFormat::Alibaba
    );
    let key = &config.auth.access_keys[0];
    assert_eq!(key.id, "demo");
    assert_eq!(key.secret.expose(), "demo-secret");
    assert_eq!(key.publish, vec!["demo/#".to_string()]);
    assert_eq!(key.subscribe, vec!["demo/#".to_string()]);
    assert_eq!(
        config.tcp.as_ref().map(|t| t.bind.to_string()),
        Some("0.0.0.0:1883".into())
    );
    assert_eq!(config.storage.data_dir, std::path::PathBuf::from("data"));
    assert_eq!(config.storage.sync, herald_store::SyncMode::Always);
    assert_eq!(config.storage.cache_bytes, 512 * 1024);
    assert_eq!(
        config.demo_keys,
        vec![
            "demo".to_string(),
            "backend".to_string(),
            "admin".to_string()
        ]
    );
    assert!(config.auth.access_keys[2].admin);
    assert_eq!(config.sinks.len(), 1);
    assert_eq!(config.router.presence.rules.len(), 1);
    assert_eq!(
        config.admin_bind.map(|a| a.to_string()),
        Some("127.0.0.1:8080".into())
    );
    assert_eq!(config.server.max_packet_size, 65536);
    assert_eq!(config.router.max_inflight, 64);
    assert_eq!(
        config.server.park_idle,
        Some(std::time::Duration::from_millis(100))
    );
}

#[test]
fn park_idle_ms_zero_never_parks_and_is_bounded() {
    let config = Config::parse("[limits]\npark_idle_ms = 0\n", &no_env).expect("valid");
    assert_eq!(config.server.park_idle, None);
    let config = Config::parse("[limits]\npark_idle_ms = 250\n", &no_env).expect("valid");
    assert_eq!(
        config.server.park_idle,
        Some(std::time::Duration::from_millis(250))
    );
    let errs = errors("[limits]\npark_idle_ms = 3600001\n");
    assert!(
        errs.iter().any(|e| e.starts_with("limits.park_idle_ms")),
        "{errs:?}"
    );
}

#[test]
fn cache_mb_takes_integers_and_decimals_and_is_bounded() {
    assert_eq!(
        Config::builtin().storage.cache_bytes,
        herald_store::DEFAULT_CACHE_BYTES
    );
    for (value, bytes) in [("4", 4 << 20), ("0.25", 256 << 10), ("0.0625", 64 << 10)] {
        let config = Config::parse(&format!("[storage]\ncache_mb = {value}\n"), &no_env)
            .unwrap_or_else(|e| panic!("{value}: {e:?}"));
        assert_eq!(config.storage.cache_bytes, bytes, "{value}");
    }
    for bad in ["0", "0.01", "-1", "nan", "inf", "1048577", "\"big\""] {
        let errs = errors(&format!("[storage]\ncache_mb = {bad}\n"));
        assert!(
            errs.iter().any(|e| e.starts_with("storage.cache_mb")),
            "{bad}: {errs:?}"
        );
    }
}

#[test]
fn write_timeout_secs_is_read_and_bounded() {
    let config = Config::builtin();
    assert_eq!(
        config.server.write_timeout,
        std::time::Duration::from_secs(30)
    );
    let config = Config::parse("[limits]\nwrite_timeout_secs = 5\n", &no_env).expect("valid");
    assert_eq!(
        config.server.write_timeout,
        std::time::Duration::from_secs(5)
    );
    for bad in ["0", "86401"] {
        let errs = errors(&format!("[limits]\nwrite_timeout_secs = {bad}\n"));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("limits.write_timeout_secs")),
            "{bad}: {errs:?}"
        );
    }
}

#[test]
fn builtin_defaults_are_valid_and_local() {
    let config = Config::builtin();
    assert!(config.auth.allow_anonymous);
    assert_eq!(
        config.tcp.map(|t| t.bind.to_string()),
        Some("127.0.0.1:1883".into())
    );
}

#[test]
fn unknown_keys_are_errors_with_their_path() {
    let errs = errors("[limits]\nmax_topics_len = 3\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("limits"), "{errs:?}");
    assert!(errs[0].contains("max_topics_len"), "{errs:?}");
    let errs = errors("[[access_keys]]\nid = \"a\"\nsecret = \"s\"\nadmn = true\n");
    assert!(errs[0].starts_with("access_keys[0]"), "{errs:?}");
}

#[test]
fn every_validation_error_is_reported_at_once() {
    let text = r#"
        [instance]
        client_id_format = "weird"
        [[access_keys]]
        id = "a"
        publish = ["a/#/b"]
        [[groups]]
        id = "GID"
        [[topics]]
        parent = "a/b"
        [limits]
        max_inflight = 0
        on_denied_publish = "explode"
        [storage]
        sync = "sometimes"
        cache_mb = 0
        [listeners.tcp]
        bind = "nowhere"
    "#;
    let errs = errors(text);
    for path in [
        "instance.client_id_format",
        "access_keys[0].secret",
        "access_keys[0].publish[0]",
        "groups[0].id",
        "topics[0].parent",
        "limits.max_inflight",
        "limits.on_denied_publish",
        "storage.sync",
        "storage.cache_mb",
        "listeners.tcp.bind",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(path)),
            "missing {path} in {errs:#?}"
        );
    }
}

#[test]
fn secrets_come_from_the_environment() {
    let text = "[[access_keys]]\nid = \"a\"\nsecret_env = \"HERALD_TEST_SECRET\"\n";
    let env = |name: &str| (name == "HERALD_TEST_SECRET").then(|| "s3cret".to_string());
    let config = Config::parse(text, &env).expect("valid");
    assert_eq!(config.auth.access_keys[0].secret.expose(), "s3cret");
    let errs = errors(text);
    assert!(errs[0].starts_with("access_keys[0].secret_env"), "{errs:?}");
    assert!(format!("{:?}", config.auth.access_keys[0]).contains("REDACTED"));
}

#[test]
fn syntax_errors_are_reported() {
    let errs = errors("[limits\n");
    assert!(errs[0].contains("TOML"), "{errs:?}");
    let errs = errors("[limits]\nmax_inflight = \"many\"\n");
    assert!(errs[0].starts_with("limits.max_inflight"), "{errs:?}");
}

#[test]
fn sinks_and_rules_are_validated_with_their_paths() {
    let text = r#"
        [[groups]]
        id = "GID_demo"
        [[sinks]]
        id = "ok-hook"
        type = "webhook"
        url = "ftp://x"
        path = "/tmp/x"
        [[sinks]]
        id = "x"
        type = "mqtt"
        [[sinks]]
        id = "ok-hook"
        type = "pigeon"
        [[rules]]
        id = "r1"
        kind = "status_notice"
        source = { groups = ["GID_nope"], events = ["connect", "sneeze"] }
        sinks = ["missing"]
        [[rules]]
        id = "r-out"
        kind = "outflow"
        source = { topics = ["a/#/b"] }
        sinks = ["ok-hook"]
        [[rules]]
        id = "r-in"
        kind = "inflow"
        sinks = ["ok-hook"]
    "#;
    let errs = errors(text);
    for path in [
        "sinks[0].url",
        "sinks[0].path",
        "sinks[1].id",
        "sinks[1].topic",
        "sinks[2].id",
        "sinks[2].type",
        "rules[0].id",
        "rules[0].sinks[0]",
        "rules[0].source.groups[0]",
        "rules[0].source.events[1]",
        "rules[1].source.topics[0]",
        "rules[2].kind",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(path)),
            "missing {path} in {errs:#?}"
        );
    }
}

#[test]
fn a_valid_rule_set_builds_router_and_sink_settings() {
    let text = r#"
        [node]
        id = "edge-7"
        [[groups]]
        id = "GID_demo"
        [[sinks]]
        id = "hook"
        type = "webhook"
        url = "http://127.0.0.1:9000/p"
        secret_env = "HOOK_SECRET"
        outbox_max = 10
        [[rules]]
        id = "status"
        kind = "status_notice"
        source = { groups = ["GID_demo"], events = ["tcpclean"] }
        sinks = ["hook"]
        [[rules]]
        id = "telemetry"
        kind = "outflow"
        source = { topics = ["t/#"] }
        sinks = ["hook"]
    "#;
    let env = |name: &str| (name == "HOOK_SECRET").then(|| "s".to_string());
    let config = Config::parse(text, &env).expect("valid");
    assert_eq!(config.router.presence.node_id, "edge-7");
    assert_eq!(
        config.router.presence.rules[0].events,
        vec![herald_router::EventKind::TcpClean]
    );
    assert_eq!(
        config.router.presence.outflow[0].filters,
        vec!["t/#".to_string()]
    );
    assert_eq!(config.sinks[0].outbox_max, 10);
    assert!(matches!(
        &config.sinks[0].kind,
        herald_rules::SinkKind::Webhook {
            secret: Some(_),
            ..
        }
    ));
}
