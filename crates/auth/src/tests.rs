use super::*;

fn settings() -> AuthSettings {
    AuthSettings {
        instance_id: "herald-demo".into(),
        allow_anonymous: false,
        client_id_format: ClientIdFormat::Alibaba,
        legacy_signature: false,
        access_keys: vec![AccessKey {
            id: "demo".into(),
            secret: Secret::new("demo-secret"),
            publish: vec!["demo/#".into()],
            subscribe: vec!["demo/#".into(), "$notice/GID_demo/#".into()],
            admin: false,
        }],
        groups: vec!["GID_demo".into()],
        parent_topics: vec!["demo".into()],
        max_client_id_len: 64,
    }
}

const ID: &str = "GID_demo@@@dev-1";
const GOOD: &[u8] = b"5vPUiwwywQkBwF4swW30o85MOqw=";

fn auth(
    settings: AuthSettings,
    id: &str,
    user: Option<&str>,
    pass: Option<&[u8]>,
) -> Result<Principal, Refusal> {
    let a = Authenticator::new(settings);
    let id = a.check_client_id(id)?;
    a.authenticate(&id, user, pass)
}

fn code(r: Result<Principal, Refusal>) -> u8 {
    match r {
        Ok(_) => 0,
        Err(e) => e.return_code().as_u8(),
    }
}

#[test]
fn signature_mode_accepts_and_refuses_with_the_right_codes() {
    let user = Some("Signature|demo|herald-demo");
    assert_eq!(code(auth(settings(), ID, user, Some(GOOD))), 0);
    assert_eq!(code(auth(settings(), ID, user, Some(b"wrong"))), 4);
    assert_eq!(code(auth(settings(), ID, user, None)), 4);
    assert_eq!(
        code(auth(
            settings(),
            ID,
            Some("Signature|nokey|herald-demo"),
            Some(GOOD)
        )),
        5
    );
    assert_eq!(
        code(auth(
            settings(),
            ID,
            Some("Signature|demo|other"),
            Some(GOOD)
        )),
        5
    );
    assert_eq!(code(auth(settings(), ID, None, None)), 5);
    assert_eq!(code(auth(settings(), ID, Some("nonsense"), Some(GOOD))), 4);
    assert_eq!(
        code(auth(settings(), "GID_other@@@dev-1", user, Some(GOOD))),
        2
    );
    assert_eq!(code(auth(settings(), "plain-id", user, Some(GOOD))), 2);
}

#[test]
fn legacy_signature_signs_the_group() {
    let mut s = settings();
    s.legacy_signature = true;
    let pass = sign("demo-secret", "GID_demo");
    assert_eq!(
        code(auth(s.clone(), ID, Some("demo"), Some(pass.as_bytes()))),
        0
    );
    assert_eq!(code(auth(s, ID, Some("demo"), Some(GOOD))), 4);
    assert_eq!(
        code(auth(settings(), ID, Some("demo"), Some(pass.as_bytes()))),
        4
    );
}

#[test]
fn anonymous_and_any_format_for_plain_clients() {
    let mut s = settings();
    s.allow_anonymous = true;
    s.client_id_format = ClientIdFormat::Any;
    s.parent_topics.clear();
    let p = auth(s.clone(), "plain", None, None).expect("anonymous allowed");
    assert!(p.can_publish("any/topic"));
    assert!(p.can_subscribe("#"));
    assert!(!p.can_subscribe("$notice/#"));
    assert!(!p.can_subscribe("$presence/x"));
    assert!(!p.can_publish("$SYS/x"));
    assert!(!p.can_publish("$notice/x"));
    assert!(p.can_publish("$TopicA/B"));
    assert!(!p.can_subscribe("demo/p2p/other"));
    // Unknown credentials are anonymous in open mode, but a wrong signature is not.
    assert_eq!(code(auth(s.clone(), "plain", Some("user"), Some(b"pw"))), 0);
    assert_eq!(
        code(auth(
            s,
            ID,
            Some("Signature|demo|herald-demo"),
            Some(b"bad")
        )),
        4
    );
}

#[test]
fn key_permissions_parents_and_p2p() {
    let p = auth(
        settings(),
        ID,
        Some("Signature|demo|herald-demo"),
        Some(GOOD),
    )
    .expect("valid");
    assert!(p.can_publish("demo/a"));
    assert!(p.can_publish("demo/p2p/GID_demo@@@dev-2"));
    assert!(!p.can_publish("other/a"));
    assert!(!p.can_publish("$notice/x"));
    assert!(p.can_subscribe("demo/#"));
    assert!(p.can_subscribe("demo/a/+"));
    assert!(!p.can_subscribe("#"));
    assert!(!p.can_subscribe("other/#"));
    assert!(p.can_subscribe("$notice/GID_demo/+"));
    assert!(!p.can_subscribe("$presence/x"));
    assert!(p.can_subscribe("demo/p2p/GID_demo@@@dev-1"));
    assert!(!p.can_subscribe("demo/p2p/GID_demo@@@dev-2"));
    assert!(!p.can_subscribe("demo/p2p/+"));
    assert!(!p.can_subscribe("demo/p2p/#"));
}

const NOW: u64 = 1_800_000_000_000;

fn with_registry() -> Authenticator {
    let registry = Arc::new(AuthRegistry::new());
    registry.insert_token(
        "tokR".into(),
        TokenGrant {
            resources: vec!["demo/in/#".into()],
            actions: Actions::READ,
            expire_at_ms: NOW + 60_000,
        },
    );
    registry.insert_token(
        "tokW".into(),
        TokenGrant {
            resources: vec!["demo/out/+".into()],
            actions: Actions::WRITE,
            expire_at_ms: NOW + 60_000,
        },
    );
    registry.insert_token(
        "old".into(),
        TokenGrant {
            resources: vec!["demo/#".into()],
            actions: Actions::READ_WRITE,
            expire_at_ms: NOW - 1,
        },
    );
    registry.insert_credential(DeviceCredential {
        client_id: ID.into(),
        key_id: "DK1".into(),
        secret: Secret::new("device-secret"),
        created_at_ms: 0,
    });
    Authenticator::with_registry(settings(), registry)
}

fn token_auth(a: &Authenticator, user: &str, pass: &str, now: u64) -> Result<Principal, Refusal> {
    let id = a.check_client_id(ID)?;
    a.authenticate_at(&id, Some(user), Some(pass.as_bytes()), now)
}

#[test]
fn token_mode_grants_the_union_of_its_tokens() {
    let a = with_registry();
    let user = "Token|demo|herald-demo";
    let p = token_auth(&a, user, "R|tokR|W|tokW", NOW).expect("valid tokens");
    assert!(p.is_token_mode() && p.relies_on_registry());
    assert!(p.can_subscribe("demo/in/x/y"));
    assert!(!p.can_subscribe("demo/out/x"), "a W token does not read");
    assert!(p.can_publish("demo/out/x"));
    assert!(!p.can_publish("demo/in/x"), "an R token does not write");
    assert!(!p.can_publish("demo/out/x/y"));
    assert!(!p.can_subscribe("demo/p2p/GID_demo@@@other"));
    // Only R presented: W rights are not there even though the token exists.
    let p = token_auth(&a, user, "R|tokR", NOW).expect("valid");
    assert!(!p.can_publish("demo/out/x"));
}

#[test]
fn token_mode_refusal_codes() {
    let a = with_registry();
    let user = "Token|demo|herald-demo";
    let c = |user: &str, pass: &str, now: u64| code(token_auth(&a, user, pass, now));
    assert_eq!(c(user, "R|tokR", NOW), 0);
    assert_eq!(c(user, "R|nope", NOW), 4, "unknown token");
    assert_eq!(
        c(user, "R|tokR|W|nope", NOW),
        4,
        "every token must be valid"
    );
    assert_eq!(c(user, "RW|old", NOW), 4, "expired");
    assert_eq!(c(user, "R|tokR", NOW + 60_000), 4, "expires at expire time");
    assert_eq!(c(user, "W|tokR", NOW), 4, "type beyond the grant");
    assert_eq!(c(user, "X|tokR", NOW), 4, "bad type");
    assert_eq!(c(user, "R|tokR|W", NOW), 4, "odd pairs");
    assert_eq!(c(user, "", NOW), 4);
    assert_eq!(
        c("Token|nokey|herald-demo", "R|tokR", NOW),
        5,
        "unknown key"
    );
    assert_eq!(c("Token|demo|other", "R|tokR", NOW), 5, "unknown instance");
    a.registry().remove_token("tokR");
    assert_eq!(c(user, "R|tokR", NOW), 4, "revoked");
}

#[test]
fn revocation_and_expiry_end_validity() {
    let a = with_registry();
    let p = token_auth(&a, "Token|demo|herald-demo", "R|tokR|W|tokW", NOW).expect("valid");
    let registry = a.registry();
    assert_eq!(p.still_valid(registry, NOW), Ok(()));
    assert!(p.still_valid(registry, NOW + 60_000).is_err(), "expired");
    let generation = registry.generation();
    registry.remove_token("tokW");
    assert!(registry.generation() > generation);
    assert!(p.still_valid(registry, NOW).is_err(), "revoked");
}

#[test]
fn upload_token_replaces_the_grant_of_its_type() {
    let a = with_registry();
    let mut p = token_auth(&a, "Token|demo|herald-demo", "W|tokW", NOW).expect("valid");
    assert!(!p.can_subscribe("demo/in/a"));
    let upload = br#"{"token": "tokR", "type": "R"}"#;
    a.upload_token(&mut p, upload, NOW).expect("valid upload");
    assert!(p.can_subscribe("demo/in/a") && p.can_publish("demo/out/a"));
    a.registry().insert_token(
        "tokW2".into(),
        TokenGrant {
            resources: vec!["demo/other".into()],
            actions: Actions::WRITE,
            expire_at_ms: NOW + 120_000,
        },
    );
    a.upload_token(&mut p, br#"{"token":"tokW2","type":"W"}"#, NOW)
        .expect("valid upload");
    assert!(p.can_publish("demo/other") && !p.can_publish("demo/out/a"));
    // The replaced token's revocation no longer matters.
    a.registry().remove_token("tokW");
    assert_eq!(p.still_valid(a.registry(), NOW), Ok(()));
    for bad in [
        &br#"{"token":"nope","type":"R"}"#[..],
        b"not json",
        br#"{"token":"old","type":"R"}"#,
    ] {
        assert!(a.upload_token(&mut p, bad, NOW).is_err());
    }
    let mut key_client = auth(
        settings(),
        ID,
        Some("Signature|demo|herald-demo"),
        Some(GOOD),
    )
    .expect("signature");
    assert!(a.upload_token(&mut key_client, upload, NOW).is_err());
}

#[test]
fn device_credentials_bind_one_client_id() {
    let a = with_registry();
    let user = "DeviceCredential|DK1|herald-demo";
    let password = sign("device-secret", ID);
    let p = token_auth(&a, user, &password, NOW).expect("valid credential");
    assert!(p.relies_on_registry() && !p.is_token_mode());
    assert!(p.can_publish("demo/a") && p.can_subscribe("demo/#"));
    assert!(!p.can_publish("other/a"), "parent topics still apply");
    assert!(!p.can_subscribe("$presence/#"));
    assert!(!p.can_subscribe("demo/p2p/GID_demo@@@dev-2"));
    assert_eq!(p.still_valid(a.registry(), NOW), Ok(()));

    let c = |id: &str, user: &str, pass: &str| {
        let id = a.check_client_id(id).expect("id");
        code(a.authenticate_at(&id, Some(user), Some(pass.as_bytes()), NOW))
    };
    assert_eq!(c(ID, user, "wrong"), 4);
    let other = "GID_demo@@@dev-2";
    assert_eq!(
        c(other, user, &sign("device-secret", other)),
        5,
        "bound elsewhere"
    );
    assert_eq!(
        c(ID, "DeviceCredential|DK9|herald-demo", &password),
        5,
        "unknown key"
    );
    assert_eq!(
        c(ID, "DeviceCredential|DK1|other", &password),
        5,
        "unknown instance"
    );

    a.registry().replace_credential(DeviceCredential {
        client_id: ID.into(),
        key_id: "DK1".into(),
        secret: Secret::new("new-secret"),
        created_at_ms: 1,
    });
    assert_eq!(c(ID, user, &password), 4, "the old secret stops working");
    assert_eq!(c(ID, user, &sign("new-secret", ID)), 0);
    assert!(
        p.still_valid(a.registry(), NOW).is_err(),
        "live connection is revoked"
    );
    a.registry().remove_credential(ID);
    assert_eq!(c(ID, user, &sign("new-secret", ID)), 5);
}

#[test]
fn actions_parse_and_print() {
    assert_eq!(Actions::parse_api("R,W"), Some(Actions::READ_WRITE));
    assert_eq!(Actions::parse_api("X"), None);
    for a in [Actions::READ, Actions::WRITE, Actions::READ_WRITE] {
        assert_eq!(Actions::from_bits(a.bits()), a);
        assert_eq!(Actions::parse_api(a.as_api()), Some(a));
    }
    assert!(Actions::READ.within(Actions::READ_WRITE));
    assert!(!Actions::READ_WRITE.within(Actions::WRITE));
}
