//! `orchestrate serve`: the project over HTTP — a versioned JSON API (`/api/v1/…`), the mirror's
//! events as server-sent events, and Prometheus metrics (`/metrics`).
//!
//! It reads what the CLI reads ([`Project`], the mirror's read API, the one event feed) and acts only
//! through the same [`Project`] writes (a task file into `pending/`, a cancel request, a retry), so
//! it never needs a running supervisor and never reaches into the loop. Every body it sends passes
//! the project's redactor first. It never prints: the caller says where it listens.
//!
//! Access: without a token it binds loopback only; with one (given, or generated and shown once,
//! stored as a SHA-256 hash in the state directory) every request needs it, as a bearer header or
//! the cookie that opening `/?token=…` sets. `--read-only` refuses every write. The MCP server, when
//! the caller mounts it at `/mcp`, sits behind the same check.

mod api;
mod auth;
mod metrics;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::error::UsageError;
use crate::project::Project;

/// How the server was asked to run.
pub struct Options {
    /// `HOST:PORT`; port 0 picks a free one.
    pub listen: String,
    /// The token every request must carry.
    pub token: Option<String>,
    /// Make up a token (printed once) when none is given.
    pub generate_token: bool,
    pub read_only: bool,
    /// Read from this PostgreSQL mirror alone (read-only: writes act on a folder).
    pub database_url: Option<String>,
}

/// A server bound to its address, not yet answering.
pub struct Bound {
    listener: TcpListener,
    state: Arc<State>,
    /// The token made up for this run, to show once.
    pub generated_token: Option<String>,
    /// What answers at `/mcp` (the MCP server over streamable HTTP), when the caller mounted it.
    mcp: Option<axum::Router>,
}

pub(crate) struct State {
    pub project: Project,
    pub database_url: Option<String>,
    pub token_hash: Option<[u8; 32]>,
    pub read_only: bool,
    pub redactor: crate::redact::Redactor,
    pub transitions: Mutex<metrics::Transitions>,
}

/// Bind the address, refusing a non-loopback one without a token.
pub fn bind(project: Project, opts: Options) -> Result<Bound> {
    let addr: SocketAddr = opts.listen.parse().map_err(|e| {
        UsageError(format!(
            "--listen {}: not an address and port like 127.0.0.1:7777 ({e})",
            opts.listen
        ))
    })?;
    let generated_token = match (&opts.token, opts.generate_token) {
        (None, true) => Some(auth::new_token()?),
        _ => None,
    };
    let token = opts.token.clone().or_else(|| generated_token.clone());
    if token.as_deref().is_some_and(str::is_empty) {
        return Err(UsageError("--token must not be empty".into()).into());
    }
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(UsageError(format!(
            "--listen {addr} is not a loopback address: give --token TOKEN or --generate-token, so that \
             only those who hold it get in"
        ))
        .into());
    }
    let token_hash = token.as_deref().map(auth::hash);
    if let Some(h) = &token_hash {
        auth::store_hash(&project.layout.state_dir, h)?;
    }
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let redactor = project.cfg.redactor();
    Ok(Bound {
        listener,
        generated_token,
        mcp: None,
        state: Arc::new(State {
            project,
            database_url: opts.database_url,
            token_hash,
            read_only: opts.read_only,
            redactor,
            transitions: Mutex::new(metrics::Transitions::default()),
        }),
    })
}

impl Bound {
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Whether writes are refused (`--read-only`).
    pub fn read_only(&self) -> bool {
        self.state.read_only
    }

    /// Whether every request must carry a token.
    pub fn has_token(&self) -> bool {
        self.state.token_hash.is_some()
    }

    /// Answer at `/mcp` with `router` (the caller builds it: the MCP server is another surface),
    /// behind the same token check as everything else. It answers every MCP message with a POST,
    /// so on a read-only server it must leave out its writes itself.
    pub fn mount_mcp(&mut self, router: axum::Router) {
        self.mcp = Some(router);
    }

    /// Answer requests until the process gets SIGINT or SIGTERM.
    pub fn run(self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(self.listener)?;
            let app = api::router(self.state, self.mcp);
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown())
                .await?;
            Ok::<_, anyhow::Error>(())
        })?;
        // Event streams end with the runtime; their blocking readers notice at their next event.
        rt.shutdown_timeout(std::time::Duration::from_secs(1));
        Ok(())
    }
}

/// `{"error": message}` with a status.
pub(crate) fn error_response(
    status: axum::http::StatusCode,
    message: &str,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
