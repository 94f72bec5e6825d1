//! Wiring: config in, a running broker out. Opens the store, starts the router and the
//! listeners, and shuts them down in order. The `herald` binary is a thin CLI over this.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use herald_admin::AdminState;
use herald_auth::{Actions, AuthRegistry, Authenticator, DeviceCredential, Secret, TokenGrant};
use herald_config::Config;
use herald_router::{Event, Router, RouterHandle, SinkQueue, Transport};
use herald_server::Context;
use herald_server::{Endpoint, TlsAcceptor};
use herald_store::{RedbStore, Store as _};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use herald_config as config;

pub mod fds;

/// A running broker.
pub struct Broker {
    /// The address the TCP listener is bound to (useful with port 0).
    pub tcp_addr: Option<SocketAddr>,
    /// The TLS, WS and WSS listeners' addresses.
    pub endpoints: Vec<(Transport, SocketAddr)>,
    /// The address the admin HTTP API is bound to, when `[admin]` is on.
    pub admin_addr: Option<SocketAddr>,
    router: RouterHandle,
    router_task: JoinHandle<()>,
    stop_listeners: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    sinks: Vec<Arc<SinkQueue>>,
    sink_tasks: Vec<JoinHandle<()>>,
}

/// How long shutdown waits for healthy sinks to deliver what is in their outboxes (a failing
/// sink is not waited for; what is left stays in the store for the next start).
const SINK_DRAIN: Duration = Duration::from_secs(5);

/// Takes the tokens and device credentials out of the start-up snapshot (the router does not
/// own them) into the registry the connection tasks and the admin API share.
fn restore_registry(snapshot: &mut herald_store::Snapshot) -> Arc<AuthRegistry> {
    let registry = Arc::new(AuthRegistry::new());
    let tokens = std::mem::take(&mut snapshot.tokens);
    let credentials = std::mem::take(&mut snapshot.credentials);
    info!(
        tokens = tokens.len(),
        device_credentials = credentials.len(),
        "auth registry restored from storage"
    );
    for (token, record) in tokens {
        let grant = TokenGrant {
            resources: record.resources,
            actions: Actions::from_bits(record.actions),
            expire_at_ms: record.expire_at_ms,
        };
        registry.insert_token(token, grant);
    }
    for (client_id, record) in credentials {
        registry.insert_credential(DeviceCredential {
            client_id,
            key_id: record.key_id,
            secret: Secret::new(record.secret),
            created_at_ms: record.created_at_ms,
        });
    }
    registry
}

impl Broker {
    /// Opens storage, starts the router and binds the listeners.
    pub async fn start(config: Config) -> anyhow::Result<Broker> {
        Broker::start_with_events(config, None).await
    }

    /// Like [`Broker::start`], with presence events copied to `events`.
    pub async fn start_with_events(
        config: Config,
        events: Option<mpsc::Sender<Event>>,
    ) -> anyhow::Result<Broker> {
        // reqwest (webhooks) uses rustls with ring; a second install is a harmless no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        for key in &config.demo_keys {
            warn!(access_key = %key, "!!! access key {key:?} uses the shipped demo secret: anyone who has read the README can connect. Change it before exposing this broker. !!!");
        }
        let data_dir = config.storage.data_dir.clone();
        let sync = config.storage.sync;
        let cache_bytes = config.storage.cache_bytes;
        let (store, mut snapshot) = tokio::task::spawn_blocking(move || {
            let mut store = RedbStore::open_with_cache(&data_dir, sync, cache_bytes)?;
            let snapshot = store.load()?;
            Ok::<_, herald_store::StoreError>((store, snapshot))
        })
        .await
        .context("storage thread failed")?
        .with_context(|| {
            format!(
                "cannot open storage in {}",
                config.storage.data_dir.display()
            )
        })?;
        let registry = restore_registry(&mut snapshot);
        let queues: Vec<Arc<SinkQueue>> = config.sinks.iter().map(|s| s.queue()).collect();
        let (router, router_task) = Router::start_loaded(
            config.router.clone(),
            Box::new(store),
            snapshot,
            queues.clone(),
            events,
        )?;
        let mut sink_tasks = Vec::new();
        for (settings, queue) in config.sinks.iter().zip(&queues) {
            let task = herald_rules::start(settings, queue.clone(), router.clone())
                .with_context(|| format!("cannot start sink {:?}", settings.id))?;
            sink_tasks.push(task);
        }
        let context = Context::new(
            config.server.clone(),
            Authenticator::with_registry(config.auth.clone(), registry.clone()),
            router.clone(),
        );
        let (stop_listeners, stopped) = watch::channel(false);
        let mut listeners = Vec::new();
        let mut tcp_addr = None;
        if let Some(tcp) = &config.tcp {
            let listener = TcpListener::bind(tcp.bind)
                .await
                .with_context(|| format!("cannot listen on {} (listeners.tcp.bind)", tcp.bind))?;
            tcp_addr = Some(listener.local_addr()?);
            listeners.push(tokio::spawn(herald_server::serve_tcp(
                listener,
                context.clone(),
                stopped.clone(),
            )));
        }
        let mut extra = Vec::new();
        if let Some(tls) = &config.tls {
            extra.push((
                Endpoint::Tls(TlsAcceptor::from(tls.tls.clone())),
                tls.bind,
                "listeners.tls.bind",
            ));
        }
        for (ws, key) in [
            (&config.ws, "listeners.ws.bind"),
            (&config.wss, "listeners.wss.bind"),
        ] {
            if let Some(ws) = ws {
                let path: Arc<str> = ws.path.as_str().into();
                let endpoint = match &ws.tls {
                    Some(tls) => Endpoint::Wss {
                        tls: TlsAcceptor::from(tls.clone()),
                        path,
                    },
                    None => Endpoint::Ws { path },
                };
                extra.push((endpoint, ws.bind, key));
            }
        }
        let mut endpoints = Vec::new();
        for (endpoint, bind, key) in extra {
            let listener = TcpListener::bind(bind)
                .await
                .with_context(|| format!("cannot listen on {bind} ({key})"))?;
            endpoints.push((endpoint.transport(), listener.local_addr()?));
            listeners.push(tokio::spawn(herald_server::serve(
                listener,
                endpoint,
                context.clone(),
                stopped.clone(),
            )));
        }
        if listeners.is_empty() {
            warn!("no listener is configured: no client can connect");
        }
        let mut admin_addr = None;
        if let Some(bind) = config.admin_bind {
            let listener = TcpListener::bind(bind)
                .await
                .with_context(|| format!("cannot listen on {bind} (admin.bind)"))?;
            admin_addr = Some(listener.local_addr()?);
            let state = AdminState {
                router: router.clone(),
                auth: Arc::new(Authenticator::with_registry(
                    config.auth.clone(),
                    registry.clone(),
                )),
                sinks: queues.clone(),
                node_id: config.node_id.clone(),
                max_topic_len: config.server.max_topic_len,
                edge: Some(context.stats.clone()),
                min_token_ttl: config.min_token_ttl,
            };
            // Stopped with the listeners: no admin request starts once shutdown has begun.
            listeners.push(tokio::spawn(herald_admin::serve(
                listener,
                state,
                stopped.clone(),
            )));
        }
        info!(node = %config.node_id, tcp = ?tcp_addr, admin = ?admin_addr, "herald started");
        Ok(Broker {
            tcp_addr,
            endpoints,
            admin_addr,
            router,
            router_task,
            stop_listeners,
            listeners,
            sinks: queues,
            sink_tasks,
        })
    }

    pub fn router(&self) -> &RouterHandle {
        &self.router
    }

    /// The sinks' outbox queues (depth and counters).
    pub fn sinks(&self) -> &[Arc<SinkQueue>] {
        &self.sinks
    }

    /// Stops accepting, closes every channel, makes storage durable, and waits for the end.
    pub async fn shutdown(self) {
        let _ = self.stop_listeners.send(true);
        for listener in self.listeners {
            let _ = listener.await;
        }
        self.router.close_all().await;
        let drained = tokio::time::timeout(SINK_DRAIN, async {
            while self
                .sinks
                .iter()
                .any(|s| s.depth() > 0 && !s.failing.load(Ordering::Relaxed))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if drained.is_err() {
            let waiting: usize = self.sinks.iter().map(|s| s.depth()).sum();
            warn!(
                waiting,
                "sinks did not drain before shutdown; their entries stay in the store"
            );
        }
        self.router.shutdown().await;
        for task in self.sink_tasks {
            task.abort();
        }
        drop(self.router);
        let _ = self.router_task.await;
        info!("herald stopped");
    }
}
