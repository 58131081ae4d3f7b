//! `stevedore serve`: an OpenAI-compatible HTTP server (tokio + axum) in front of one
//! [`Engine`]. Every request's choices join the engine's continuous batch, so concurrent clients
//! share expert reads; a client that goes away cancels its sequences (their KV blocks are freed
//! before the next step); a bounded queue answers 429 when full, and 503 while shutting down.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus text). Request handling
//! (parsing, checks, templates, bodies) lives in [`crate::api`], shared with batch jobs; this
//! module is the HTTP around it. See `docs/server.md`.

mod handlers;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;

use crate::api::request::ApiModel;
use crate::api::ApiError;
use crate::commands::engine_args::EngineArgs;
use crate::commands::CliError;
use crate::engine::Engine;
use metrics::Metrics;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Positions per sequence the default KV cache is sized for (with `--max-batch` sequences).
pub const DEFAULT_KV_POSITIONS: usize = 4096;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on. Without an API key, keep the loopback default: anyone who can reach
    /// the port can use the model.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (also
    /// `STEVEDORE_API_KEY`).
    #[arg(long, env = "STEVEDORE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model's name in requests and /v1/models (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Sequences that may wait for a batch slot beyond the running batch; past it requests get
    /// 429 with Retry-After (default: 4 x --max-batch).
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// On SIGTERM or Ctrl-C, seconds to let running requests finish before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
}

/// What every handler shares.
pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    /// The model's name, chat template and sampling defaults.
    pub api: ApiModel,
    pub metrics: Metrics,
    pub api_key: Option<String>,
    /// Sequences accepted and not finished, and the most allowed.
    pub in_flight: AtomicUsize,
    pub max_in_flight: usize,
    pub max_batch: usize,
    pub draining: AtomicBool,
    pub created: u64,
}

impl AppState {
    /// Takes `n` sequence slots, or says why not (429 full, 503 shutting down).
    pub fn admit(self: &Arc<Self>, n: usize) -> Result<Slots, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                503,
                "server_error",
                Some("shutting_down"),
                "the server is shutting down",
            ));
        }
        let mut cur = self.in_flight.load(Ordering::SeqCst);
        loop {
            if cur + n > self.max_in_flight {
                return Err(ApiError::new(
                    429,
                    "rate_limit_error",
                    Some("queue_full"),
                    format!(
                        "the server is at capacity ({cur} sequences running or queued, at most {}); retry shortly",
                        self.max_in_flight
                    ),
                ));
            }
            match self.in_flight.compare_exchange(cur, cur + n, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.metrics.in_flight.set(self.in_flight.load(Ordering::SeqCst) as i64);
        Ok(Slots { state: Arc::clone(self), n })
    }
}

/// Sequence slots held by a request; given back when dropped.
pub(crate) struct Slots {
    state: Arc<AppState>,
    n: usize,
}

impl Drop for Slots {
    fn drop(&mut self) {
        let now = self.state.in_flight.fetch_sub(self.n, Ordering::SeqCst) - self.n;
        self.state.metrics.in_flight.set(now as i64);
    }
}

/// An [`ApiError`] as an HTTP response (with Retry-After on 429 and 503).
pub(crate) fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(e.body())).into_response();
    if e.status == 429 || e.status == 503 {
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

/// Checks `Authorization: Bearer` against the key (all routes but /health).
async fn auth(State(state): State<Arc<AppState>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            let e = ApiError::new(
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
                "a valid API key is required: send `Authorization: Bearer <key>`",
            );
            state.metrics.count_request(req.uri().path(), 401);
            return error_response(&e);
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The router over `state` (also what the tests drive).
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{id}", get(handlers::model))
        .route("/metrics", get(handlers::metrics))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), auth));
    Router::new()
        .route("/health", get(handlers::health))
        .merge(api)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

pub fn run(args: &ServeArgs) -> Result<(), CliError> {
    let settings = args.engine.settings()?;
    let dir = &args.engine.model;
    let loaded = settings.load()?;
    let api = ApiModel::load(dir, args.chat_template.as_deref(), args.served_model_name.clone())?;
    let kv_cache = settings.kv_cache.unwrap_or_else(|| {
        let per_seq = loaded.model().config.max_positions().min(DEFAULT_KV_POSITIONS);
        settings.default_kv(loaded.kv_bytes_for(std::iter::repeat_n(per_seq, settings.resident())))
    });
    let max_batch = settings.max_batch;
    let engine = Arc::new(settings.start(loaded, kv_cache)?);
    let state = Arc::new(AppState {
        metrics: Metrics::new(Arc::clone(&engine)),
        engine: Arc::clone(&engine),
        api,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        in_flight: AtomicUsize::new(0),
        max_in_flight: max_batch + args.max_queue.unwrap_or(4 * max_batch),
        max_batch,
        draining: AtomicBool::new(false),
        created: crate::api::response::unix_now(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("stevedore-http")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    runtime.block_on(serve(args, state))?;
    drop(runtime);
    if let Ok(engine) = Arc::try_unwrap(engine) {
        engine.finish()?;
    }
    Ok(())
}

async fn serve(args: &ServeArgs, state: Arc<AppState>) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let s = &state;
    match (&s.api_key, addr.ip().is_loopback()) {
        (Some(_), _) => eprintln!("API key required (Authorization: Bearer)"),
        (None, true) => eprintln!("no API key: listening on loopback only (give --host to listen elsewhere)"),
        (None, false) => eprintln!(
            "warning: no API key and listening on {}: anyone who can reach this port can use the model \
             (give --api-key or STEVEDORE_API_KEY)",
            addr.ip()
        ),
    }
    // Last: the line that says the server is ready (tests and scripts wait for it).
    eprintln!(
        "serving {} on http://{addr} (max batch {}, up to {} sequences in flight, KV cache {} holding {} positions)",
        s.api.name,
        s.max_batch,
        s.max_in_flight,
        crate::size::human(s.engine.budgets().kv_cache),
        s.engine.kv_positions(),
    );
    let app = router(Arc::clone(&state));
    let timeout = Duration::from_secs(args.shutdown_timeout);
    let drain = Arc::clone(&state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            drain.draining.store(true, Ordering::SeqCst);
            let running = drain.in_flight.load(Ordering::SeqCst);
            tracing::warn!(running, "shutting down: no new requests; running ones get {timeout:?} to finish");
            eprintln!("shutting down: {running} sequences still running, waiting up to {timeout:?}");
            // After the grace period, the engine stops: what still runs fails and its
            // connections close, which lets the server finish.
            let engine = Arc::clone(&drain.engine);
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                engine.stop_soon();
            });
        })
        .await
        .map_err(|e| format!("server error: {e}"))?;
    eprintln!("server stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
