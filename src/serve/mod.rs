//! `ferry serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the engine
//! loop ([`engine`]), which batches every waiting request into each pass.
//!
//! The HTTP side parses and checks requests ([`api`]), encodes prompts, and hands each to
//! the engine over a bounded queue (429 when full); the engine thread owns the model. Image
//! requests go to the image worker ([`images`]) over a queue of their own: one image job at a
//! time, on its own thread, beside the text batch. A server may have either model or both.

pub mod api;
pub mod engine;
pub mod images;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;
use tokio::sync::oneshot;

use crate::generate::{Finish, Message, Request, SamplingConfig, TextCodec};
use api::{ApiError, Ask, Endpoint};
use engine::{Event, Job, Metrics};
use images::ImageJob;

/// What the HTTP side needs to know and share.
pub struct ServerConfig {
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// Longest a request may take, queue included.
    pub request_timeout: Duration,
    /// Longest a connection may take to send a request's head (method, path, headers), from
    /// when it opens or its previous answer went out; then it is closed.
    pub header_timeout: Duration,
    /// Longest a request's body may take to arrive once its head has; then 408, and the
    /// connection is closed.
    pub body_timeout: Duration,
    /// After SIGINT/SIGTERM: how long in-flight requests may go on before they are cancelled.
    pub shutdown_grace: Duration,
}

/// The text model the server fronts: its id, a codec to encode prompts while the engine
/// runs, and the engine's queue.
pub struct TextModel {
    /// The id /v1/models lists and requests name.
    pub id: String,
    pub codec: TextCodec,
    pub jobs: SyncSender<Job>,
    pub context: usize,
    /// max_tokens when a request gives none.
    pub default_max_tokens: usize,
}

/// The image model the server fronts: its id and the image worker's queue.
pub struct ImageModel {
    pub id: String,
    pub jobs: SyncSender<ImageJob>,
    /// Most images one request may ask for (`n`).
    pub max_images: usize,
}

struct Shared {
    config: ServerConfig,
    text: Option<TextModel>,
    image: Option<ImageModel>,
    metrics: Arc<Metrics>,
    created: u64,
    /// Raised at the shutdown deadline: requests still waiting are answered 503.
    cancel: &'static AtomicBool,
}

type Ctx = Arc<Shared>;

/// Serve `text` and `image` (one at least) on `listener` until SIGINT or SIGTERM, then stop
/// accepting, let in-flight requests finish for `shutdown_grace` and raise `cancel` to end
/// the rest. Returns when every connection is closed (the engine and the image worker end
/// when their queues are dropped).
pub fn serve(
    listener: std::net::TcpListener,
    config: ServerConfig,
    text: Option<TextModel>,
    image: Option<ImageModel>,
    metrics: Arc<Metrics>,
    cancel: &'static AtomicBool,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let grace = config.shutdown_grace;
    let limit = config.max_body_bytes;
    let header_timeout = config.header_timeout;
    let ctx = Arc::new(Shared {
        config,
        text,
        image,
        metrics,
        created: unix_now(),
        cancel,
    });
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/images/generations", post(images_generations))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics_text))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(limit))
            .layer(axum::middleware::from_fn_with_state(ctx.clone(), read_body))
            .with_state(ctx);
        // hyper's HTTP/1 connections, each on a task of its own. The header read timeout
        // (it needs a timer) bounds how long a connection may hold its task without sending a
        // whole request head: a new one, or one idle between requests.
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        let connections = GracefulShutdown::new();
        let mut stop = std::pin::pin!(shutdown_signal());
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Out of file descriptors, say: wait for some to be freed.
                            eprintln!("[ferry serve: accepting a connection failed: {e}]");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let service = TowerToHyperService::new(app.clone());
                    let conn = connections.watch(http.serve_connection(TokioIo::new(stream), service));
                    tokio::spawn(conn);
                }
                _ = &mut stop => break,
            }
        }
        drop(listener);
        eprintln!(
            "[ferry serve: stopping; in-flight requests have {:.0} s to finish]",
            grace.as_secs_f64()
        );
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            cancel.store(true, Ordering::SeqCst);
        });
        connections.shutdown().await;
        Ok(())
    })
}

/// Reads a request's body before its handler runs: at most `--max-body` bytes (413), within
/// `--body-timeout` of its head (408; hyper's header timeout covers only the head, and a body
/// sent a byte a minute would hold its connection for ever).
async fn read_body(
    State(ctx): State<Ctx>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let limit = ctx.config.max_body_bytes;
    let wait = ctx.config.body_timeout;
    let bytes = match tokio::time::timeout(wait, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return error(ApiError::new(
                413,
                "invalid_request_error",
                format!("the request body is larger than {limit} bytes (ferry serve --max-body)"),
            ));
        }
        Ok(Err(e)) => {
            return error(ApiError::new(
                400,
                "invalid_request_error",
                format!("the request body could not be read: {e}"),
            ));
        }
        Err(_) => {
            let mut r = error(ApiError::new(
                408,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s of its head (ferry serve --body-timeout)",
                    wait.as_secs()
                ),
            ));
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return r;
        }
    };
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, json_body(&e.body())).into_response();
    if e.status == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

fn json_body(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn authorize(ctx: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &ctx.config.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError {
        status: 401,
        message: "missing or wrong API key: send the header \"Authorization: Bearer KEY\" with the key given to ferry serve --api-key".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    })
}

async fn not_found() -> Response {
    error(ApiError::new(
        404,
        "invalid_request_error",
        "no such endpoint; ferry serves POST /v1/chat/completions, POST /v1/completions, POST /v1/images/generations, GET /v1/models, /health and /metrics",
    ))
}

async fn health() -> Response {
    json_body(&json!({"status": "ok"}))
}

async fn models(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&ctx, &headers) {
        return error(e);
    }
    let ids = ctx
        .text
        .iter()
        .map(|t| &t.id)
        .chain(ctx.image.iter().map(|i| &i.id));
    let data: Vec<Value> = ids
        .map(|id| json!({"id": id, "object": "model", "created": ctx.created, "owned_by": "ferry"}))
        .collect();
    json_body(&json!({"object": "list", "data": data}))
}

async fn metrics_text(State(ctx): State<Ctx>) -> Response {
    let m = &ctx.metrics;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let text = format!(
        "# HELP ferry_requests_total Requests accepted into the queue.\n# TYPE ferry_requests_total counter\nferry_requests_total {}\n\
# HELP ferry_requests_rejected_total Requests refused.\n# TYPE ferry_requests_rejected_total counter\nferry_requests_rejected_total{{reason=\"queue_full\"}} {}\nferry_requests_rejected_total{{reason=\"bad_request\"}} {}\n\
# HELP ferry_prompt_tokens_total Prompt tokens run through the model.\n# TYPE ferry_prompt_tokens_total counter\nferry_prompt_tokens_total {}\n\
# HELP ferry_generated_tokens_total Tokens generated.\n# TYPE ferry_generated_tokens_total counter\nferry_generated_tokens_total {}\n\
# HELP ferry_queue_depth Requests waiting for a place in the batch.\n# TYPE ferry_queue_depth gauge\nferry_queue_depth {}\n\
# HELP ferry_active_sequences Sequences in the running batch.\n# TYPE ferry_active_sequences gauge\nferry_active_sequences {}\n\
# HELP ferry_pass_seconds Passes over the weights.\n# TYPE ferry_pass_seconds summary\nferry_pass_seconds_sum {:.6}\nferry_pass_seconds_count {}\n\
# HELP ferry_streamed_bytes_total Weight bytes streamed to the GPU.\n# TYPE ferry_streamed_bytes_total counter\nferry_streamed_bytes_total {}\n\
# HELP ferry_pass_efficiency The last streamed pass's bound / time.\n# TYPE ferry_pass_efficiency gauge\nferry_pass_efficiency {:.6}\n\
# HELP ferry_image_requests_total Image requests accepted into the image queue.\n# TYPE ferry_image_requests_total counter\nferry_image_requests_total {}\n\
# HELP ferry_image_requests_rejected_total Image requests refused because the image queue was full.\n# TYPE ferry_image_requests_rejected_total counter\nferry_image_requests_rejected_total{{reason=\"queue_full\"}} {}\n\
# HELP ferry_image_queue_depth Image requests waiting for the image worker.\n# TYPE ferry_image_queue_depth gauge\nferry_image_queue_depth {}\n\
# HELP ferry_image_jobs_running Image requests generating now (0 or 1).\n# TYPE ferry_image_jobs_running gauge\nferry_image_jobs_running {}\n\
# HELP ferry_images_generated_total Images generated.\n# TYPE ferry_images_generated_total counter\nferry_images_generated_total {}\n\
# HELP ferry_image_job_seconds Image jobs (one request's images, denoised together).\n# TYPE ferry_image_job_seconds summary\nferry_image_job_seconds_sum {:.6}\nferry_image_job_seconds_count {}\n",
        l(&m.requests),
        l(&m.rejected_queue_full),
        l(&m.rejected_bad_request),
        l(&m.prompt_tokens),
        l(&m.generated_tokens),
        m.queued.load(Ordering::SeqCst),
        m.active.load(Ordering::SeqCst),
        l(&m.pass_us) as f64 / 1e6,
        l(&m.passes),
        l(&m.streamed_bytes),
        l(&m.efficiency_ppm) as f64 / 1e6,
        l(&m.image_requests),
        l(&m.rejected_image_queue_full),
        m.image_queued.load(Ordering::SeqCst),
        m.image_running.load(Ordering::SeqCst),
        l(&m.images_generated),
        l(&m.image_us) as f64 / 1e6,
        l(&m.image_jobs),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn chat(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    complete(ctx, headers, body, Endpoint::Chat).await
}

async fn completions(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    complete(ctx, headers, body, Endpoint::Completions).await
}

async fn complete(ctx: Ctx, headers: HeaderMap, body: Bytes, endpoint: Endpoint) -> Response {
    if let Err(e) = authorize(&ctx, &headers) {
        return error(e);
    }
    let Some(text) = &ctx.text else {
        return error(no_model(
            "text",
            "ferry serve --model",
            ctx.image.as_ref().map(|i| &i.id),
            "POST /v1/images/generations",
        ));
    };
    let prepared = api::parse(endpoint, &body).and_then(|ask| request(text, ask, endpoint));
    let (ask, request) = match prepared {
        Ok(p) => p,
        Err(e) => {
            if e.status == 400 {
                ctx.metrics
                    .rejected_bad_request
                    .fetch_add(1, Ordering::Relaxed);
            }
            return error(e);
        }
    };
    let (tx, mut rx) = unbounded_channel();
    ctx.metrics.queued.fetch_add(1, Ordering::SeqCst);
    match text.jobs.try_send(Job {
        request,
        events: tx,
    }) {
        Ok(()) => {
            ctx.metrics.requests.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            ctx.metrics.queued.fetch_sub(1, Ordering::SeqCst);
            let busy = matches!(e, TrySendError::Full(_));
            if busy {
                ctx.metrics
                    .rejected_queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            return error(ApiError::new(
                if busy { 429 } else { 503 },
                "server_error",
                if busy {
                    "the queue of waiting requests is full (ferry serve --max-queue); try again shortly"
                } else {
                    "the server is shutting down"
                },
            ));
        }
    }
    let deadline = tokio::time::Instant::now() + ctx.config.request_timeout;
    let id = format!(
        "{}-{:x}",
        match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        },
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let reply = Reply {
        id,
        endpoint,
        model: text.id.clone(),
        created: unix_now(),
    };
    if !ask.stream {
        let mut text = String::new();
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Text(t))) => text.push_str(&t),
                Ok(Some(Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    return json_body(&reply.whole(&text, finish, prompt_tokens, completion_tokens))
                }
                Ok(Some(Event::Failed(m))) => {
                    return error(ApiError::new(500, "server_error", m));
                }
                Ok(None) => {
                    return error(ApiError::new(
                        503,
                        "server_error",
                        "the request was dropped (the server is shutting down)",
                    ))
                }
                Err(_) => {
                    return error(ApiError::new(
                        504,
                        "server_error",
                        format!(
                            "the request took longer than {} s (ferry serve --request-timeout)",
                            ctx.config.request_timeout.as_secs()
                        ),
                    ))
                }
            }
        }
    }
    // Server-sent events: a chunk per piece of text, the finish, usage if asked, [DONE].
    let include_usage = ask.include_usage;
    let first = reply.chunk(Some(""), None, true);
    let stream = futures_util::stream::unfold(
        (rx, reply, Some(first), false),
        move |(mut rx, reply, pending, done)| async move {
            if let Some(line) = pending {
                return Some((Ok::<_, Infallible>(line), (rx, reply, None, done)));
            }
            if done {
                return None;
            }
            let event = tokio::time::timeout_at(deadline, rx.recv()).await;
            let line = match event {
                Ok(Some(Event::Text(t))) => reply.chunk(Some(&t), None, false),
                Ok(Some(Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    let mut s = reply.chunk(None, Some(finish), false);
                    if include_usage {
                        s.push_str(&reply.usage_chunk(prompt_tokens, completion_tokens));
                    }
                    s.push_str("data: [DONE]\n\n");
                    return Some((Ok(s), (rx, reply, None, true)));
                }
                Ok(Some(Event::Failed(m))) => {
                    let e = ApiError::new(500, "server_error", m);
                    format!("data: {}\n\ndata: [DONE]\n\n", e.body())
                }
                Ok(None) | Err(_) => {
                    let e = ApiError::new(
                        504,
                        "server_error",
                        "the request ended before its answer was complete (timeout or shutdown)",
                    );
                    format!("data: {}\n\ndata: [DONE]\n\n", e.body())
                }
            };
            let end = line.ends_with("[DONE]\n\n");
            Some((Ok(line), (rx, reply, None, end)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

/// The engine's request for `ask`: the prompt encoded (chat template for chat), the sampling,
/// and the context checked.
fn request(c: &TextModel, ask: Ask, endpoint: Endpoint) -> Result<(Ask, Request), ApiError> {
    if ask.model != c.id {
        return Err(unknown_model(&ask.model, &c.id));
    }
    let (prompt, field) = match endpoint {
        Endpoint::Chat => {
            let messages: Vec<Message> = ask
                .messages
                .iter()
                .map(|(r, c)| Message::new(r, c))
                .collect();
            (c.codec.encode_chat(&messages), "messages")
        }
        Endpoint::Completions => {
            if ask.prompt.is_empty() {
                return Err(ApiError::field("prompt", "is empty; give some text"));
            }
            (c.codec.encode(&ask.prompt), "prompt")
        }
    };
    let prompt = prompt.map_err(|e| ApiError::field(field, e.to_string()))?;
    if prompt.len() >= c.context {
        return Err(ApiError::field(
            field,
            format!(
                "the prompt is {} tokens, and the context holds {} (ferry serve --context)",
                prompt.len(),
                c.context
            ),
        ));
    }
    let max_tokens = match ask.max_tokens {
        Some((n, name)) => {
            if prompt.len() + n > c.context {
                return Err(ApiError::field(
                    name,
                    format!(
                        "the prompt is {} tokens and {name} is {n}: {} in all, and the context holds {} (ferry serve --context)",
                        prompt.len(),
                        prompt.len() + n,
                        c.context
                    ),
                ));
            }
            n
        }
        None => c.default_max_tokens.min(c.context - prompt.len()),
    };
    let seed = ask.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let request = Request {
        prompt,
        max_tokens,
        sampling: SamplingConfig {
            temperature: ask.temperature,
            top_k: ask.top_k,
            top_p: ask.top_p,
            repetition_penalty: 1.0,
            seed,
        },
        stop_strings: ask.stop.clone(),
        ignore_eos: false,
    };
    Ok((ask, request))
}

/// POST /v1/images/generations: the request checked, queued for the image worker (429 when
/// its queue is full), and answered with the PNGs in base64 when they are made.
async fn images_generations(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = authorize(&ctx, &headers) {
        return error(e);
    }
    let Some(image) = &ctx.image else {
        return error(no_model(
            "image",
            "ferry serve --image-model",
            ctx.text.as_ref().map(|t| &t.id),
            "POST /v1/chat/completions and /v1/completions",
        ));
    };
    let ask = api::parse_image(&body, image.max_images).and_then(|ask| match &ask.model {
        Some(m) if *m != image.id => Err(unknown_model(m, &image.id)),
        _ => Ok(ask),
    });
    let ask = match ask {
        Ok(a) => a,
        Err(e) => {
            if e.status == 400 {
                ctx.metrics
                    .rejected_bad_request
                    .fetch_add(1, Ordering::Relaxed);
            }
            return error(e);
        }
    };
    let seed = ask.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64 % 1_000_000_000)
    });
    let (reply, mut answer) = oneshot::channel();
    ctx.metrics.image_queued.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = image.jobs.try_send(ImageJob { ask, seed, reply }) {
        ctx.metrics.image_queued.fetch_sub(1, Ordering::SeqCst);
        let busy = matches!(e, TrySendError::Full(_));
        if busy {
            ctx.metrics
                .rejected_image_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
        return error(ApiError::new(
            if busy { 429 } else { 503 },
            "server_error",
            if busy {
                "the queue of waiting image requests is full (ferry serve --max-image-queue); try again shortly"
            } else {
                "the image worker has stopped (the server is shutting down)"
            },
        ));
    }
    ctx.metrics.image_requests.fetch_add(1, Ordering::Relaxed);
    // Wait for the images, the request's deadline, or the shutdown deadline (looked at a few
    // times a second: an image job cannot be cut short, its client can stop waiting).
    let deadline = tokio::time::Instant::now() + ctx.config.request_timeout;
    let mut looks = tokio::time::interval(Duration::from_millis(200));
    let generated = loop {
        tokio::select! {
            done = &mut answer => break done,
            _ = tokio::time::sleep_until(deadline) => {
                return error(ApiError::new(
                    504,
                    "server_error",
                    format!(
                        "the request took longer than {} s (ferry serve --request-timeout)",
                        ctx.config.request_timeout.as_secs()
                    ),
                ));
            }
            _ = looks.tick() => {
                if ctx.cancel.load(Ordering::SeqCst) {
                    return error(ApiError::new(503, "server_error", "the request was cancelled: the server is shutting down"));
                }
            }
        }
    };
    let g = match generated {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            // A request the model cannot serve as asked is the client's, as a parse error.
            if e.status == 400 {
                ctx.metrics
                    .rejected_bad_request
                    .fetch_add(1, Ordering::Relaxed);
            }
            return error(e);
        }
        Err(_) => {
            return error(ApiError::new(
                503,
                "server_error",
                "the request was dropped (the server is shutting down)",
            ))
        }
    };
    let data: Vec<Value> = g
        .pngs
        .iter()
        .map(|p| json!({"b64_json": images::base64(p)}))
        .collect();
    json_body(&json!({
        "created": unix_now(),
        "data": data,
        "output_format": "png",
        "seed": seed,
        "usage": {
            "input_tokens": g.text_tokens,
            "input_tokens_details": {"text_tokens": g.text_tokens, "image_tokens": 0},
            "output_tokens": g.image_tokens,
            "total_tokens": g.text_tokens + g.image_tokens,
        },
    }))
}

/// 404 for an endpoint whose kind of model (`kind`, loaded by `flag`) this server lacks,
/// saying what it serves instead (`other`, at `endpoints`).
fn no_model(kind: &str, flag: &str, other: Option<&String>, endpoints: &str) -> ApiError {
    ApiError {
        status: 404,
        message: format!(
            "no {kind} model is loaded on this server (start it with {flag}){}",
            other.map_or(String::new(), |id| format!(
                "; it serves {id:?} at {endpoints}"
            ))
        ),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
    }
}

fn unknown_model(asked: &str, served: &str) -> ApiError {
    ApiError {
        status: 404,
        message: format!(
            "model: {asked:?} is not served here; this server serves {served:?} (GET /v1/models)"
        ),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Eos | Finish::StopString => "stop",
        Finish::MaxTokens | Finish::Context => "length",
        Finish::Interrupted => "cancelled",
    }
}

fn usage_json(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// What every response of one request carries.
struct Reply {
    id: String,
    endpoint: Endpoint,
    model: String,
    created: u64,
}

impl Reply {
    fn whole(&self, text: &str, finish: Finish, prompt: usize, completion: usize) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(finish), "logprobs": null}),
            Endpoint::Completions => json!({"index": 0, "text": text,
                "finish_reason": finish_reason(finish), "logprobs": null}),
        };
        json!({"id": self.id, "object": match self.endpoint {
                Endpoint::Chat => "chat.completion",
                Endpoint::Completions => "text_completion",
            }, "created": self.created, "model": self.model, "choices": [choice],
            "usage": usage_json(prompt, completion)})
    }

    /// The last event when `stream_options.include_usage`: no choices, the usage.
    fn usage_chunk(&self, prompt: usize, completion: usize) -> String {
        let v = json!({"id": self.id, "object": match self.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completions => "text_completion",
            }, "created": self.created, "model": self.model, "choices": [],
            "usage": usage_json(prompt, completion)});
        format!("data: {v}\n\n")
    }

    /// One server-sent event: a piece of text, or the finish.
    fn chunk(&self, text: Option<&str>, finish: Option<Finish>, first: bool) -> String {
        let finish = finish.map(finish_reason);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = "assistant".into();
                }
                if let Some(t) = text {
                    delta["content"] = t.into();
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            }
        };
        let v = json!({"id": self.id, "object": match self.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completions => "text_completion",
            }, "created": self.created, "model": self.model, "choices": [choice]});
        format!("data: {v}\n\n")
    }
}
