//! The admin HTTP API (DESIGN.md 7): health, client state and presence history, kick, publish,
//! and Prometheus metrics, all behind HTTP Basic auth with an `admin` access key.
//!
//! It owns no broker state: every answer comes from the router (through [`RouterHandle`]'s
//! inputs and history reader), the router's counters, or the sinks' queues. Tokens and device
//! credentials live in the authenticator's registry; their changes are made durable through
//! the router (`Input::Persist`) before the registry changes and the request is answered.
//!
//! [`app`] builds the routes (tested with `tower::ServiceExt::oneshot`, no socket); [`serve`]
//! runs them on a listener until shutdown.

mod auth;
mod clients;
mod credentials;
mod error;
mod input;
mod messages;
mod metrics;
#[cfg(test)]
mod tests;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{delete, get, post};
use herald_auth::Authenticator;
use herald_router::{Input, RouterHandle, SinkQueue};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

pub use error::ApiError;

/// What the admin routes read from. The app keeps it in an `Arc`.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub router: RouterHandle,
    /// Checks the Basic credentials of every request.
    pub auth: Arc<Authenticator>,
    /// The sinks' outbox queues, for the metrics.
    pub sinks: Vec<Arc<SinkQueue>>,
    /// Reported by the health check.
    pub node_id: String,
    /// The longest topic a published message may have (`limits.max_topic_len`).
    pub max_topic_len: usize,
    /// The listeners' refusal counters, when the admin API runs beside them.
    pub edge: Option<Arc<herald_server::ServerStats>>,
    /// The shortest token lifetime `POST /api/v1/tokens` accepts (`instance.min_token_ttl_secs`).
    pub min_token_ttl: Duration,
}

/// How long a request waits for the router before answering 503.
const ROUTER_WAIT: Duration = Duration::from_secs(5);

impl AdminState {
    /// Sends the input `make` builds to the router and waits up to `wait` for its reply.
    async fn ask<T>(
        &self,
        wait: Duration,
        make: impl FnOnce(oneshot::Sender<T>) -> Input,
    ) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        let asked = async {
            self.router.inputs.send(make(reply)).await.ok()?;
            rx.await.ok()
        };
        match tokio::time::timeout(wait, asked).await {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(ApiError::Unavailable("the router has stopped".into())),
            Err(_) => Err(ApiError::Unavailable(format!(
                "the router did not answer within {} ms",
                wait.as_millis()
            ))),
        }
    }
}

/// How long a change waits to be durable before answering 503.
const DURABLE_WAIT: Duration = Duration::from_secs(10);

impl AdminState {
    /// Stores `ops` through the router and waits until they are durable.
    async fn persist(&self, ops: Vec<herald_store::Op>) -> Result<(), ApiError> {
        let (done, durable) = oneshot::channel();
        let stored = async {
            if self
                .router
                .inputs
                .send(Input::Persist { ops, done })
                .await
                .is_err()
            {
                return Err(ApiError::Unavailable("the router has stopped".into()));
            }
            // The router drops `done` when the change could not be stored.
            durable
                .await
                .map_err(|_| ApiError::Unavailable("the change could not be stored".into()))
        };
        match tokio::time::timeout(DURABLE_WAIT, stored).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Unavailable(format!(
                "the change was not durable within {} s",
                DURABLE_WAIT.as_secs()
            ))),
        }
    }
}

/// The admin routes. Every route, and the 404 and 405 answers, need admin credentials.
pub fn app(state: AdminState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/api/v1/health", get(clients::health))
        .route("/api/v1/clients", get(clients::list))
        .route("/api/v1/clients/query", post(clients::query))
        .route("/api/v1/clients/{client_id}", get(clients::one))
        .route("/api/v1/clients/{client_id}/events", get(clients::events))
        .route(
            "/api/v1/clients/{client_id}/connection",
            delete(clients::kick),
        )
        .route("/api/v1/messages", post(messages::publish))
        .route("/api/v1/tokens", post(tokens::apply))
        .route(
            "/api/v1/tokens/{token}",
            get(tokens::query).delete(tokens::revoke),
        )
        .route("/api/v1/device-credentials", post(credentials::register))
        .route(
            "/api/v1/device-credentials/{client_id}",
            get(credentials::get).delete(credentials::unregister),
        )
        .route(
            "/api/v1/device-credentials/{client_id}/refresh",
            post(credentials::refresh),
        )
        .route("/metrics", get(metrics::metrics))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(input::BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ))
        .layer(middleware::from_fn(auth::log_refusals))
        .with_state(state)
}

/// Serves [`app`] on `listener` until `shutdown` turns true (or its sender is dropped), then
/// lets the requests in progress finish.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: watch::Receiver<bool>) {
    let addr = listener.local_addr().ok();
    let service = app(state).into_make_service_with_connect_info::<SocketAddr>();
    let result = axum::serve(listener, service)
        .with_graceful_shutdown(stopped(shutdown))
        .await;
    match result {
        Ok(()) => info!(?addr, "admin API stopped"),
        Err(e) => warn!(?addr, error = %e, "admin API failed"),
    }
}

async fn stopped(mut shutdown: watch::Receiver<bool>) {
    // An error means the sender is gone: the broker is stopping too.
    let _ = shutdown.wait_for(|stop| *stop).await;
}
