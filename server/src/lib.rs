//! The `algolink` server: the only crate with network IO. It wires the registry and the engine
//! behind the Open Inference Protocol v2, the management API and `/metrics`.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod fuzzing;
pub mod lifecycle;
pub mod metrics;
pub mod oip;
mod replicas;
pub mod state;
pub mod ui;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;

use algolink_registry::Registry;
use tokio::net::TcpListener;

pub use config::Config;
pub use state::AppState;

/// A server listening on a socket, running until `shutdown` is triggered.
pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, and waits for the server to end.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// Opens the registry, loads the models, binds `config.server.http` and serves.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let registry = Registry::connect(&config.server.data_dir, &config.registry.backends()).await?;
    let listener = TcpListener::bind(&config.server.http)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", config.server.http))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState::new(config, registry));
    crate::auth::bootstrap_owner(&state, &state.config.owner_token_file()).await?;
    state.start().await?;
    let app = api::router(state.clone());
    let (tx, rx) = tokio::sync::watch::channel(false);
    for hook in state.config.webhooks.clone() {
        tokio::spawn(webhooks::run(state.clone(), hook, rx.clone()));
    }
    tokio::spawn(controller(state.clone(), rx.clone()));
    let mut stop = rx;
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|&s| s).await;
            })
            .await
    });
    let auth = if state.auth.enabled { "on: requests need a bearer token" } else { "off" };
    tracing::info!("listening on http://{addr}; auth {auth}");
    Ok(Running { addr, state, shutdown: tx, task })
}

/// Runs a controller pass (sync with other replicas, lifecycle decisions) every
/// `lifecycle_interval_ms` until shutdown.
async fn controller(state: Arc<AppState>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(state.config.server.lifecycle_interval_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => state.controller_pass().await,
            _ = shutdown.changed() => return,
        }
    }
}
