//! Token mode (DESIGN.md 3.2): `POST /api/v1/tokens` (ApplyToken), `GET /api/v1/tokens/{token}`
//! (QueryToken) and `DELETE /api/v1/tokens/{token}` (RevokeToken).
//!
//! A token is 32 characters of base64url over 192 random bits. A revoked token is deleted: the
//! query then answers 404 like for a token never issued. An expired token is still answered
//! (`valid: false`) for a day after its expiry, then deleted with the next token issued.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use herald_auth::{Actions, TokenGrant, now_ms};
use herald_protocol::topic::validate_filter;
use herald_store::{Op, TokenRecord};
use serde::{Deserialize, Serialize};

use crate::AdminState;
use crate::error::ApiError;
use crate::input;

/// The longest a token may live.
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most resources one token may carry.
const MAX_RESOURCES: usize = 100;
/// How long an expired token is still answered by the query before it is deleted.
const KEEP_EXPIRED: Duration = Duration::from_secs(24 * 3600);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ApplyRequest {
    resources: Vec<String>,
    actions: String,
    expire_time: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Applied {
    token: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenInfo {
    valid: bool,
    resources: Vec<String>,
    actions: &'static str,
    expire_time: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Revoked {
    revoked: bool,
}

/// Checks the request against the time `now_ms` and the shortest lifetime `min_ttl`.
fn grant(
    request: ApplyRequest,
    now_ms: u64,
    min_ttl: Duration,
    max_topic_len: usize,
) -> Result<TokenGrant, ApiError> {
    if request.resources.is_empty() || request.resources.len() > MAX_RESOURCES {
        return Err(ApiError::bad(
            "resources",
            format!(
                "must hold 1 to {MAX_RESOURCES} topic filters, got {}",
                request.resources.len()
            ),
        ));
    }
    for (i, filter) in request.resources.iter().enumerate() {
        validate_filter(filter, max_topic_len)
            .map_err(|e| ApiError::bad(format!("resources[{i}]"), e.to_string()))?;
    }
    let actions = Actions::parse_api(&request.actions).ok_or_else(|| {
        ApiError::bad(
            "actions",
            format!("must be \"R\", \"W\" or \"R,W\", got {:?}", request.actions),
        )
    })?;
    let earliest = now_ms + min_ttl.as_millis() as u64;
    let latest = now_ms + MAX_TTL.as_millis() as u64;
    if !(earliest..=latest).contains(&request.expire_time) {
        return Err(ApiError::bad(
            "expireTime",
            format!(
                "must be ms since the epoch, {} s to 30 days from now ({earliest}..={latest})",
                min_ttl.as_secs()
            ),
        ));
    }
    Ok(TokenGrant {
        resources: request.resources,
        actions,
        expire_at_ms: request.expire_time,
    })
}

fn new_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>())
}

fn path_token(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(token) = path.map_err(|e| ApiError::bad("token", e.body_text()))?;
    if token.is_empty() || token.len() > 256 {
        return Err(ApiError::bad("token", "must be 1 to 256 characters"));
    }
    Ok(token)
}

/// `POST /api/v1/tokens` with `{resources, actions, expireTime}`.
pub(crate) async fn apply(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Applied>, ApiError> {
    let request: ApplyRequest = input::json_body(&headers, body)?;
    let now = now_ms();
    let grant = grant(request, now, state.min_token_ttl, state.max_topic_len)?;
    let token = new_token();
    let registry = state.auth.registry();
    let forgotten = registry.tokens_expired_before(now - KEEP_EXPIRED.as_millis() as u64);
    let mut ops: Vec<Op> = forgotten
        .iter()
        .map(|token| Op::DeleteToken {
            token: token.clone(),
        })
        .collect();
    ops.push(Op::PutToken {
        token: token.clone(),
        record: TokenRecord {
            resources: grant.resources.clone(),
            actions: grant.actions.bits(),
            expire_at_ms: grant.expire_at_ms,
        },
    });
    state.persist(ops).await?;
    for old in &forgotten {
        registry.remove_token(old);
    }
    registry.insert_token(token.clone(), grant);
    Ok(Json(Applied { token }))
}

/// `GET /api/v1/tokens/{token}`.
pub(crate) async fn query(
    State(state): State<Arc<AdminState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<TokenInfo>, ApiError> {
    let token = path_token(path)?;
    let grant = state
        .auth
        .registry()
        .token(&token)
        .ok_or_else(unknown_token)?;
    Ok(Json(TokenInfo {
        valid: grant.valid_at(now_ms()),
        resources: grant.resources.clone(),
        actions: grant.actions.as_api(),
        expire_time: grant.expire_at_ms,
    }))
}

/// `DELETE /api/v1/tokens/{token}`: the connections that use it end at once, with
/// `tcpclean` reason `auth_revoked`.
pub(crate) async fn revoke(
    State(state): State<Arc<AdminState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Revoked>, ApiError> {
    let token = path_token(path)?;
    let registry = state.auth.registry();
    if registry.token(&token).is_none() {
        return Err(unknown_token());
    }
    state
        .persist(vec![Op::DeleteToken {
            token: token.clone(),
        }])
        .await?;
    registry.remove_token(&token);
    Ok(Json(Revoked { revoked: true }))
}

fn unknown_token() -> ApiError {
    ApiError::NotFound("no such token (never issued, revoked, or expired over a day ago)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(resources: &[&str], actions: &str, expire_time: u64) -> ApplyRequest {
        ApplyRequest {
            resources: resources.iter().map(|r| (*r).to_owned()).collect(),
            actions: actions.into(),
            expire_time,
        }
    }

    fn field(result: Result<TokenGrant, ApiError>) -> String {
        match result {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_name_their_field() {
        let now = 1_800_000_000_000;
        let min = Duration::from_secs(60);
        let ok = now + 120_000;
        assert!(grant(request(&["a/#"], "R,W", ok), now, min, 64).is_ok());
        assert_eq!(
            field(grant(request(&[], "R", ok), now, min, 64)),
            "resources"
        );
        let many: Vec<String> = (0..101).map(|i| format!("t/{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            field(grant(request(&many, "R", ok), now, min, 64)),
            "resources"
        );
        assert_eq!(
            field(grant(request(&["a", "a/#/b"], "R", ok), now, min, 64)),
            "resources[1]"
        );
        assert_eq!(
            field(grant(request(&["a"], "X", ok), now, min, 64)),
            "actions"
        );
        let soon = now + 59_000;
        assert_eq!(
            field(grant(request(&["a"], "R", soon), now, min, 64)),
            "expireTime"
        );
        let late = now + MAX_TTL.as_millis() as u64 + 1;
        assert_eq!(
            field(grant(request(&["a"], "R", late), now, min, 64)),
            "expireTime"
        );
        let short = Duration::from_secs(1);
        assert!(grant(request(&["a"], "W", now + 1_000), now, short, 64).is_ok());
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(!a.contains('|'));
    }
}
