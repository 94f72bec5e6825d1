//! HTTP Basic authentication with an `admin` access key, and the one log line of every
//! refused request. Secrets are compared in constant time and never logged.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use herald_auth::Authenticator;
use subtle::ConstantTimeEq;
use tracing::warn;

use crate::AdminState;
use crate::error::{ApiError, Refused};

/// Lets the request through only with the credentials of an access key that has `admin`.
pub(crate) async fn require_admin(
    State(state): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Response {
    match check(&state.auth, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Checks the `Authorization` header: 401 without valid credentials, 403 for a valid key
/// without `admin`.
pub(crate) fn check(auth: &Authenticator, headers: &HeaderMap) -> Result<(), ApiError> {
    let (id, secret) = credentials(headers).ok_or(ApiError::Unauthorized)?;
    let Some(key) = auth.access_key(&id) else {
        // Spend the same work on an unknown key id as on a wrong secret.
        let _ = secret.as_bytes().ct_eq(secret.as_bytes());
        return Err(ApiError::Unauthorized);
    };
    if !bool::from(key.secret.expose().as_bytes().ct_eq(secret.as_bytes())) {
        return Err(ApiError::Unauthorized);
    }
    if !key.admin {
        return Err(ApiError::Forbidden(key.id.clone()));
    }
    Ok(())
}

/// The (id, secret) of a `Basic` authorization header, if it has one that decodes.
fn credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

/// Writes one line for every refused request: who asked, what, and why (never the
/// credentials, the query string or the body).
pub(crate) async fn log_refusals(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    let response = next.run(request).await;
    if let Some(refused) = response.extensions().get::<Refused>() {
        warn!(
            ?peer,
            %method,
            path = %path,
            status = response.status().as_u16(),
            code = refused.code,
            // Debug quoting: the reason may echo request text, which must not forge log lines.
            reason = ?refused.message,
            "admin request refused"
        );
    }
    response
}
