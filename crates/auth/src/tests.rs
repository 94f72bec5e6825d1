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
