//! The HTTP face: routes, API keys, the per-request log line, and the generation flow
//! (check, queue, wait or stream, respond).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tower_http::timeout::RequestBodyTimeoutLayer;
use zimage::{GenerateRequest, GrayImage};

use crate::api::{prepare, ControlInput, EditInput, ImageParams, Limits, Meta, PixelLimits, Prepared, ResponseFormat};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::output::ImageStore;
use crate::workers::{CancelOnDrop, Finished, Job, JobCancel, ModelPool, StepReport, SubmitError};

/// Limits and settings the handlers apply.
pub struct Settings {
    pub max_body_bytes: usize,
    pub max_input_side: u32,
    /// Most output pixels per image and per request (`--max-pixels`, `--max-batch-pixels`).
    pub pixels: PixelLimits,
    /// Requests whose pictures may be decoded at once (`--workers` + `--max-queue`, summed over
    /// the models): past that an upload is refused (429) instead of decoded, so that pictures
    /// that decode to far more than they weigh cannot take the memory all together.
    pub decode_slots: usize,
    /// Testing: how long each request holds its decoding slot beyond the decoding.
    pub decode_delay: Duration,
    /// Longest wait for the next part of a request body (`--header-timeout`).
    pub body_timeout: Duration,
    /// Longest a whole request body may take to arrive (`--body-timeout`): a client that
    /// trickles a byte now and then passes `body_timeout` forever.
    pub body_total_timeout: Duration,
    pub request_timeout: Duration,
    pub public_url: Option<String>,
}

pub struct AppState {
    /// Set once every model is loaded.
    pub models: OnceLock<Vec<Arc<ModelPool>>>,
    /// The served names, known before loading.
    pub names: Vec<String>,
    pub draining: AtomicBool,
    /// SHA-256 of each accepted API key; empty = open.
    pub keys: Vec<[u8; 32]>,
    pub metrics: Arc<Metrics>,
    pub store: ImageStore,
    pub settings: Settings,
    /// `settings.decode_slots` permits: one held while a request's pictures are decoded.
    decoding: Arc<Semaphore>,
    /// As many permits: one held while a request's prompts are tokenized before queueing (a
    /// 1 MiB prompt takes seconds and ~150 MB to tokenize).
    checking: Semaphore,
    next_id: AtomicU64,
    id_prefix: String,
}

impl AppState {
    pub fn new(
        names: Vec<String>,
        keys: &[String],
        metrics: Arc<Metrics>,
        store: ImageStore,
        settings: Settings,
    ) -> Self {
        AppState {
            models: OnceLock::new(),
            names,
            draining: AtomicBool::new(false),
            keys: keys.iter().map(|k| Sha256::digest(k.as_bytes()).into()).collect(),
            metrics,
            store,
            decoding: Arc::new(Semaphore::new(settings.decode_slots.max(1))),
            checking: Semaphore::new(settings.decode_slots.max(1)),
            settings,
            next_id: AtomicU64::new(1),
            id_prefix: format!("{:08x}", crate::output::random_u64() as u32),
        }
    }

    fn new_id(&self) -> String {
        format!("req_{}{:06}", self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// 503 while loading or draining.
    fn available(&self) -> Result<&[Arc<ModelPool>], ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::draining());
        }
        self.models.get().map(Vec::as_slice).ok_or_else(ApiError::loading)
    }

    fn pool(&self, name: Option<&str>) -> Result<Arc<ModelPool>, ApiError> {
        let pools = self.available()?;
        match name {
            // No model named: the first one served.
            None | Some("") => Ok(Arc::clone(&pools[0])),
            Some(name) => {
                pools.iter().find(|p| p.name == name).cloned().ok_or_else(|| ApiError::unknown_model(name, &self.names))
            }
        }
    }

    /// A slot for decoding a request's pictures, or a 429 at once when none is free. The
    /// decoding task holds it (not the handler), so a client that goes away does not free it
    /// before the decoding ends.
    fn decode_slot(&self) -> Result<DecodeSlot, ApiError> {
        let permit = Arc::clone(&self.decoding)
            .try_acquire_owned()
            .map_err(|_| ApiError::decoders_busy(self.settings.decode_slots))?;
        Ok(DecodeSlot { _permit: permit, delay: self.settings.decode_delay })
    }

    /// Queued or running jobs over all models.
    pub fn busy(&self) -> i64 {
        self.models.get().map_or(0, |pools| pools.iter().map(|p| p.busy()).sum())
    }
}

/// A decoding slot ([`AppState::decode_slot`]), released when dropped.
struct DecodeSlot {
    _permit: OwnedSemaphorePermit,
    delay: Duration,
}

impl DecodeSlot {
    /// Called on the decoding thread once the pictures are decoded: holds the slot for the
    /// testing delay (`--decode-delay-ms`, 0 outside tests).
    fn done(self) {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), require_key));
    Router::new()
        .merge(v1)
        // Unguessable names, like OpenAI's signed URLs: no key needed to fetch.
        .route("/v1/images/files/{name}", get(get_file))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), refuse_declared_oversize))
        // A client that stops sending its body: reading it fails (a 400) and the connection
        // closes, instead of a handler waiting for it forever.
        .layer(RequestBodyTimeoutLayer::new(state.settings.body_timeout))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), limit_body_time))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), log_request))
        .with_state(state)
}

/// A body whose Content-Length is already over `--max-body-bytes` is refused before it is
/// read (the body limit counts bytes as they arrive: the client would send, or hold the
/// connection, until then).
async fn refuse_declared_oversize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(length) if length > state.settings.max_body_bytes as u64 => {
            ApiError::too_large(state.settings.max_body_bytes).into_response()
        }
        _ => next.run(request).await,
    }
}

/// Gives the request's body a deadline for arriving whole (`--body-timeout`): reading past it
/// fails as a stalled body does (a 400, and the connection closes).
async fn limit_body_time(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let deadline = Box::pin(tokio::time::sleep(state.settings.body_total_timeout));
    next.run(request.map(|inner| axum::body::Body::new(DeadlineBody { inner, deadline }))).await
}

/// A body that fails once its deadline passes.
struct DeadlineBody {
    inner: axum::body::Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for DeadlineBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        if self.deadline.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Some(Err(axum::Error::new(
                "the request body took longer than --body-timeout",
            ))));
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------------------------
// The request log and API keys

#[derive(Clone)]
pub struct RequestId(pub String);

/// What a generation handler tells the log line.
#[derive(Clone, Default)]
struct LogInfo {
    id: String,
    model: String,
    images: usize,
    size: String,
    steps: u32,
    seed: Option<u64>,
    queue_wait: Option<Duration>,
    generation: Option<Duration>,
    /// A stream logs its own line when it ends.
    deferred: bool,
}

/// One line per request (`id`, route, status, timings, outcome). A request whose client goes
/// away before the response is logged when its future is dropped.
struct RequestLog {
    state: Arc<AppState>,
    id: String,
    method: String,
    path: String,
    started: Instant,
    done: bool,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if !self.done {
            self.state.metrics.error("cancelled");
            self.state.metrics.request(route_label(&self.path), 499);
            tracing::info!(
                id = %self.id, method = %self.method, path = %self.path, status = 499,
                total_ms = ms(self.started.elapsed()), outcome = "client disconnected; generation cancelled",
                "request"
            );
        }
    }
}

async fn log_request(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| state.new_id(), str::to_string);
    let mut log = RequestLog {
        state: Arc::clone(&state),
        id: id.clone(),
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        started: Instant::now(),
        done: false,
    };
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    log.done = true;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status().as_u16();
    let info = response.extensions().get::<LogInfo>().cloned();
    let error = response.extensions().get::<ApiError>().cloned();
    if info.as_ref().is_some_and(|i| i.deferred) {
        return response; // the stream counts and logs itself
    }
    state.metrics.request(route_label(&log.path), status);
    if let Some(e) = &error {
        state.metrics.error(e.metric_kind());
    }
    let outcome = error.as_ref().map_or_else(|| "ok".to_string(), |e| format!("{}: {}", e.metric_kind(), e.message));
    let total_ms = ms(log.started.elapsed());
    match info {
        Some(info) => tracing::info!(
            id = %id, method = %log.method, path = %log.path, status,
            model = %info.model, images = info.images, size = %info.size, steps = info.steps,
            seed = info.seed.map_or_else(String::new, |s| s.to_string()),
            queue_ms = info.queue_wait.map_or(-1.0, ms), generation_ms = info.generation.map_or(-1.0, ms),
            total_ms, outcome = %outcome,
            "request"
        ),
        None if matches!(log.path.as_str(), "/health" | "/ready" | "/metrics") && error.is_none() => {
            tracing::debug!(id = %id, method = %log.method, path = %log.path, status, total_ms, "request")
        }
        None => {
            tracing::info!(id = %id, method = %log.method, path = %log.path, status, total_ms, outcome = %outcome, "request")
        }
    }
    response
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/images/generations" => "/v1/images/generations",
        "/v1/images/edits" => "/v1/images/edits",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/ready" => "/ready",
        "/metrics" => "/metrics",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        p if p.starts_with("/v1/images/files/") => "/v1/images/files/{name}",
        _ => "other",
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if state.keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110, 11.1).
        .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")))
        .map(|(_, key)| key.trim());
    match presented {
        Some(key) if key_matches(&state.keys, key) => next.run(request).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Compares digests, so neither the keys' lengths nor their contents show in the time taken;
/// every key is compared, without an early exit.
fn key_matches(keys: &[[u8; 32]], presented: &str) -> bool {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut matched = 0u8;
    for key in keys {
        let diff = key.iter().zip(digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // 1 when diff is 0, without a branch on the secret.
        matched |= ((u16::from(diff).wrapping_sub(1)) >> 8) as u8 & 1;
    }
    matched == 1
}

// ---------------------------------------------------------------------------------------------
// Health, models, files, metrics

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.available() {
        Ok(pools) => Json(json!({
            "status": "ready",
            "models": pools.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

fn model_object(name: &str) -> Value {
    json!({ "id": name, "object": "model", "created": unix_now(), "owned_by": "zimage" })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": state.names.iter().map(|n| model_object(n)).collect::<Vec<_>>() }))
}

/// A path segment that is not UTF-8 once decoded (`%ff`): axum's rejection is plain text.
fn path_error(rejection: PathRejection, param: &str) -> ApiError {
    ApiError::invalid(rejection.body_text()).with_param(param)
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id.map_err(|e| path_error(e, "id"))?;
    if state.names.contains(&id) {
        Ok(Json(model_object(&id)))
    } else {
        Err(ApiError::unknown_model(&id, &state.names))
    }
}

async fn get_file(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|e| path_error(e, "name"))?;
    let (content_type, bytes) =
        state.store.get(&name).ok_or_else(|| ApiError::not_found("no such image (URLs expire)"))?;
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let pools = state.models.get().cloned().unwrap_or_default();
    let gauges: Vec<(&str, &crate::metrics::ModelGauges)> =
        pools.iter().map(|p| (p.name.as_str(), p.gauges.as_ref())).collect();
    let text = state.metrics.render(&gauges, state.models.get().is_some(), state.draining.load(Ordering::SeqCst));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

// ---------------------------------------------------------------------------------------------
// Generations and edits

async fn generations(
    State(state): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = async {
        let body = body.map_err(|e| body_error(e.status(), e.body_text(), &state))?;
        state.available()?;
        let params = ImageParams::from_json(&body)?;
        let pool = state.pool(params.model.as_deref())?;
        let pixels = state.settings.pixels;
        let Some(encoded) = params.control_image.clone() else {
            return prepare(params, None, None, &limits(&pool, pixels, &|r| pool.checker.check_request(r)));
        };
        let controlnet = pool.checker.controlnet();
        let max_side = state.settings.max_input_side;
        let slot = state.decode_slot()?;
        // Decoding and resizing are CPU work: off the async threads.
        tokio::task::spawn_blocking(move || {
            let check = |r: &GenerateRequest| pool.checker.check_request(r);
            let limits = limits(&pool, pixels, &check);
            let bytes = decode_base64_file(&encoded).map_err(|e| e.with_param("control_image"))?;
            check_dimensions(&bytes, max_side, "control_image")?;
            let image =
                zimage::image_io::decode_rgb(&bytes).map_err(|e| ApiError::from_sdk(&e).with_param("control_image"));
            slot.done();
            let name = "control_image".to_string();
            prepare(params, None, Some(ControlInput { image: image?, name, controlnet }), &limits)
        })
        .await
        .map_err(|e| ApiError::internal(format!("decoding the control image failed: {e}")))?
    }
    .await;
    match prepared {
        Ok(prepared) => run(state, id.0, prepared, &headers).await,
        Err(e) => e.into_response(),
    }
}

async fn edits(
    State(state): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    match read_edit(&state, multipart, &headers).await {
        Ok(prepared) => run(state, id.0, prepared, &headers).await,
        Err(e) => e.into_response(),
    }
}

/// The limits `prepare` checks a request for `pool`'s model against; `check` is the model's
/// `check_request`.
fn limits<'a>(
    pool: &ModelPool,
    pixels: PixelLimits,
    check: &'a dyn Fn(&GenerateRequest) -> zimage::Result<()>,
) -> Limits<'a> {
    let manifest = pool.checker.manifest();
    Limits { defaults: manifest.generation_defaults, pixels, size_multiple: manifest.size_multiple(), check }
}

fn body_error(status: StatusCode, text: String, state: &AppState) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(state.settings.max_body_bytes)
    } else {
        ApiError::invalid(format!("cannot read the request body: {text}"))
    }
}

/// Reads the multipart form: `image` (or `image[]`; one picture, or on an editing package one
/// per reference), optional `mask`, optional `control_image` (with a ControlNet loaded:
/// ControlNet inpainting; a file, or base64 text), and the text fields; checks the pictures'
/// dimensions from their headers before decoding them.
async fn read_edit(
    state: &Arc<AppState>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
    headers: &HeaderMap,
) -> Result<Prepared, ApiError> {
    state.available()?;
    let mut multipart = multipart.map_err(|e| {
        let sent = headers.get(header::CONTENT_TYPE).map_or_else(
            || "no Content-Type".to_string(),
            |t| format!("Content-Type {:?}", String::from_utf8_lossy(t.as_bytes())),
        );
        ApiError::invalid(format!(
            "this route takes a multipart/form-data body (the pictures as form files), and the request has {sent}: {e}"
        ))
    })?;
    let read_error = |e: axum::extract::multipart::MultipartError| body_error(e.status(), e.body_text(), state);
    let mut fields = Vec::new();
    let mut images: Vec<(String, Bytes)> = Vec::new();
    let mut mask: Option<(String, Bytes)> = None;
    let mut control: Option<(String, Bytes)> = None;
    while let Some(field) = multipart.next_field().await.map_err(read_error)? {
        let name = field.name().unwrap_or_default().to_string();
        // A control map comes as a file part, or as base64 text (a client's extra field).
        let control_file = name == "control_image" && field.file_name().is_some();
        match name.as_str() {
            "image" | "image[]" | "mask" | "control_image" if name != "control_image" || control_file => {
                let file_name = field.file_name().unwrap_or(&name).to_string();
                let bytes = field.bytes().await.map_err(read_error)?;
                let slot = match name.as_str() {
                    "mask" => &mut mask,
                    "control_image" => &mut control,
                    _ => {
                        images.push((file_name, bytes));
                        continue;
                    }
                };
                if slot.is_some() {
                    return Err(ApiError::invalid(format!("one '{name}' picture per request")).with_param(name));
                }
                *slot = Some((file_name, bytes));
            }
            _ => {
                // Not `field.text()`: it turns bytes that are not UTF-8 into U+FFFD, a prompt
                // the client did not send; the JSON route refuses them too.
                let bytes = field.bytes().await.map_err(read_error)?;
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    ApiError::invalid(format!("the field '{name}' is not UTF-8 text")).with_param(name.clone())
                })?;
                fields.push((name, text));
            }
        }
    }
    let mut params = ImageParams::from_fields(&fields)?;
    let pool = state.pool(params.model.as_deref())?;
    let (pixels, controlnet) = (state.settings.pixels, pool.checker.controlnet());
    if images.is_empty() {
        return Err(ApiError::invalid("'image' is required").with_param("image"));
    }
    // Taken once the body is read (a slow upload does not hold one) and before any picture is
    // decoded.
    let slot = state.decode_slot()?;
    if pool.checker.manifest().supports("edit") && pool.checker.manifest().edit.is_some() {
        let refused = mask.as_ref().map(|_| "mask").or(control.as_ref().map(|_| "control_image"));
        return read_instruction_edit(state, pool, params, images, refused, slot).await;
    }
    if images.len() > 1 {
        return Err(ApiError::invalid(format!(
            "{} pictures: this model takes one 'image' (several are references for an editing model)",
            images.len()
        ))
        .with_param("image"));
    }
    let (image_name, image_bytes) = images.pop().expect("one picture");
    let control = match (control, params.control_image.take()) {
        (Some((name, bytes)), None) => Some((name, bytes.to_vec())),
        (None, Some(text)) => {
            // Up to --max-body-bytes of base64: CPU work, off the async threads.
            let bytes = tokio::task::spawn_blocking(move || decode_base64_file(&text))
                .await
                .map_err(|e| ApiError::internal(format!("decoding the upload failed: {e}")))?;
            Some(("control_image".to_string(), bytes.map_err(|e| e.with_param("control_image"))?))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("one 'control_image' per request (a file or base64 text)")
                .with_param("control_image"))
        }
        (None, None) => None,
    };
    let max_side = state.settings.max_input_side;
    check_dimensions(&image_bytes, max_side, "image")?;
    if let Some((_, bytes)) = &mask {
        check_dimensions(bytes, max_side, "mask")?;
    }
    if let Some((_, bytes)) = &control {
        check_dimensions(bytes, max_side, "control_image")?;
    }
    // Decoding and resizing are CPU work: off the async threads.
    tokio::task::spawn_blocking(move || {
        let check = |r: &GenerateRequest| pool.checker.check_request(r);
        let limits = limits(&pool, pixels, &check);
        let decoded = (|| {
            let image =
                zimage::image_io::decode_rgb(&image_bytes).map_err(|e| ApiError::from_sdk(&e).with_param("image"))?;
            let mask = match mask {
                Some((name, bytes)) => Some((decode_mask(&bytes).map_err(|e| e.with_param("mask"))?, name)),
                None => None,
            };
            let control = match control {
                Some((name, bytes)) => Some(ControlInput {
                    image: zimage::image_io::decode_rgb(&bytes)
                        .map_err(|e| ApiError::from_sdk(&e).with_param("control_image"))?,
                    name,
                    controlnet,
                }),
                None => None,
            };
            Ok((EditInput { image, image_name, mask }, control))
        })();
        slot.done();
        let (edit, control) = decoded?;
        prepare(params, Some(edit), control, &limits)
    })
    .await
    .map_err(|e| ApiError::internal(format!("decoding the upload failed: {e}")))?
}

/// `/v1/images/edits` on an editing (Omni / Edit) package: the pictures are the instruction's
/// references, checked from their headers (the server's side limit, the model's reference
/// rules) and decoded off the async threads; a mask or a control image is refused.
async fn read_instruction_edit(
    state: &Arc<AppState>,
    pool: Arc<ModelPool>,
    params: ImageParams,
    pictures: Vec<(String, Bytes)>,
    refused_picture: Option<&'static str>,
    slot: DecodeSlot,
) -> Result<Prepared, ApiError> {
    if let Some(field) = refused_picture {
        return Err(ApiError::invalid(
            "this model edits by instruction: give the pictures as references and say what to change in the \
             prompt (no mask or control_image)",
        )
        .with_param(field));
    }
    let manifest = pool.checker.manifest();
    zimage::pipeline::edit::check_edit_package(manifest, pool.checker.package_dir(), pictures.len())
        .map_err(|e| ApiError::from_sdk(&e).with_param("image"))?;
    for (_, bytes) in &pictures {
        check_dimensions(bytes, state.settings.max_input_side, "image")?;
    }
    let pixels = state.settings.pixels;
    tokio::task::spawn_blocking(move || {
        let manifest = pool.checker.manifest();
        let references: Result<Vec<_>, ApiError> = pictures
            .iter()
            .enumerate()
            .map(|(index, (name, bytes))| {
                let picture =
                    zimage::pipeline::edit::decode_reference(manifest, pool.checker.package_dir(), bytes, index + 1)
                        .map_err(|e| ApiError::from_sdk(&e).with_param("image"))?;
                Ok((picture, zimage::ReferenceRecord::new(name, bytes)))
            })
            .collect();
        slot.done();
        let dir = pool.checker.package_dir();
        let model = crate::api::EditModel {
            defaults: &manifest.edit.as_ref().expect("an editing package").defaults,
            size_multiple: manifest.size_multiple(),
            output_size: &|w, h| zimage::pipeline::edit::edit_output_size(manifest, dir, (w, h), pictures.len()),
            check: &|r| pool.checker.check_edit(r),
        };
        crate::api::prepare_edit(params, references?, pixels, &model)
    })
    .await
    .map_err(|e| ApiError::internal(format!("decoding the upload failed: {e}")))?
}

/// The bytes of a file sent as base64 in JSON, plain or as a `data:` URL.
fn decode_base64_file(text: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match text.strip_prefix("data:") {
        Some(url) => url.split_once(";base64,").map(|(_, data)| data).ok_or_else(|| {
            ApiError::invalid("a data: URL must be base64 (data:image/png;base64,...)").with_code("invalid_image")
        })?,
        None => text,
    };
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| ApiError::invalid(format!("the image is not valid base64: {e}")).with_code("invalid_image"))
}

/// Refuses a picture from its header alone when a side exceeds `max_side` (the upright sides:
/// the SDK turns pictures by their EXIF orientation).
fn check_dimensions(bytes: &[u8], max_side: u32, param: &str) -> Result<(), ApiError> {
    let (w, h) = zimage::image_io::image_size(bytes).map_err(|e| {
        // The SDK refuses a header over its own side limit without reading on; the image
        // crate's header reader still gives the sides, so the client hears this server's
        // limit (the check below is symmetric: an EXIF turn does not change it).
        match image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map(|r| r.into_dimensions()) {
            Ok(Ok((w, h))) if w > max_side || h > max_side => too_large(param, w, h, max_side),
            _ => ApiError::from_sdk(&e).with_param(param),
        }
    })?;
    if w > max_side || h > max_side {
        return Err(too_large(param, w, h, max_side));
    }
    Ok(())
}

/// The picture `param` of `w` x `h` has a side over `max_side` (`--max-input-side`).
fn too_large(param: &str, w: u32, h: u32, max_side: u32) -> ApiError {
    ApiError::invalid(format!("the {param} is {w}x{h}; this server accepts at most {max_side} pixels on a side"))
        .with_code("image_too_large")
        .with_param(param)
}

/// A mask with transparency follows OpenAI's convention (fully transparent = edit here);
/// an opaque one zimage's (white = repaint, black = keep, as `zimage generate --mask`).
fn decode_mask(bytes: &[u8]) -> Result<GrayImage, ApiError> {
    let decoded = zimage::image_io::decode_upright(bytes).map_err(|e| ApiError::from_sdk(&e))?;
    if decoded.color().has_alpha() {
        let rgba = decoded.to_rgba8();
        if rgba.pixels().any(|p| p.0[3] < 255) {
            let pixels = rgba.pixels().map(|p| if p.0[3] == 0 { 255 } else { 0 }).collect();
            return Ok(GrayImage { width: rgba.width(), height: rgba.height(), pixels });
        }
    }
    Ok(zimage::image_io::to_gray(decoded))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks the request against the model, queues it, then answers (JSON, or an event stream).
async fn run(state: Arc<AppState>, id: String, prepared: Prepared, headers: &HeaderMap) -> Response {
    let (count, steps, seed) = prepared.spec.work.count_steps_seed();
    let mut info = LogInfo {
        id: id.clone(),
        model: prepared.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| state.names[0].clone()),
        images: count as usize,
        size: prepared.meta.size.clone(),
        steps,
        seed,
        ..LogInfo::default()
    };
    let meta = prepared.meta.clone();
    let (pool, reply, progress, guard) = match queue(&state, id, prepared) {
        Ok(q) => q,
        Err(e) => return with_info(e.into_response(), info),
    };
    info.model = pool.name.clone();
    if let Some(progress) = progress {
        info.deferred = true;
        let response = stream(state, pool, meta, reply, progress, guard, info.clone());
        return with_info(response, info);
    }
    let result = wait(&state, reply, guard).await;
    if let Ok(f) = &result {
        info.seed = Some(f.seed);
        info.queue_wait = Some(f.queue_wait);
        info.generation = Some(f.generation);
    }
    let response = match result {
        Ok(finished) => respond(&state, &pool, &meta, finished, headers),
        Err(e) => e.into_response(),
    };
    with_info(response, info)
}

fn with_info(mut response: Response, info: LogInfo) -> Response {
    response.extensions_mut().insert(info);
    response
}

type Reply = oneshot::Receiver<Result<Finished, ApiError>>;
type Queued = (Arc<ModelPool>, Reply, Option<mpsc::UnboundedReceiver<StepReport>>, CancelOnDrop);

fn queue(state: &AppState, id: String, prepared: Prepared) -> Result<Queued, ApiError> {
    let pool = state.pool(prepared.model.as_deref())?;
    // A full queue answers before the prompts are tokenized, and at most workers + max-queue
    // requests per model are tokenized at once (each of up to 2 MiB of text): past that, 429.
    if !pool.has_room() {
        return Err(ApiError::queue_full(pool.retry_after()));
    }
    let _checking = state.checking.try_acquire().map_err(|_| ApiError::queue_full(pool.retry_after()))?;
    // Tokenizing a long prompt takes a moment: off the runtime's reactor.
    tokio::task::block_in_place(|| pool.check(&prepared.spec))?;
    let cancel = Arc::new(JobCancel::default());
    let (reply_tx, reply_rx) = oneshot::channel();
    let (progress_tx, progress_rx) = if prepared.meta.stream {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let job = Job {
        id,
        spec: prepared.spec,
        cancel: Arc::clone(&cancel),
        progress: progress_tx,
        reply: reply_tx,
        enqueued: Instant::now(),
    };
    match pool.submit(job) {
        Ok(()) => Ok((pool, reply_rx, progress_rx, CancelOnDrop(Some(cancel)))),
        Err(SubmitError::Full) => Err(ApiError::queue_full(pool.retry_after())),
        Err(SubmitError::Closed) => Err(ApiError::draining()),
    }
}

/// Waits for the worker, within the request timeout. Dropping this future (the client went
/// away) drops `guard`, which cancels the job.
async fn wait(state: &AppState, reply: Reply, mut guard: CancelOnDrop) -> Result<Finished, ApiError> {
    let limit = state.settings.request_timeout;
    match tokio::time::timeout(limit, reply).await {
        Ok(Ok(result)) => {
            guard.disarm();
            result
        }
        Ok(Err(_)) => Err(ApiError::internal("the worker ended without an answer")),
        // The guard cancels the job as it drops.
        Err(_) => Err(ApiError::timeout(limit.as_secs())),
    }
}

fn usage(prompt_tokens: usize) -> Value {
    json!({
        "input_tokens": prompt_tokens,
        "input_tokens_details": { "image_tokens": 0, "text_tokens": prompt_tokens },
        "output_tokens": 0,
        "total_tokens": prompt_tokens,
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn respond(state: &AppState, pool: &ModelPool, meta: &Meta, f: Finished, headers: &HeaderMap) -> Response {
    let base = state.settings.public_url.clone().unwrap_or_else(|| {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
        format!("http://{host}")
    });
    let count = f.images.len();
    let data: Vec<Value> = f
        .images
        .into_iter()
        .map(|bytes| {
            let mut item = match meta.response_format {
                ResponseFormat::B64Json => json!({ "b64_json": b64(&bytes) }),
                ResponseFormat::Url => {
                    let name = state.store.put(bytes, meta.format);
                    json!({ "url": format!("{}/v1/images/files/{name}", base.trim_end_matches('/')) })
                }
            };
            if let Some(p) = &f.enhanced_prompt {
                item["revised_prompt"] = Value::String(p.clone());
            }
            item
        })
        .collect();
    state.metrics.images(&pool.name, count as u64);
    Json(json!({
        "created": unix_now(),
        "data": data,
        "background": "opaque",
        "output_format": meta.format.name(),
        "quality": meta.quality,
        "size": meta.size,
        "usage": usage(f.prompt_tokens),
        "seed": f.seed,
    }))
    .into_response()
}

/// `stream: true`: a progress event after each denoising step (`image_generation.progress`, a
/// zimage event in OpenAI's shape), the previews `partial_images` asked for
/// (`image_generation.partial_image`: at each preview step one event per image of the request,
/// `partial_image_index` counting the preview steps, `index` the image), then one
/// `image_generation.completed` per image (for edits `image_edit.*`), or an `error` event. The
/// stream holds the job's cancel guard: a client that goes away cancels the generation.
fn stream(
    state: Arc<AppState>,
    pool: Arc<ModelPool>,
    meta: Meta,
    reply: Reply,
    progress: mpsc::UnboundedReceiver<StepReport>,
    guard: CancelOnDrop,
    info: LogInfo,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(16);
    let cancel = guard.0.clone();
    tokio::spawn(forward_events(state, pool.name.clone(), meta, reply, progress, cancel, tx, info));
    let events = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|event| (Ok::<_, Infallible>(event), (rx, guard)))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// Puts a stream's events in its channel, every one within the request's deadline: a client
/// that stops reading cannot keep the stream, its job or its images past --request-timeout.
struct EventSender {
    tx: mpsc::Sender<Event>,
    deadline: tokio::time::Instant,
}

impl EventSender {
    fn event(name: &str, data: &Value) -> Event {
        Event::default().event(name).data(data.to_string())
    }

    /// A progress event: dropped when the client has not read the ones before it yet (the
    /// next one says where the generation is), never waited for.
    fn progress(&self, name: &str, data: &Value) -> Result<(), ApiError> {
        match self.tx.try_send(Self::event(name, data)) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ApiError::client_gone("the client went away")),
        }
    }

    /// An event the client must get (a preview, an image, the error): waits for room until the
    /// deadline (past it, sent only if there is room at once).
    async fn send(&self, name: &str, data: &Value) -> Result<(), ApiError> {
        // timeout_at polls the send once before looking at the clock.
        match tokio::time::timeout_at(self.deadline, self.tx.send(Self::event(name, data))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ApiError::client_gone("the client went away")),
            Err(_) => Err(ApiError::client_gone("the client stopped reading the stream within --request-timeout")),
        }
    }
}

#[allow(clippy::too_many_arguments)] // one call site: the stream's own parts
async fn forward_events(
    state: Arc<AppState>,
    model: String,
    meta: Meta,
    reply: Reply,
    mut progress: mpsc::UnboundedReceiver<StepReport>,
    cancel: Option<Arc<JobCancel>>,
    tx: mpsc::Sender<Event>,
    mut info: LogInfo,
) {
    let started = Instant::now();
    let prefix = if meta.edit { "image_edit" } else { "image_generation" };
    let path = if meta.edit { "/v1/images/edits" } else { "/v1/images/generations" };
    let limit = state.settings.request_timeout;
    let events = EventSender { tx, deadline: tokio::time::Instant::now() + limit };
    let mut previews = 0;
    let deadline = tokio::time::sleep_until(events.deadline);
    tokio::pin!(deadline);
    tokio::pin!(reply);
    let mut result = loop {
        tokio::select! {
            Some(p) = progress.recv() => {
                if let Err(e) = forward_step(&events, &meta, prefix, &mut previews, p).await {
                    break Err(e);
                }
            }
            r = &mut reply => break r.unwrap_or_else(|_| Err(ApiError::internal("the worker ended without an answer"))),
            _ = &mut deadline => break Err(ApiError::timeout(limit.as_secs())),
        }
    };
    // Steps reported before the answer came (the worker reports every step before it answers).
    if result.is_ok() {
        while let Ok(p) = progress.try_recv() {
            if let Err(e) = forward_step(&events, &meta, prefix, &mut previews, p).await {
                result = Err(e);
                break;
            }
        }
    }
    let status = match result {
        Ok(f) => {
            info.seed = Some(f.seed);
            info.queue_wait = Some(f.queue_wait);
            info.generation = Some(f.generation);
            // A client that is gone or stops reading gets no more: the images are dropped and
            // not counted as served.
            let sent = send_images(&events, &meta, prefix, f).await;
            if let Ok(count) = sent {
                state.metrics.images(&model, count as u64);
            }
            sent.map(|_| ())
        }
        Err(e) => {
            // Timed out, or the client left while it ran: stop the generation (a client that
            // disconnected has already cancelled it through the stream's guard; one that
            // stopped reading has not).
            if let Some(c) = &cancel {
                c.cancel();
            }
            if e.code != Some("cancelled") {
                let mut body = e.body();
                body["type"] = Value::String("error".into());
                // (if this fails too, the error is still what the log says)
                let _ = events.send("error", &body).await;
            }
            Err(e)
        }
    };
    let code = status.as_ref().map_or_else(|e| e.status.as_u16(), |_| 200);
    state.metrics.request(path, code);
    if let Err(e) = &status {
        state.metrics.error(e.metric_kind());
    }
    let outcome = status.map_or_else(|e| format!("{}: {}", e.metric_kind(), e.message), |_| "ok".to_string());
    tracing::info!(
        id = %info.id, path, status = code, stream = true,
        model = %info.model, images = info.images, size = %info.size, steps = info.steps,
        seed = info.seed.map_or_else(String::new, |s| s.to_string()),
        queue_ms = info.queue_wait.map_or(-1.0, ms), generation_ms = info.generation.map_or(-1.0, ms),
        total_ms = ms(started.elapsed()), outcome = %outcome,
        "request"
    );
}

/// One step's events: its progress, then its previews when it has some (one event per image;
/// `previews` counts the preview steps sent, OpenAI's `partial_image_index`).
async fn forward_step(
    events: &EventSender,
    meta: &Meta,
    prefix: &str,
    previews: &mut usize,
    p: StepReport,
) -> Result<(), ApiError> {
    let progress = json!({
        "type": format!("{prefix}.progress"),
        "step": p.step,
        "total_steps": p.total_steps,
        "elapsed_s": p.elapsed.as_secs_f64(),
        "created_at": unix_now(),
    });
    events.progress(&format!("{prefix}.progress"), &progress)?;
    if p.partial_images.is_empty() {
        return Ok(());
    }
    let name = format!("{prefix}.partial_image");
    for (index, bytes) in p.partial_images.iter().enumerate() {
        let mut data = image_event(&name, bytes, meta, index);
        data["partial_image_index"] = json!(*previews);
        events.send(&name, &data).await?;
    }
    *previews += 1;
    Ok(())
}

/// The fields a partial or completed image event shares (OpenAI's shape; `index`: the image's
/// place in the request, a zimage field).
fn image_event(name: &str, bytes: &[u8], meta: &Meta, index: usize) -> Value {
    json!({
        "type": name,
        "b64_json": b64(bytes),
        "created_at": unix_now(),
        "size": meta.size,
        "quality": meta.quality,
        "background": "opaque",
        "output_format": meta.format.name(),
        "index": index,
    })
}

/// The `completed` events, one per image; the images sent, or the client's going away.
async fn send_images(events: &EventSender, meta: &Meta, prefix: &str, f: Finished) -> Result<usize, ApiError> {
    let name = format!("{prefix}.completed");
    let count = f.images.len();
    for (index, bytes) in f.images.iter().enumerate() {
        let mut data = image_event(&name, bytes, meta, index);
        data["usage"] = usage(f.prompt_tokens);
        data["seed"] = json!(f.seed);
        if let Some(p) = &f.enhanced_prompt {
            data["revised_prompt"] = Value::String(p.clone());
        }
        events.send(&name, &data).await?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::OutputFormat;

    fn state(request_timeout: Duration) -> Arc<AppState> {
        let settings = Settings {
            max_body_bytes: 1 << 20,
            max_input_side: 64,
            pixels: PixelLimits { image: 1 << 20, batch: 1 << 22 },
            decode_slots: 1,
            decode_delay: Duration::ZERO,
            body_timeout: Duration::from_secs(1),
            body_total_timeout: Duration::from_secs(60),
            request_timeout,
            public_url: None,
        };
        let store = ImageStore::new(Duration::from_secs(1), 1);
        Arc::new(AppState::new(vec!["m".into()], &[], Arc::default(), store, settings))
    }

    fn meta() -> Meta {
        Meta {
            stream: true,
            response_format: ResponseFormat::B64Json,
            format: OutputFormat::Png,
            size: "64x64".into(),
            quality: "medium",
            edit: false,
        }
    }

    fn finished(images: usize) -> Finished {
        Finished {
            images: vec![vec![7; 1000]; images],
            seed: 1,
            enhanced_prompt: None,
            prompt_tokens: 3,
            queue_wait: Duration::ZERO,
            generation: Duration::ZERO,
        }
    }

    /// Runs a finished generation of `images` images through `forward_events` into a stream
    /// of 16 events; returns the events the client would read (all of them when `read`, else
    /// none: a client that never reads), how long the forwarding took, and the metrics.
    async fn forward(images: usize, read: bool, timeout: Duration) -> (Vec<Event>, Duration, String) {
        let state = state(timeout);
        let (reply_tx, reply) = oneshot::channel();
        let (progress_tx, progress) = mpsc::unbounded_channel();
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = Arc::new(JobCancel::default());
        for step in 1..=40 {
            let report = StepReport { step, total_steps: 40, elapsed: Duration::ZERO, partial_images: Vec::new() };
            progress_tx.send(report).unwrap();
        }
        reply_tx.send(Ok(finished(images))).unwrap_or_else(|_| panic!("the reply is received"));
        let started = Instant::now();
        let task = tokio::spawn(forward_events(
            Arc::clone(&state),
            "m".into(),
            meta(),
            reply,
            progress,
            Some(Arc::clone(&cancel)),
            tx,
            LogInfo::default(),
        ));
        let mut events = Vec::new();
        if read {
            while let Some(event) = rx.recv().await {
                events.push(event);
            }
        }
        task.await.unwrap();
        let took = started.elapsed();
        drop(rx);
        (events, took, state.metrics.render(&[], true, false))
    }

    fn has_line(metrics: &str, line: &str) -> bool {
        metrics.lines().any(|l| l == line)
    }

    #[tokio::test]
    async fn a_stream_nobody_reads_ends_at_the_deadline_as_the_client_gone() {
        // 40 progress events and 20 images into 16 slots nobody empties: the progress events
        // that find no room are dropped, the images wait until the deadline, then are dropped.
        let (_, took, metrics) = forward(20, false, Duration::from_millis(300)).await;
        assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(3), "{took:?}");
        assert!(has_line(&metrics, "zimage_errors_total{kind=\"cancelled\"} 1"), "{metrics}");
        assert!(
            has_line(&metrics, "zimage_requests_total{route=\"/v1/images/generations\",status=\"499\"} 1"),
            "{metrics}"
        );
        assert!(!metrics.contains("zimage_images_total{"), "no image counted as served:\n{metrics}");

        // A client that reads gets every image, and the progress events that found room.
        let (events, _, metrics) = forward(20, true, Duration::from_secs(30)).await;
        let names: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
        let progress = names.iter().take_while(|e| e.contains("image_generation.progress")).count();
        assert!((16..=40).contains(&progress), "{progress} progress events");
        assert_eq!(names.len(), progress + 20);
        assert!(names[progress..].iter().all(|e| e.contains("image_generation.completed")));
        assert!(has_line(&metrics, "zimage_images_total{model=\"m\"} 20"), "{metrics}");
        assert!(
            has_line(&metrics, "zimage_requests_total{route=\"/v1/images/generations\",status=\"200\"} 1"),
            "{metrics}"
        );
    }

    #[test]
    fn keys_match_exactly() {
        let keys: Vec<[u8; 32]> = ["alpha", "beta"].iter().map(|k| Sha256::digest(k.as_bytes()).into()).collect();
        assert!(key_matches(&keys, "alpha"));
        assert!(key_matches(&keys, "beta"));
        for wrong in ["", "alph", "alphaa", "Beta", "gamma"] {
            assert!(!key_matches(&keys, wrong), "{wrong}");
        }
        assert!(!key_matches(&[], "alpha"));
    }
}
