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
use tokio::sync::{mpsc, oneshot};
use tower_http::timeout::RequestBodyTimeoutLayer;
use zimage::{GenerateRequest, GrayImage, Progress};

use crate::api::{prepare, ControlInput, EditInput, ImageParams, Limits, Meta, Prepared, ResponseFormat};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::output::ImageStore;
use crate::workers::{CancelOnDrop, Finished, Job, JobCancel, ModelPool, SubmitError, Work};

/// Limits and settings the handlers apply.
pub struct Settings {
    pub max_body_bytes: usize,
    pub max_input_side: u32,
    /// Most output pixels per image (`--max-pixels`).
    pub max_pixels: u64,
    /// Longest wait for the next part of a request body (`--header-timeout`).
    pub body_timeout: Duration,
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

    /// Queued or running jobs over all models.
    pub fn busy(&self) -> i64 {
        self.models.get().map_or(0, |pools| pools.iter().map(|p| p.busy()).sum())
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
        // A client that stops sending its body: reading it fails (a 400) and the connection
        // closes, instead of a handler waiting for it forever.
        .layer(RequestBodyTimeoutLayer::new(state.settings.body_timeout))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), log_request))
        .with_state(state)
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
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
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
        let max_pixels = state.settings.max_pixels;
        let Some(encoded) = params.control_image.clone() else {
            return prepare(params, None, None, &limits(&pool, max_pixels, &|r| pool.checker.check_request(r)));
        };
        let controlnet = pool.checker.controlnet();
        let max_side = state.settings.max_input_side;
        // Decoding and resizing are CPU work: off the async threads.
        tokio::task::spawn_blocking(move || {
            let check = |r: &GenerateRequest| pool.checker.check_request(r);
            let limits = limits(&pool, max_pixels, &check);
            let bytes = decode_base64_file(&encoded).map_err(|e| e.with_param("control_image"))?;
            check_dimensions(&bytes, max_side, "control_image")?;
            let image =
                zimage::image_io::decode_rgb(&bytes).map_err(|e| ApiError::from_sdk(&e).with_param("control_image"))?;
            let name = "control_image".to_string();
            prepare(params, None, Some(ControlInput { image, name, controlnet }), &limits)
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
    match read_edit(&state, multipart).await {
        Ok(prepared) => run(state, id.0, prepared, &headers).await,
        Err(e) => e.into_response(),
    }
}

/// The limits `prepare` checks a request for `pool`'s model against; `check` is the model's
/// `check_request`.
fn limits<'a>(
    pool: &ModelPool,
    max_pixels: u64,
    check: &'a dyn Fn(&GenerateRequest) -> zimage::Result<()>,
) -> Limits<'a> {
    let manifest = pool.checker.manifest();
    Limits { defaults: manifest.generation_defaults, max_pixels, size_multiple: manifest.size_multiple(), check }
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
) -> Result<Prepared, ApiError> {
    state.available()?;
    let mut multipart =
        multipart.map_err(|e| ApiError::invalid(format!("expected a multipart/form-data body: {e}")))?;
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
    let (max_pixels, controlnet) = (state.settings.max_pixels, pool.checker.controlnet());
    if images.is_empty() {
        return Err(ApiError::invalid("'image' is required").with_param("image"));
    }
    if pool.checker.manifest().supports("edit") && pool.checker.manifest().edit.is_some() {
        return read_instruction_edit(state, pool, params, images, mask.is_some() || control.is_some()).await;
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
            Some(("control_image".to_string(), decode_base64_file(&text).map_err(|e| e.with_param("control_image"))?))
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
        let limits = limits(&pool, max_pixels, &check);
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
        prepare(params, Some(EditInput { image, image_name, mask }), control, &limits)
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
    mask_or_control: bool,
) -> Result<Prepared, ApiError> {
    if mask_or_control {
        return Err(ApiError::invalid(
            "this model edits by instruction: give the pictures as references and say what to change in the \
             prompt (no mask or control_image)",
        )
        .with_param("mask"));
    }
    let manifest = pool.checker.manifest();
    zimage::pipeline::edit::check_edit_package(manifest, pool.checker.package_dir(), pictures.len())
        .map_err(|e| ApiError::from_sdk(&e).with_param("image"))?;
    for (_, bytes) in &pictures {
        check_dimensions(bytes, state.settings.max_input_side, "image")?;
    }
    let max_pixels = state.settings.max_pixels;
    tokio::task::spawn_blocking(move || {
        let manifest = pool.checker.manifest();
        let mut references = Vec::with_capacity(pictures.len());
        for (index, (name, bytes)) in pictures.iter().enumerate() {
            let picture =
                zimage::pipeline::edit::decode_reference(manifest, pool.checker.package_dir(), bytes, index + 1)
                    .map_err(|e| ApiError::from_sdk(&e).with_param("image"))?;
            references.push((picture, zimage::ReferenceRecord::new(name, bytes)));
        }
        let defaults = &manifest.edit.as_ref().expect("an editing package").defaults;
        crate::api::prepare_edit(params, references, defaults, max_pixels, manifest.size_multiple())
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
    let (w, h) = zimage::image_io::image_size(bytes).map_err(|e| ApiError::from_sdk(&e).with_param(param))?;
    if w > max_side || h > max_side {
        return Err(ApiError::invalid(format!(
            "the {param} is {w}x{h}; this server accepts at most {max_side} pixels on a side"
        ))
        .with_code("image_too_large")
        .with_param(param));
    }
    Ok(())
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
type Queued = (Arc<ModelPool>, Reply, Option<mpsc::UnboundedReceiver<Progress>>, CancelOnDrop);

fn queue(state: &AppState, id: String, prepared: Prepared) -> Result<Queued, ApiError> {
    let pool = state.pool(prepared.model.as_deref())?;
    if prepared.spec.enhance && !pool.has_enhancer {
        return Err(
            ApiError::invalid(format!("the model '{}' has no prompt enhancer", pool.name)).with_param("enhance_prompt")
        );
    }
    match &prepared.spec.work {
        Work::Generate(request) => pool.checker.check_request(request),
        Work::Edit { request, .. } => pool.checker.check_edit(request),
    }
    .map_err(|e| ApiError::from_sdk(&e))?;
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
/// zimage event in OpenAI's shape), then one `image_generation.completed` per image (for edits
/// `image_edit.*`), or an `error` event. The stream holds the job's cancel guard: a client that
/// goes away cancels the generation.
fn stream(
    state: Arc<AppState>,
    pool: Arc<ModelPool>,
    meta: Meta,
    reply: Reply,
    progress: mpsc::UnboundedReceiver<Progress>,
    guard: CancelOnDrop,
    info: LogInfo,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(16);
    let cancel = guard.0.clone();
    tokio::spawn(forward_events(state, pool, meta, reply, progress, cancel, tx, info));
    let events = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|event| (Ok::<_, Infallible>(event), (rx, guard)))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

#[allow(clippy::too_many_arguments)] // one call site: the stream's own parts
async fn forward_events(
    state: Arc<AppState>,
    pool: Arc<ModelPool>,
    meta: Meta,
    reply: Reply,
    mut progress: mpsc::UnboundedReceiver<Progress>,
    cancel: Option<Arc<JobCancel>>,
    tx: mpsc::Sender<Event>,
    mut info: LogInfo,
) {
    let started = Instant::now();
    let prefix = if meta.edit { "image_edit" } else { "image_generation" };
    let path = if meta.edit { "/v1/images/edits" } else { "/v1/images/generations" };
    let send = |name: String, data: Value| {
        let tx = tx.clone();
        async move { tx.send(Event::default().event(name).data(data.to_string())).await.is_ok() }
    };
    let progress_event = |p: Progress| {
        json!({
            "type": format!("{prefix}.progress"),
            "step": p.step,
            "total_steps": p.total_steps,
            "elapsed_s": p.elapsed.as_secs_f64(),
            "created_at": unix_now(),
        })
    };
    let limit = state.settings.request_timeout;
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    tokio::pin!(reply);
    let result = loop {
        tokio::select! {
            Some(p) = progress.recv() => {
                if !send(format!("{prefix}.progress"), progress_event(p)).await {
                    // The client is gone; the dropped stream already cancelled the job.
                    break Err(ApiError::cancelled());
                }
            }
            r = &mut reply => break r.unwrap_or_else(|_| Err(ApiError::internal("the worker ended without an answer"))),
            _ = &mut deadline => {
                if let Some(c) = &cancel {
                    c.cancel();
                }
                break Err(ApiError::timeout(limit.as_secs()));
            }
        }
    };
    // Steps reported before the answer came.
    while let Ok(p) = progress.try_recv() {
        let _ = send(format!("{prefix}.progress"), progress_event(p)).await;
    }
    let status = match result {
        Ok(f) => {
            info.seed = Some(f.seed);
            info.queue_wait = Some(f.queue_wait);
            info.generation = Some(f.generation);
            let count = f.images.len();
            for (index, bytes) in f.images.into_iter().enumerate() {
                let name = format!("{prefix}.completed");
                let mut data = json!({
                    "type": name,
                    "b64_json": b64(&bytes),
                    "created_at": unix_now(),
                    "size": meta.size,
                    "quality": meta.quality,
                    "background": "opaque",
                    "output_format": meta.format.name(),
                    "usage": usage(f.prompt_tokens),
                    "index": index,
                    "seed": f.seed,
                });
                if let Some(p) = &f.enhanced_prompt {
                    data["revised_prompt"] = Value::String(p.clone());
                }
                let _ = send(name, data).await;
            }
            state.metrics.images(&pool.name, count as u64);
            Ok(())
        }
        Err(e) => {
            let mut body = e.body();
            body["type"] = Value::String("error".into());
            let _ = send("error".into(), body).await;
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

#[cfg(test)]
mod tests {
    use super::*;

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
