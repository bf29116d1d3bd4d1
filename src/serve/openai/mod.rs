//! `backflow serve`: an OpenAI-compatible HTTP API over the model server, so that any OpenAI
//! client (the `openai` packages, LangChain, curl) can ask a trained model questions.
//!
//! Endpoints: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, with
//! and without `stream` (server-sent events, one per decoded piece of text), and `GET /health`.
//!
//! How a request flows: the HTTP thread accepts it and, unless `max_in_flight` requests are
//! already being answered (then `503` with `Retry-After`, at once), hands it to a thread of its
//! own; that thread sends an [`Ask`] to the [`ModelServer`], which batches it with every other
//! request in flight (up to its `max_batch`, waiting at most its `batch_window`), and waits for
//! the answer, or relays its text as it is generated. Adapter folders are served over their
//! base (one copy of the base for every adapter of it). Shutdown stops accepting, lets every
//! request in flight finish, then stops the model server.
//!
//! Stop strings (`stop`) end the answer where one first appears (the model stops at its own end
//! token; it is not interrupted at a stop string, whose text is cut from the answer).

pub mod types;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use serde::Serialize;
use tiny_http::{Header, Method, Response, StatusCode};

use super::{Ask, GenAnswer, GenError, GenRequest, ModelClient, ModelServer, ServeError};
use crate::model::sampling::Sampling;
use types::{
    ChatChoice, ChatRequest, ChatResponse, CompletionRequest, Delta, ErrorBody, ErrorDetail,
    ModelEntry, ModelList, TextChoice, TextResponse, Usage,
};

/// Largest request body read (a chat of a few hundred thousand characters).
const MAX_BODY: u64 = 16 << 20;

/// Settings of the API server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where to listen (`127.0.0.1:8080`; port 0 picks a free one).
    pub addr: String,
    /// The models served: the id clients name each by, and its checkpoint.
    pub models: Vec<(String, PathBuf)>,
    /// Requests answered at once; more are refused with `503` until one finishes.
    pub max_in_flight: usize,
    /// `max_tokens` of a chat request that does not say.
    pub default_max_tokens: usize,
    /// The model server behind the API (batch size, batch window, precision).
    pub server: super::ServerConfig,
}

/// Why the API server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The model server did not start or a model did not load.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No model to serve, or two with one id.
    #[error("{0}")]
    Config(String),
}

/// Counters of the API (read by tests and printed at shutdown).
#[derive(Debug, Default)]
pub struct ApiStats {
    /// Requests answered with a 2xx status.
    pub answered: AtomicU64,
    /// Requests refused because `max_in_flight` were in flight (503).
    pub refused: AtomicU64,
    /// Requests answered with another error status.
    pub failed: AtomicU64,
}

/// What every request thread shares.
struct Context {
    client: ModelClient,
    models: Vec<(String, u64)>,
    default_max_tokens: usize,
    next_id: AtomicU64,
    stats: Arc<ApiStats>,
}

/// A running API server; [`ApiServer::shutdown`] (or drop) stops it cleanly.
pub struct ApiServer {
    addr: SocketAddr,
    http: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    dispatcher: Option<JoinHandle<()>>,
    stats: Arc<ApiStats>,
}

impl ApiServer {
    /// Starts the model server, loads every model, binds the address and starts answering.
    pub fn start(config: ApiConfig) -> Result<ApiServer, ApiError> {
        if config.models.is_empty() {
            return Err(ApiError::Config("no model to serve".into()));
        }
        for (i, (name, _)) in config.models.iter().enumerate() {
            if config.models[..i].iter().any(|(n, _)| n == name) {
                return Err(ApiError::Config(format!(
                    "two models are named {name:?}: name them apart with NAME=PATH"
                )));
            }
        }
        let server = ModelServer::try_start(config.server.clone())?;
        let created = unix_now();
        for (name, path) in &config.models {
            server.load(name, path)?;
            log::info!("serving {} as {name:?}", path.display());
        }
        let listener = TcpListener::bind(&config.addr).map_err(|source| ApiError::Bind {
            addr: config.addr.clone(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| ApiError::Bind {
            addr: config.addr.clone(),
            source,
        })?;
        let http =
            tiny_http::Server::from_listener(listener, None).map_err(|e| ApiError::Bind {
                addr: config.addr.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let http = Arc::new(http);
        let stats = Arc::new(ApiStats::default());
        let ctx = Arc::new(Context {
            client: server.client()?,
            models: config
                .models
                .iter()
                .map(|(n, _)| (n.clone(), created))
                .collect(),
            default_max_tokens: config.default_max_tokens,
            next_id: AtomicU64::new(1),
            stats: stats.clone(),
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let max_in_flight = config.max_in_flight.max(1);
        let dispatcher = {
            let (http, stopping) = (http.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("http".into())
                .spawn(move || dispatch(&http, &stopping, ctx, server, max_in_flight))
                .map_err(|e| ApiError::Serve(ServeError::Spawn(e)))?
        };
        Ok(ApiServer {
            addr,
            http,
            stopping,
            dispatcher: Some(dispatcher),
            stats,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's counters.
    pub fn stats(&self) -> Arc<ApiStats> {
        self.stats.clone()
    }

    /// Stops accepting requests, waits for those in flight to be answered, then stops the model
    /// server.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Blocks until the server stops (after [`ApiServer::stopper`]'s handle is called).
    pub fn wait(mut self) {
        if let Some(d) = self.dispatcher.take() {
            let _ = d.join();
        }
    }

    /// A handle that asks the server to stop (from a signal handler or another thread).
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let (http, stopping) = (self.http.clone(), self.stopping.clone());
        move || {
            stopping.store(true, Ordering::SeqCst);
            http.unblock();
        }
    }

    fn stop(&mut self) {
        (self.stopper())();
        if let Some(d) = self.dispatcher.take() {
            let _ = d.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Decrements the in-flight count when a request thread ends, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The HTTP thread: accepts requests, refuses those over the bound, runs the rest on threads of
/// their own; at shutdown joins them, then drops the model server.
fn dispatch(
    http: &tiny_http::Server,
    stopping: &AtomicBool,
    ctx: Arc<Context>,
    server: ModelServer,
    max_in_flight: usize,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !stopping.load(Ordering::SeqCst) {
        let request = match http.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("http: {e}");
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        if in_flight.load(Ordering::SeqCst) >= max_in_flight {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            let body = error_body(
                format!("{max_in_flight} requests are being answered; retry shortly"),
                "server_error",
                Some("server_busy"),
            );
            let retry = Header::from_bytes(&b"Retry-After"[..], &b"1"[..]).ok();
            let mut response = json_response(503, &body);
            if let Some(h) = retry {
                response.add_header(h);
            }
            let _ = request.respond(response);
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(in_flight.clone());
        let ctx = ctx.clone();
        match std::thread::Builder::new()
            .name("http-request".into())
            .spawn(move || {
                let _guard = guard;
                handle(request, &ctx);
            }) {
            Ok(t) => threads.push(t),
            Err(e) => log::error!("http: cannot start a request thread: {e}"),
        }
    }
    for t in threads {
        let _ = t.join();
    }
    drop(ctx);
    drop(server);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error_body(message: impl Into<String>, kind: &str, code: Option<&str>) -> ErrorBody {
    ErrorBody {
        error: ErrorDetail {
            message: message.into(),
            kind: kind.into(),
            code: code.map(str::to_string),
        },
    }
}

fn json_response(status: u16, body: &impl Serialize) -> Response<std::io::Cursor<Vec<u8>>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|e| {
        format!(
            r#"{{"error":{{"message":"response not serializable: {e}","type":"server_error"}}}}"#
        )
        .into_bytes()
    });
    let mut r = Response::from_data(bytes).with_status_code(StatusCode(status));
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
        r.add_header(h);
    }
    r
}

/// An answer that is an error: its status and body.
struct Failure(u16, ErrorBody);

impl Failure {
    fn bad(message: impl Into<String>) -> Self {
        Failure(400, error_body(message, "invalid_request_error", None))
    }
}

/// What a request turns out to ask for.
enum Reply {
    /// An answer computed at once.
    Json(serde_json::Value),
    /// A generation.
    Generate(Box<Job>),
}

/// Which API shape a generation answers in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// A generation to run and answer.
struct Job {
    kind: Kind,
    id: String,
    model: String,
    ask: Ask,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

/// Answers one request, counting how.
fn handle(mut request: tiny_http::Request, ctx: &Context) {
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let method = request.method().clone();
    let reply: Result<Reply, Failure> = match (method, path.as_str()) {
        (Method::Get, "/health") => Ok(Reply::Json(serde_json::json!({"status": "ok"}))),
        (Method::Get, "/v1/models") => serde_json::to_value(model_list(ctx))
            .map(Reply::Json)
            .map_err(|e| Failure(500, error_body(e.to_string(), "server_error", None))),
        (Method::Post, "/v1/chat/completions") => read_body(&mut request)
            .and_then(|b| parse::<ChatRequest>(&b))
            .and_then(|r| {
                let messages = r.messages().map_err(Failure::bad)?;
                job(Kind::Chat, &r.sampling, ctx, |ask| ask.messages = messages)
            })
            .map(|j| Reply::Generate(Box::new(j))),
        (Method::Post, "/v1/completions") => read_body(&mut request)
            .and_then(|b| parse::<CompletionRequest>(&b))
            .and_then(|r| {
                let prompt = r.prompt().map_err(Failure::bad)?;
                if prompt.is_empty() {
                    return Err(Failure::bad("`prompt` is empty"));
                }
                job(Kind::Text, &r.sampling, ctx, |ask| {
                    ask.raw_prompt = Some(prompt)
                })
            })
            .map(|j| Reply::Generate(Box::new(j))),
        (_, p) => Err(Failure(
            404,
            error_body(format!("no route {p}"), "invalid_request_error", None),
        )),
    };
    // Counted before the answer goes out, so that a client that has its answer sees it counted
    // (a stream is counted when it ends).
    let count = |ok: bool| {
        let counter = if ok {
            &ctx.stats.answered
        } else {
            &ctx.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    };
    match reply {
        Ok(Reply::Json(v)) => {
            count(true);
            respond(request, json_response(200, &v));
        }
        Ok(Reply::Generate(job)) if job.stream => count(stream(request, *job, ctx)),
        Ok(Reply::Generate(job)) => match generate(&job, ctx, None) {
            Ok(answer) => {
                count(true);
                respond(request, json_response(200, &whole_answer(&job, &answer)));
            }
            Err(Failure(status, body)) => {
                count(false);
                respond(request, json_response(status, &body));
            }
        },
        Err(Failure(status, body)) => {
            count(false);
            respond(request, json_response(status, &body));
        }
    }
}

/// Sends a response; a client that went away is logged, not an error of the server.
fn respond(request: tiny_http::Request, response: Response<std::io::Cursor<Vec<u8>>>) {
    if let Err(e) = request.respond(response) {
        log::debug!("http: the client went away: {e}");
    }
}

/// The job of a chat or completions request: model, length and sampling checked.
fn job(
    kind: Kind,
    s: &types::Sampling,
    ctx: &Context,
    fill: impl FnOnce(&mut Ask),
) -> Result<Job, Failure> {
    let model = match (&s.model, ctx.models.as_slice()) {
        (Some(name), models) if models.iter().any(|(n, _)| n == name) => name.clone(),
        // One model served: any name (or none) means it, as llama.cpp's server does.
        (_, [(only, _)]) => only.clone(),
        (name, models) => {
            let known: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Failure(
                404,
                error_body(
                    format!("model {name:?} is not served; served: {}", known.join(", ")),
                    "invalid_request_error",
                    Some("model_not_found"),
                ),
            ));
        }
    };
    if s.n.is_some_and(|n| n != 1) {
        return Err(Failure::bad(
            "only n = 1 is served (send several requests: they are batched together)",
        ));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(Failure::bad(format!(
            "temperature {temperature} is outside [0, 2]"
        )));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Failure::bad(format!("top_p {top_p} is outside (0, 1]")));
    }
    // The API's defaults: 16 tokens for completions; chat until the model stops (bounded here).
    let max_tokens = s.max_tokens.unwrap_or(match kind {
        Kind::Chat => ctx.default_max_tokens,
        Kind::Text => 16,
    });
    if max_tokens == 0 {
        return Err(Failure::bad("max_tokens must be at least 1"));
    }
    let n = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    // Without a seed each request samples on its own; with one, the same request gives the same
    // answer.
    let seed = s.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let mut ask = Ask {
        model: model.clone(),
        messages: Vec::new(),
        raw_prompt: None,
        max_new_tokens: max_tokens,
        sampling: Sampling {
            temperature,
            top_p,
            seed,
        },
        choose: None,
        choose_after: None,
    };
    fill(&mut ask);
    Ok(Job {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{n}"),
            Kind::Text => format!("cmpl-{n}"),
        },
        model,
        ask,
        stop: s
            .stop
            .as_ref()
            .map(types::Stop::strings)
            .unwrap_or_default(),
        stream: s.stream,
        include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// Sends the job to the model server and waits for its answer (relaying text to `pieces` as it
/// is generated when given).
fn generate(
    job: &Job,
    ctx: &Context,
    pieces: Option<Sender<String>>,
) -> Result<GenAnswer, Failure> {
    let (reply, answer) = crossbeam_channel::bounded(1);
    let server_gone = || {
        Failure(
            503,
            error_body("the model server has stopped", "server_error", None),
        )
    };
    ctx.client
        .send(GenRequest {
            ticket: 0,
            ask: job.ask.clone(),
            reply,
            wake: None,
            stream: pieces,
        })
        .map_err(|_| server_gone())?;
    let answer = answer.recv().map_err(|_| server_gone())?;
    match &answer.result {
        Ok(_) => Ok(answer),
        Err(e @ GenError::NotLoaded(_)) => Err(Failure(
            404,
            error_body(
                e.to_string(),
                "invalid_request_error",
                Some("model_not_found"),
            ),
        )),
        Err(e @ (GenError::BadChoice(_) | GenError::NoOption)) => Err(Failure::bad(e.to_string())),
        Err(e) => Err(Failure(
            500,
            error_body(e.to_string(), "server_error", None),
        )),
    }
}

/// Where the first stop string starts in `text`, if one does.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

fn usage(answer: &GenAnswer) -> Usage {
    Usage {
        prompt_tokens: answer.prompt_tokens,
        completion_tokens: answer.new_tokens,
        total_tokens: answer.prompt_tokens + answer.new_tokens,
    }
}

/// `length` when the answer used every token it was allowed, else `stop`.
fn finish_reason(job: &Job, answer: &GenAnswer, cut: bool) -> String {
    if !cut && answer.new_tokens >= job.ask.max_new_tokens {
        "length".into()
    } else {
        "stop".into()
    }
}

/// The body of a whole (non-streamed) answer.
fn whole_answer(job: &Job, answer: &GenAnswer) -> serde_json::Value {
    let mut text = answer.result.clone().unwrap_or_default();
    let cut = first_stop(&text, &job.stop);
    if let Some(at) = cut {
        text.truncate(at);
    }
    let finish = Some(finish_reason(job, answer, cut.is_some()));
    body(job, false, Some(text), true, finish, Some(usage(answer)))
}

/// One event of a stream: new `text` and/or the finish reason.
fn chunk(
    job: &Job,
    text: Option<String>,
    first: bool,
    finish: Option<String>,
) -> serde_json::Value {
    body(job, true, text, first, finish, None)
}

/// A body in `job`'s API shape: a whole answer (`message`), or an event of a stream (`delta`,
/// the assistant's role on the first only).
fn body(
    job: &Job,
    streamed: bool,
    text: Option<String>,
    with_role: bool,
    finish: Option<String>,
    usage: Option<Usage>,
) -> serde_json::Value {
    let (id, model, created) = (job.id.clone(), job.model.clone(), unix_now());
    let value = match job.kind {
        Kind::Chat => {
            let said = Delta {
                role: with_role.then(|| "assistant".to_string()),
                content: text,
            };
            let (message, delta) = if streamed {
                (None, Some(said))
            } else {
                (Some(said), None)
            };
            let object = if streamed {
                "chat.completion.chunk"
            } else {
                "chat.completion"
            };
            serde_json::to_value(ChatResponse {
                id,
                object: object.into(),
                created,
                model,
                choices: vec![ChatChoice {
                    index: 0,
                    message,
                    delta,
                    finish_reason: finish,
                }],
                usage,
            })
        }
        Kind::Text => serde_json::to_value(TextResponse {
            id,
            object: "text_completion".into(),
            created,
            model,
            choices: vec![TextChoice {
                index: 0,
                text: text.unwrap_or_default(),
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        }),
    };
    value.unwrap_or_else(|e| serde_json::json!({"error": {"message": e.to_string()}}))
}

/// The usage-only last chunk of a stream (`stream_options.include_usage`).
fn usage_chunk(job: &Job, answer: &GenAnswer) -> serde_json::Value {
    let mut v = chunk(job, None, false, None);
    v["choices"] = serde_json::json!([]);
    v["usage"] = serde_json::to_value(usage(answer)).unwrap_or_default();
    v
}

/// Text held back from a stream until it cannot be the start of a stop string.
struct StopFilter {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopFilter {
    /// Adds generated text; returns what may be sent now.
    fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        if let Some(at) = first_stop(&self.held, &self.stops) {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Keep the longest tail that a stop string starts with.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k))
                    .filter(|&k| self.held.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let out = self.held[..split].to_string();
        self.held.drain(..split);
        out
    }

    /// The end of the answer: whatever is still held.
    fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }
}

/// Answers a `stream: true` request as server-sent events, one per piece of text as the model
/// server generates it, then the finish reason (and usage when asked), then `[DONE]`. The
/// connection closes after the stream (`Connection: close`), which ends the body.
fn stream(request: tiny_http::Request, job: Job, ctx: &Context) -> bool {
    let (pieces_tx, pieces) = crossbeam_channel::unbounded::<String>();
    // The generation runs on a thread of its own so that pieces can be relayed as they come.
    let answer = std::thread::scope(|scope| {
        let gen = scope.spawn(|| generate(&job, ctx, Some(pieces_tx)));
        let mut writer = request.into_writer();
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
        let mut alive = writer.write_all(head.as_bytes()).is_ok();
        let mut send = |writer: &mut Box<dyn Write + Send>, v: &serde_json::Value| {
            if alive {
                let event = format!("data: {v}\n\n");
                alive = writer.write_all(event.as_bytes()).is_ok() && writer.flush().is_ok();
            }
        };
        let mut filter = StopFilter {
            stops: job.stop.clone(),
            held: String::new(),
            stopped: false,
        };
        let mut sent = String::new();
        let mut first = true;
        if job.kind == Kind::Chat {
            send(&mut writer, &chunk(&job, Some(String::new()), true, None));
            first = false;
        }
        // Every piece until the generation ends (the sender is dropped with the request).
        for piece in pieces.iter() {
            sent.push_str(&piece);
            let out = filter.push(&piece);
            if !out.is_empty() {
                send(&mut writer, &chunk(&job, Some(out), first, None));
                first = false;
            }
        }
        let answer = gen.join().unwrap_or_else(|_| {
            Err(Failure(
                500,
                error_body("the request thread failed", "server_error", None),
            ))
        });
        match &answer {
            Ok(a) => {
                // An answer from the cache was not streamed: it comes whole here.
                let full = a.result.clone().unwrap_or_default();
                let rest = full.strip_prefix(sent.as_str()).unwrap_or_else(|| {
                    log::warn!("stream {}: the answer differs from the pieces sent", job.id);
                    ""
                });
                let mut out = filter.push(rest);
                out.push_str(&filter.finish());
                if !out.is_empty() {
                    send(&mut writer, &chunk(&job, Some(out), first, None));
                }
                let finish = finish_reason(&job, a, filter.stopped);
                send(&mut writer, &chunk(&job, None, false, Some(finish)));
                if job.include_usage {
                    send(&mut writer, &usage_chunk(&job, a));
                }
            }
            Err(Failure(_, body)) => {
                send(&mut writer, &serde_json::to_value(body).unwrap_or_default());
            }
        }
        if alive {
            alive = writer.write_all(b"data: [DONE]\n\n").is_ok() && writer.flush().is_ok();
        }
        answer.is_ok() && alive
    });
    answer
}

fn model_list(ctx: &Context) -> ModelList {
    ModelList {
        object: "list".into(),
        data: ctx
            .models
            .iter()
            .map(|(id, created)| ModelEntry {
                id: id.clone(),
                object: "model".into(),
                created: *created,
                owned_by: "backflow".into(),
            })
            .collect(),
    }
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| Failure::bad(format!("reading the body: {e}")))?;
    if body.len() as u64 > MAX_BODY {
        return Err(Failure(
            413,
            error_body(
                format!("the body is over {MAX_BODY} bytes"),
                "invalid_request_error",
                None,
            ),
        ));
    }
    Ok(body)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure::bad(format!("bad JSON body: {e}")))
}

#[cfg(test)]
mod tests;
