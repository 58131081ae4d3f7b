//! The endpoints. A generation request is checked ([`crate::api::request`]), takes sequence
//! slots (or gets 429/503), submits one engine request per choice, and then either collects the
//! choices into one body or streams them as server-sent events. Each choice's events arrive on
//! its own channel from the engine thread; dropping the response (a client gone mid-stream)
//! drops the choices' handles, which cancels their sequences.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::{error_response, AppState, Slots, MAX_BODY_BYTES};
use crate::api::choice::ChoiceState;
use crate::api::request::{prepare_chat, prepare_completion, Endpoint, Prepared};
use crate::api::response::{ChoiceResult, Delta, Meta, Usage};
use crate::api::ApiError;
use crate::engine::{EngineError, Event, RequestHandle};

type St = State<Arc<AppState>>;

pub(crate) async fn chat(State(st): St, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    generate(st, Endpoint::Chat, headers, body).await
}

pub(crate) async fn completions(
    State(st): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(st, Endpoint::Completions, headers, body).await
}

fn path_of(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
    }
}

/// The body, if it is JSON and within the limit.
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ctype.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            415,
            "invalid_request_error",
            Some("unsupported_media_type"),
            format!("unsupported content type {ctype:?}: this endpoint takes application/json"),
        ));
    }
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                413,
                "invalid_request_error",
                Some("request_too_large"),
                format!("the request body is over the limit of {} MiB", MAX_BODY_BYTES >> 20),
            )
        } else {
            ApiError::invalid(None, format!("cannot read the request body: {}", r.body_text()))
        }
    })
}

fn prepare(st: &AppState, endpoint: Endpoint, body: &[u8]) -> Result<Prepared, ApiError> {
    let info = st.api.info(st.engine.model(), st.engine.text(), st.engine.kv_positions());
    match endpoint {
        Endpoint::Chat => prepare_chat(body, &info),
        Endpoint::Completions => prepare_completion(body, &info),
    }
}

/// Counts and logs a refused request; its error response.
fn refuse(st: &AppState, endpoint: Endpoint, e: &ApiError) -> Response {
    st.metrics.count_request(path_of(endpoint), e.status);
    tracing::info!(endpoint = path_of(endpoint), status = e.status, error = %e.message, "request refused");
    error_response(e)
}

async fn generate(
    st: Arc<AppState>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let prepared = match json_body(&headers, body).and_then(|b| prepare(&st, endpoint, &b)) {
        Ok(p) => p,
        Err(e) => return refuse(&st, endpoint, &e),
    };
    let requests = prepared.requests();
    let slots = match st.admit(requests.len()) {
        Ok(s) => s,
        Err(e) => return refuse(&st, endpoint, &e),
    };
    let meta = Meta::new(endpoint, &prepared.model);
    let mut choices = Vec::with_capacity(requests.len());
    for (index, req) in requests.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let handle = match st.engine.submit_with(req, move |e| tx.send(e).is_ok()) {
            Ok(h) => h,
            Err(e) => {
                let e = match e {
                    EngineError::Request(msg) => ApiError::invalid(None, msg),
                    EngineError::Stopped => {
                        ApiError::new(503, "server_error", None, "the engine has stopped")
                    }
                    other => ApiError::server(other.to_string()),
                };
                return refuse(&st, endpoint, &e);
            }
        };
        choices.push(Choice::new(index, handle, rx, &prepared.stop, arrived, Arc::clone(&st)));
    }
    st.metrics.prompt_tokens.inc_by(prepared.prompt_tokens() as u64);
    let tracker = Arc::new(Tracker {
        st: Arc::clone(&st),
        path: path_of(endpoint),
        id: meta.id.clone(),
        arrived,
        prompt_tokens: prepared.prompt_tokens(),
        tokens: AtomicUsize::new(0),
        first_token: Mutex::new(None),
        failure: Mutex::new(None),
        done: AtomicBool::new(false),
        _slots: slots,
    });
    if prepared.stream {
        stream_response(prepared, meta, choices, tracker).into_response()
    } else {
        full_response(prepared, meta, choices, tracker).await
    }
}

/// A request from arrival to its last token: what its log line and metrics say. Dropped before
/// [`Tracker::complete`] means the client went away.
struct Tracker {
    st: Arc<AppState>,
    path: &'static str,
    id: String,
    arrived: Instant,
    prompt_tokens: usize,
    tokens: AtomicUsize,
    first_token: Mutex<Option<Instant>>,
    failure: Mutex<Option<String>>,
    done: AtomicBool,
    _slots: Slots,
}

impl Tracker {
    fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.prompt_tokens, completion_tokens: self.tokens.load(Ordering::SeqCst) }
    }

    fn choice_ended(&self, c: &Choice, failure: Option<&str>) {
        self.tokens.fetch_add(c.tokens, Ordering::SeqCst);
        if let Some(first) = c.first {
            let mut f = self.first_token.lock().unwrap_or_else(|e| e.into_inner());
            *f = Some(f.map_or(first, |t| t.min(first)));
        }
        if let Some(msg) = failure {
            self.failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| msg.to_owned());
        }
    }

    fn complete(&self, status: u16) {
        self.done.store(true, Ordering::SeqCst);
        let m = &self.st.metrics;
        m.count_request(self.path, status);
        m.request_duration.observe(self.arrived.elapsed().as_secs_f64());
        self.log(status, "request done");
    }

    fn log(&self, status: u16, what: &str) {
        let first = *self.first_token.lock().unwrap_or_else(|e| e.into_inner());
        let failure = self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone();
        tracing::info!(
            id = %self.id,
            endpoint = self.path,
            status,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.tokens.load(Ordering::SeqCst),
            ttft_ms = first.map(|t| (t - self.arrived).as_secs_f64() * 1e3),
            duration_ms = self.arrived.elapsed().as_secs_f64() * 1e3,
            error = failure.as_deref(),
            "{what}"
        );
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done.load(Ordering::SeqCst) {
            self.st.metrics.disconnects.inc();
            // 499: nginx's "client closed request".
            self.st.metrics.count_request(self.path, 499);
            self.log(499, "client went away; its sequences are cancelled");
        }
    }
}

/// What a choice yields.
enum Piece {
    Text(String),
    End(&'static str),
    Failed(String),
}

/// One sequence of a request, as its events arrive.
struct Choice {
    index: usize,
    /// Dropping it cancels the sequence.
    handle: RequestHandle,
    rx: UnboundedReceiver<Event>,
    state: ChoiceState,
    tokens: usize,
    arrived: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    queued: VecDeque<Piece>,
    st: Arc<AppState>,
}

impl Choice {
    fn new(
        index: usize,
        handle: RequestHandle,
        rx: UnboundedReceiver<Event>,
        stops: &[String],
        arrived: Instant,
        st: Arc<AppState>,
    ) -> Self {
        Choice {
            index,
            handle,
            rx,
            state: ChoiceState::new(stops),
            tokens: 0,
            arrived,
            first: None,
            last: None,
            queued: VecDeque::new(),
            st,
        }
    }

    /// The next piece of output; `None` after the end.
    async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(p) = self.queued.pop_front() {
                return Some(p);
            }
            if self.state.ended() {
                return None;
            }
            let u = self.state.apply(self.rx.recv().await);
            self.tokens = self.state.tokens;
            if u.token {
                let now = Instant::now();
                let m = &self.st.metrics;
                match self.last {
                    None => {
                        m.time_to_first_token.observe((now - self.arrived).as_secs_f64());
                        self.first = Some(now);
                    }
                    Some(t) => m.inter_token_latency.observe((now - t).as_secs_f64()),
                }
                self.last = Some(now);
                m.generated_tokens.inc();
            }
            if u.cancel {
                // The rest is not wanted: the sequence leaves the batch now.
                self.handle.cancel();
            }
            if !u.text.is_empty() {
                self.queued.push_back(Piece::Text(u.text));
            }
            match u.end {
                Some(Ok(reason)) => self.queued.push_back(Piece::End(reason)),
                Some(Err(msg)) => self.queued.push_back(Piece::Failed(msg)),
                None => {}
            }
        }
    }

    /// All of it: the text and the finish reason, or the failure.
    async fn collect(&mut self) -> Result<(String, &'static str), String> {
        let mut text = String::new();
        while let Some(p) = self.next().await {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::End(reason) => return Ok((text, reason)),
                Piece::Failed(msg) => return Err(msg),
            }
        }
        Err("the sequence ended without a result".into())
    }
}

async fn full_response(p: Prepared, meta: Meta, mut choices: Vec<Choice>, tracker: Arc<Tracker>) -> Response {
    let results = futures_util::future::join_all(choices.iter_mut().map(Choice::collect)).await;
    let mut out = Vec::with_capacity(results.len());
    for (c, r) in choices.iter().zip(results) {
        match r {
            Ok((text, finish_reason)) => {
                tracker.choice_ended(c, None);
                let echo = &p.echo[c.index / p.n];
                out.push(ChoiceResult { index: c.index, text: format!("{echo}{text}"), finish_reason });
            }
            Err(msg) => {
                tracker.choice_ended(c, Some(&msg));
                let e = ApiError::server(format!("generation failed: {msg}"));
                tracker.complete(500);
                return error_response(&e);
            }
        }
    }
    tracker.complete(200);
    Json(meta.body(&out, tracker.usage())).into_response()
}

fn sse(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn stream_response(
    p: Prepared,
    meta: Meta,
    choices: Vec<Choice>,
    tracker: Arc<Tracker>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let meta = Arc::new(meta);
    let usage = p.include_usage;
    let per_choice = choices.into_iter().map(|c| {
        let meta = Arc::clone(&meta);
        let tracker = Arc::clone(&tracker);
        let echo = p.echo[c.index / p.n].clone();
        // First the role (chat) or the echoed prompt (completions), then the pieces.
        let head = match meta.endpoint {
            Endpoint::Chat => Some(meta.chunk(c.index, Delta::Role, usage)),
            Endpoint::Completions if !echo.is_empty() => Some(meta.chunk(c.index, Delta::Text(&echo), usage)),
            Endpoint::Completions => None,
        };
        let body = stream::unfold(Some(c), move |state| {
            let meta = Arc::clone(&meta);
            let tracker = Arc::clone(&tracker);
            async move {
                let mut c = state?;
                let v = match c.next().await? {
                    Piece::Text(t) => meta.chunk(c.index, Delta::Text(&t), usage),
                    Piece::End(reason) => {
                        tracker.choice_ended(&c, None);
                        return Some((sse(&meta.chunk(c.index, Delta::Finish(reason), usage)), None));
                    }
                    Piece::Failed(msg) => {
                        tracker.choice_ended(&c, Some(&msg));
                        let e = ApiError::server(format!("generation failed: {msg}"));
                        return Some((sse(&e.body()), None));
                    }
                };
                Some((sse(&v), Some(c)))
            }
        });
        stream::iter(head.map(|h| sse(&h))).chain(body).boxed()
    });
    let per_choice: Vec<_> = per_choice.collect();
    let tail_tracker = Arc::clone(&tracker);
    let tail = stream::once(async move {
        tail_tracker.complete(200);
        usage.then(|| sse(&meta.usage_chunk(tail_tracker.usage())))
    })
    .filter_map(|x| async move { x })
    .chain(stream::once(async { Ok(SseEvent::default().data("[DONE]")) }));
    drop(tracker);
    Sse::new(stream::select_all(per_choice).chain(tail)).keep_alive(KeepAlive::default())
}

pub(crate) async fn models(State(st): St) -> Response {
    Json(json!({"object": "list", "data": [model_card(&st)]})).into_response()
}

pub(crate) async fn model(State(st): St, Path(id): Path<String>) -> Response {
    if id == st.api.name {
        Json(model_card(&st)).into_response()
    } else {
        error_response(&ApiError::model_not_found(&id, &st.api.name))
    }
}

fn model_card(st: &AppState) -> Value {
    json!({
        "id": st.api.name,
        "object": "model",
        "created": st.created,
        "owned_by": "stevedore",
        "max_model_len": st.engine.model().config.max_positions(),
    })
}

pub(crate) async fn health(State(st): St) -> Response {
    if st.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting down"}))).into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

pub(crate) async fn metrics(State(st): St) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.render())
        .into_response()
}

pub(crate) async fn not_found(uri: axum::http::Uri) -> Response {
    let e = ApiError::new(
        404,
        "invalid_request_error",
        Some("not_found"),
        format!("no such endpoint: {}", uri.path()),
    );
    error_response(&e)
}

pub(crate) async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let e = ApiError::new(
        405,
        "invalid_request_error",
        Some("method_not_allowed"),
        format!("{method} is not allowed on {}", uri.path()),
    );
    error_response(&e)
}
