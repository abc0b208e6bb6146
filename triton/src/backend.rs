//! The exported `TRITONBACKEND_*` entry points. Each one runs its body under
//! `catch_unwind`: a panic becomes a Triton error, never an unwind into the server. Requests
//! are run one by one, each to its own response; a request's failure is that response's error.

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;

use zimage::{ErrorKind, Generation, Pipeline, Progress};

use crate::api::{self, Api, BackendError};
use crate::config::ModelSettings;
use crate::interface::DataType;
use crate::request::{self, Limits, Tensor};

/// What a model keeps between its instances' calls.
struct ModelState {
    name: String,
    version: u64,
    settings: ModelSettings,
    /// The `loras` adapters, read once for all instances.
    loras: Vec<zimage::LoraSetting>,
}

/// One instance: its own pipeline on its own device.
struct InstanceState {
    name: String,
    pipeline: Pipeline,
    limits: Limits,
    /// This instance's request counter in /metrics, when metrics are on.
    requests: Option<MetricHandle>,
}

struct MetricHandle(*mut api::Metric);
// SAFETY: Triton's metric objects may be used from any thread.
unsafe impl Send for MetricHandle {}
unsafe impl Sync for MetricHandle {}

/// The per-instance request counter family, made when the backend is initialised.
static FAMILY: Mutex<Option<FamilyHandle>> = Mutex::new(None);
struct FamilyHandle(*mut api::MetricFamily);
// SAFETY: as MetricHandle.
unsafe impl Send for FamilyHandle {}

/// The metric family's name in /metrics.
pub const REQUESTS_METRIC: &str = "zimage_instance_requests";

type Entry = Result<(), BackendError>;

/// Runs an entry point's body: its error, or a panic, becomes a Triton error object.
fn entry(what: &str, body: impl FnOnce(&'static Api) -> Entry) -> *mut api::TritonError {
    let api = match Api::get() {
        Ok(api) => api,
        Err(message) => return error_without_api(what, message),
    };
    match catch_unwind(AssertUnwindSafe(|| body(api))) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => api.error(e.code, &format!("zimage backend: {}", e.message)),
        Err(panic) => {
            api.error(api::ERROR_INTERNAL, &format!("zimage backend: {what} panicked: {}", panic_message(&*panic)))
        }
    }
}

/// When the function table is incomplete, the one function that makes an error may still be
/// there; otherwise the message can only go to stderr.
fn error_without_api(what: &str, message: &str) -> *mut api::TritonError {
    type ErrorNew = unsafe extern "C" fn(api::ErrorCode, *const c_char) -> *mut api::TritonError;
    let text = api::c_string(&format!("zimage backend: {what}: {message}"));
    // SAFETY: dlsym with a NUL-terminated name; the symbol, if found, is Triton's ErrorNew.
    unsafe {
        let address = libc::dlsym(libc::RTLD_DEFAULT, c"TRITONSERVER_ErrorNew".as_ptr());
        if address.is_null() {
            eprintln!("{}", text.to_string_lossy());
            return std::ptr::null_mut();
        }
        let error_new = std::mem::transmute::<*mut c_void, ErrorNew>(address);
        error_new(api::ERROR_UNSUPPORTED, text.as_ptr())
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// `steady_clock` nanoseconds, the clock Triton's statistics use.
fn now_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A string Triton returns (owned by Triton).
fn get_string(
    api: &Api,
    what: &str,
    call: impl FnOnce(*mut *const c_char) -> *mut api::TritonError,
) -> Result<String, BackendError> {
    let mut p: *const c_char = std::ptr::null();
    api.check(what, call(&mut p))?;
    // SAFETY: Triton returned a valid string or NULL.
    Ok(unsafe { api::string_at(p) }.unwrap_or_default())
}

/// The SDK's error kinds as Triton error codes.
fn sdk_error(e: zimage::Error) -> BackendError {
    let code = match e.kind() {
        ErrorKind::InvalidRequest | ErrorKind::Image | ErrorKind::Package => api::ERROR_INVALID_ARG,
        ErrorKind::Cancelled => return cancelled(),
        ErrorKind::Runtime | ErrorKind::Provider => api::ERROR_UNAVAILABLE,
        _ => api::ERROR_INTERNAL,
    };
    BackendError::new(code, e.to_string())
}

/// The answer to a cancelled request: its run stopped at the step where the cancellation was
/// seen (or never started), and the instance moved on.
fn cancelled() -> BackendError {
    BackendError::new(api::ERROR_CANCELLED, "the request was cancelled; its run stopped")
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_Initialize(backend: *mut api::Backend) -> *mut api::TritonError {
    entry("TRITONBACKEND_Initialize", |api| {
        let (mut major, mut minor) = (0u32, 0u32);
        // SAFETY: out-parameters.
        api.check("TRITONBACKEND_ApiVersion", unsafe { (api.backend_api_version)(&mut major, &mut minor) })?;
        let (want_major, want_minor) = api::BACKEND_API_VERSION;
        if major != want_major || minor < want_minor {
            return Err(BackendError::new(
                api::ERROR_UNSUPPORTED,
                format!("Triton's backend API is {major}.{minor}; this backend was built for {want_major}.{want_minor} (needs {want_major}.x with x >= {want_minor})"),
            ));
        }
        let (mut server_major, mut server_minor) = (0u32, 0u32);
        // SAFETY: out-parameters.
        api.check("TRITONSERVER_ApiVersion", unsafe {
            (api.server_api_version)(&mut server_major, &mut server_minor)
        })?;
        let (want_major, want_minor) = api::SERVER_API_VERSION;
        if server_major != want_major || server_minor < want_minor {
            return Err(BackendError::new(
                api::ERROR_UNSUPPORTED,
                format!("Triton's server API is {server_major}.{server_minor}; this backend was built for {want_major}.{want_minor}"),
            ));
        }
        api.check_enums().map_err(|e| BackendError::new(api::ERROR_UNSUPPORTED, e))?;
        // SAFETY: the backend handle Triton passed.
        let name = get_string(api, "TRITONBACKEND_BackendName", |p| unsafe { (api.backend_name)(backend, p) })?;
        api.log(
            api::LOG_INFO,
            &format!(
                "zimage backend {} ({name}): Triton backend API {major}.{minor}, server API {server_major}.{server_minor}; built for {}.{}",
                zimage::VERSION,
                api::BACKEND_API_VERSION.0,
                api::BACKEND_API_VERSION.1
            ),
        );
        create_metric_family(api);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_Finalize(_backend: *mut api::Backend) -> *mut api::TritonError {
    entry("TRITONBACKEND_Finalize", |api| {
        if let Some(family) = FAMILY.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: the family made in Initialize; its metrics were deleted with the instances.
            let _ = api.take_error(unsafe { (api.metric_family_delete)(family.0) });
        }
        Ok(())
    })
}

fn create_metric_family(api: &Api) {
    let mut guard = FAMILY.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_some() {
        return;
    }
    let mut family: *mut api::MetricFamily = std::ptr::null_mut();
    let name = api::c_string(REQUESTS_METRIC);
    let description = api::c_string("Requests executed by each zimage model instance (success or failure)");
    // SAFETY: valid out-pointer and strings (copied by Triton).
    let error =
        unsafe { (api.metric_family_new)(&mut family, api::METRIC_KIND_COUNTER, name.as_ptr(), description.as_ptr()) };
    match api.take_error(error) {
        None => *guard = Some(FamilyHandle(family)),
        // Metrics off (--allow-metrics=false): the backend works without its counter.
        Some((_, message)) => api.log(api::LOG_WARN, &format!("zimage backend: no per-instance metric: {message}")),
    }
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInitialize(model: *mut api::Model) -> *mut api::TritonError {
    entry("TRITONBACKEND_ModelInitialize", |api| {
        // SAFETY: the model handle Triton passed; out-parameters.
        let name = get_string(api, "TRITONBACKEND_ModelName", |p| unsafe { (api.model_name)(model, p) })?;
        let mut version = 0u64;
        api.check("TRITONBACKEND_ModelVersion", unsafe { (api.model_version)(model, &mut version) })?;
        let mut artifact = 0u32;
        let location = get_string(api, "TRITONBACKEND_ModelRepository", |p| unsafe {
            (api.model_repository)(model, &mut artifact, p)
        })?;
        if artifact != api::ARTIFACT_FILESYSTEM {
            return Err(BackendError::new(api::ERROR_UNSUPPORTED, "the model must come from a file-system repository"));
        }
        let mut message: *mut api::Message = std::ptr::null_mut();
        api.check("TRITONBACKEND_ModelConfig", unsafe { (api.model_config)(model, 1, &mut message) })?;
        let config = api.message_json(message)?;
        let version_dir = PathBuf::from(location).join(version.to_string());
        let settings = ModelSettings::from_config(&config, &version_dir)
            .map_err(|e| BackendError::invalid(format!("model {name}: {e}")))?;
        api.log(
            api::LOG_INFO,
            &format!("zimage backend: model {name} version {version}: package {}", settings.package.display()),
        );
        let loras = settings
            .loras
            .iter()
            .map(zimage::LoraFile::load)
            .collect::<zimage::Result<Vec<_>>>()
            .map_err(|e| BackendError { message: format!("model {name}: {}", e.message_of()), ..sdk_error(e) })?;
        let state = Box::new(ModelState { name, version, settings, loras });
        let raw = Box::into_raw(state);
        // SAFETY: Triton keeps the pointer until ModelFinalize, which frees it.
        let set = api.check("TRITONBACKEND_ModelSetState", unsafe { (api.model_set_state)(model, raw.cast()) });
        if set.is_err() {
            // SAFETY: not handed over; freed once here.
            drop(unsafe { Box::from_raw(raw) });
        }
        set
    })
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelFinalize(model: *mut api::Model) -> *mut api::TritonError {
    entry("TRITONBACKEND_ModelFinalize", |api| {
        let mut state: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-parameter; the state is the box made in ModelInitialize, freed once.
        api.check("TRITONBACKEND_ModelState", unsafe { (api.model_state)(model, &mut state) })?;
        if !state.is_null() {
            drop(unsafe { Box::from_raw(state.cast::<ModelState>()) });
        }
        Ok(())
    })
}

/// The model state behind a model handle.
///
/// # Safety
/// Between ModelInitialize and ModelFinalize of `model`.
unsafe fn model_state<'a>(api: &Api, model: *mut api::Model) -> Result<&'a ModelState, BackendError> {
    let mut state: *mut c_void = std::ptr::null_mut();
    api.check("TRITONBACKEND_ModelState", (api.model_state)(model, &mut state))?;
    state.cast::<ModelState>().as_ref().ok_or_else(|| BackendError::internal("the model has no state"))
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceInitialize(instance: *mut api::ModelInstance) -> *mut api::TritonError {
    entry("TRITONBACKEND_ModelInstanceInitialize", |api| {
        // SAFETY: the instance handle Triton passed; out-parameters.
        let name = get_string(api, "TRITONBACKEND_ModelInstanceName", |p| unsafe { (api.instance_name)(instance, p) })?;
        let mut kind = 0u32;
        api.check("TRITONBACKEND_ModelInstanceKind", unsafe { (api.instance_kind)(instance, &mut kind) })?;
        let mut device_id = 0i32;
        api.check("TRITONBACKEND_ModelInstanceDeviceId", unsafe {
            (api.instance_device_id)(instance, &mut device_id)
        })?;
        let mut model: *mut api::Model = std::ptr::null_mut();
        api.check("TRITONBACKEND_ModelInstanceModel", unsafe { (api.instance_model)(instance, &mut model) })?;
        // SAFETY: the instance's model outlives the instance.
        let model = unsafe { model_state(api, model)? };
        let settings = &model.settings;
        let device = settings
            .instance_device(kind, device_id)
            .map_err(|e| BackendError::invalid(format!("instance {name}: {e}")))?;
        let mut options = settings.load_options(device);
        options.loras = model.loras.clone();
        let pipeline = Pipeline::load(&settings.package, &options).map_err(|e| BackendError {
            message: format!("instance {name}: loading {}: {}", settings.package.display(), e.message_of()),
            ..sdk_error(e)
        })?;
        for (graph, reason) in pipeline.provider_fallbacks() {
            api.log(api::LOG_WARN, &format!("zimage backend: instance {name}: {graph:?} runs on the CPU: {reason}"));
        }
        let providers = pipeline.providers();
        api.log(
            api::LOG_INFO,
            &format!(
                "zimage backend: instance {name} of {} loaded on {device} in {:.2} s (transformer on {})",
                model.name,
                pipeline.load_time().as_secs_f64(),
                providers.transformer
            ),
        );
        let requests = instance_metric(api, &model.name, model.version, &name);
        let manifest = pipeline.manifest();
        let limits = Limits {
            max_prompt_bytes: settings.max_prompt_bytes,
            max_count: settings.max_count,
            controlnet: settings.controlnet.is_some(),
            size_multiple: manifest.size_multiple(),
            max_references: manifest
                .edit
                .as_ref()
                .filter(|_| manifest.supports("edit"))
                .map_or(0, |edit| edit.reference.max_images),
        };
        let raw = Box::into_raw(Box::new(InstanceState { name, pipeline, limits, requests }));
        // SAFETY: Triton keeps the pointer until ModelInstanceFinalize, which frees it.
        let set =
            api.check("TRITONBACKEND_ModelInstanceSetState", unsafe { (api.instance_set_state)(instance, raw.cast()) });
        if set.is_err() {
            // SAFETY: not handed over; freed once here.
            free_instance(api, unsafe { Box::from_raw(raw) });
        }
        set
    })
}

trait MessageOf {
    fn message_of(&self) -> String;
}

impl MessageOf for zimage::Error {
    /// The error and its sources on one line.
    fn message_of(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            let s_text = s.to_string();
            if !text.contains(&s_text) {
                text.push_str(": ");
                text.push_str(&s_text);
            }
            source = s.source();
        }
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

fn instance_metric(api: &Api, model: &str, version: u64, instance: &str) -> Option<MetricHandle> {
    let family = FAMILY.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|f| f.0)?;
    let labels = [("model", model.to_string()), ("version", version.to_string()), ("instance", instance.to_string())];
    let names: Vec<_> = labels.iter().map(|(k, _)| api::c_string(k)).collect();
    let values: Vec<_> = labels.iter().map(|(_, v)| api::c_string(v)).collect();
    // SAFETY: parameters copy their strings; they are deleted after the metric is made.
    unsafe {
        let parameters: Vec<*mut api::Parameter> = names
            .iter()
            .zip(&values)
            .map(|(k, v)| (api.parameter_new)(k.as_ptr(), api::PARAMETER_STRING, v.as_ptr().cast()))
            .collect();
        let mut metric: *mut api::Metric = std::ptr::null_mut();
        let made = if parameters.iter().any(|p| p.is_null()) {
            None
        } else {
            let pointers: Vec<*const api::Parameter> = parameters.iter().map(|p| p.cast_const()).collect();
            let error = (api.metric_new)(&mut metric, family, pointers.as_ptr(), pointers.len() as u64);
            match api.take_error(error) {
                None => Some(MetricHandle(metric)),
                Some((_, message)) => {
                    api.log(api::LOG_WARN, &format!("zimage backend: no request counter for {instance}: {message}"));
                    None
                }
            }
        };
        for p in parameters.into_iter().filter(|p| !p.is_null()) {
            (api.parameter_delete)(p);
        }
        made
    }
}

fn free_instance(api: &Api, state: Box<InstanceState>) {
    if let Some(metric) = &state.requests {
        // SAFETY: the metric made for this instance, deleted once.
        let _ = api.take_error(unsafe { (api.metric_delete)(metric.0) });
    }
    drop(state);
}

/// Hands the pages freed with a pipeline back to the system. Triton loads and unloads models
/// on whichever of its threads is free, and glibc gives each thread its own malloc arena that
/// keeps freed memory for reuse by that thread only: without this, each reload on a new thread
/// grows the resident size until every arena holds a pipeline's worth of free pages.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of every arena to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceFinalize(instance: *mut api::ModelInstance) -> *mut api::TritonError {
    entry("TRITONBACKEND_ModelInstanceFinalize", |api| {
        let mut state: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-parameter; the state is the box made in ModelInstanceInitialize.
        api.check("TRITONBACKEND_ModelInstanceState", unsafe { (api.instance_state)(instance, &mut state) })?;
        if !state.is_null() {
            let state = unsafe { Box::from_raw(state.cast::<InstanceState>()) };
            api.log(api::LOG_VERBOSE, &format!("zimage backend: instance {} finalised", state.name));
            free_instance(api, state);
            release_free_memory();
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    instance: *mut api::ModelInstance,
    requests: *mut *mut api::Request,
    request_count: u32,
) -> *mut api::TritonError {
    // Until the requests are taken an error hands them back to Triton; once taken, every
    // request gets its response and is released here, and the call succeeds.
    entry("TRITONBACKEND_ModelInstanceExecute", |api| {
        let mut state: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-parameter; the state lives until ModelInstanceFinalize, which Triton does
        // not call while this instance executes.
        api.check("TRITONBACKEND_ModelInstanceState", unsafe { (api.instance_state)(instance, &mut state) })?;
        let state = unsafe { state.cast::<InstanceState>().as_ref() }
            .ok_or_else(|| BackendError::internal("the instance has no state"))?;
        let requests: Vec<*mut api::Request> = if request_count == 0 || requests.is_null() {
            Vec::new()
        } else {
            // SAFETY: Triton passes `request_count` request pointers.
            unsafe { std::slice::from_raw_parts(requests, request_count as usize) }.to_vec()
        };
        let exec_start = now_ns();
        let mut succeeded = 0u64;
        let mut compute = (u64::MAX, 0u64);
        for request in requests {
            let (ok, compute_start, compute_end) = execute_one(api, instance, state, request, exec_start);
            succeeded += ok as u64;
            compute = (compute.0.min(compute_start), compute.1.max(compute_end));
        }
        if succeeded > 0 {
            // SAFETY: statistics for this instance; the requests were reported one by one.
            let error = unsafe {
                (api.instance_report_batch_statistics)(instance, succeeded, exec_start, compute.0, compute.1, now_ns())
            };
            if let Some((_, message)) = api.take_error(error) {
                api.log(api::LOG_ERROR, &format!("zimage backend: batch statistics: {message}"));
            }
        }
        Ok(())
    })
}

/// Runs one request to its response, reports its statistics and releases it. Returns whether
/// it succeeded and its compute start and end.
fn execute_one(
    api: &Api,
    instance: *mut api::ModelInstance,
    state: &InstanceState,
    request: *mut api::Request,
    exec_start: u64,
) -> (bool, u64, u64) {
    let mut response: *mut api::Response = std::ptr::null_mut();
    // SAFETY: a request this call owns.
    let made = api.check("TRITONBACKEND_ResponseNew", unsafe { (api.response_new)(&mut response, request) });
    let compute_start = now_ns();
    let outcome: Result<(), BackendError> = match made {
        Err(e) => Err(e),
        Ok(()) => catch_unwind(AssertUnwindSafe(|| run(api, state, request, response))).unwrap_or_else(|panic| {
            Err(BackendError::internal(format!("request panicked: {}", panic_message(&*panic))))
        }),
    };
    let compute_end = now_ns();
    if let Err(e) = &outcome {
        // SAFETY: the request is still held.
        let id =
            get_string(api, "TRITONBACKEND_RequestId", |p| unsafe { (api.request_id)(request, p) }).unwrap_or_default();
        api.log(
            api::LOG_VERBOSE,
            &format!("zimage backend: instance {}: request {id:?} failed: {}", state.name, e.message),
        );
    }
    if let Some(metric) = &state.requests {
        // SAFETY: this instance's metric.
        let _ = api.take_error(unsafe { (api.metric_increment)(metric.0, 1.0) });
    }
    let success = outcome.is_ok();
    // Statistics first, then the response: a client that has its answer finds it counted in
    // /metrics and the statistics already.
    // SAFETY: the request is still held.
    let error = unsafe {
        (api.instance_report_statistics)(instance, request, success, exec_start, compute_start, compute_end, now_ns())
    };
    if let Some((_, message)) = api.take_error(error) {
        api.log(api::LOG_ERROR, &format!("zimage backend: request statistics: {message}"));
    }
    if !response.is_null() {
        let error = match &outcome {
            Ok(()) => std::ptr::null_mut(),
            Err(e) => api.error(e.code, &e.message),
        };
        // SAFETY: the response made above, handed to Triton here; the error stays ours.
        let sent = unsafe { (api.response_send)(response, api::RESPONSE_COMPLETE_FINAL, error) };
        if !error.is_null() {
            // SAFETY: ResponseSend leaves the error with the caller.
            unsafe { (api.error_delete)(error) };
        }
        if let Some((_, message)) = api.take_error(sent) {
            api.log(api::LOG_ERROR, &format!("zimage backend: sending a response: {message}"));
        }
    }
    // SAFETY: released once, after its response and statistics.
    if let Some((_, message)) = api.take_error(unsafe { (api.request_release)(request, api::REQUEST_RELEASE_ALL) }) {
        api.log(api::LOG_ERROR, &format!("zimage backend: releasing a request: {message}"));
    }
    (success, compute_start, compute_end)
}

/// Reads the inputs, generates or edits, and fills the response's requested outputs.
fn run(
    api: &Api,
    state: &InstanceState,
    request: *mut api::Request,
    response: *mut api::Response,
) -> Result<(), BackendError> {
    // SAFETY: the request is held until execute_one releases it, after this returns.
    let is_cancelled = || unsafe { api.request_cancelled(request) };
    if is_cancelled() {
        return Err(cancelled());
    }
    let mut inputs = read_inputs(api, request, &state.limits)?;
    let outputs = requested_outputs(api, request)?;
    let pipeline = &state.pipeline;
    // Asked after every denoising step: a cancelled request stops there (the SDK returns
    // Error::Cancelled) instead of keeping its instance busy to the last step.
    let mut progress = |_: &Progress| !is_cancelled();
    let generation = if request::is_edit(&inputs) {
        let edit = request::build_edit_request(&inputs, &state.limits, pipeline.manifest(), pipeline.package_dir())
            .map_err(|e| BackendError::invalid(e.0))?;
        pipeline.edit(&edit, Some(&mut progress))
    } else {
        let generate = request::build_request(&mut inputs, &state.limits, &pipeline.manifest().generation_defaults)
            .map_err(|e| BackendError::invalid(e.0))?;
        pipeline.generate(&generate, Some(&mut progress))
    }
    .map_err(sdk_error)?;
    write_outputs(api, response, &outputs, &generation)
}

/// Copies the request's inputs out of Triton's buffers. Each input's declared size is checked
/// against what this model can take ([`Limits::check_input_size`]) before its copy is
/// allocated, and the allocation itself may fail with an error: Triton passes on whatever a
/// client sent (gigabytes through shared memory), and a failed allocation would abort the
/// server.
fn read_inputs(
    api: &Api,
    request: *mut api::Request,
    limits: &Limits,
) -> Result<HashMap<String, Tensor>, BackendError> {
    let mut count = 0u32;
    // SAFETY: the request is held; every pointer Triton returns is valid until it is released,
    // and the data is copied out before that.
    unsafe {
        api.check("TRITONBACKEND_RequestInputCount", (api.request_input_count)(request, &mut count))?;
        let mut inputs = HashMap::new();
        for index in 0..count {
            let mut input: *mut api::Input = std::ptr::null_mut();
            api.check("TRITONBACKEND_RequestInputByIndex", (api.request_input_by_index)(request, index, &mut input))?;
            let mut name: *const c_char = std::ptr::null();
            let mut data_type = api::TYPE_INVALID;
            let mut shape: *const i64 = std::ptr::null();
            let (mut dims, mut byte_size, mut buffers) = (0u32, 0u64, 0u32);
            api.check(
                "TRITONBACKEND_InputProperties",
                (api.input_properties)(
                    input,
                    &mut name,
                    &mut data_type,
                    &mut shape,
                    &mut dims,
                    &mut byte_size,
                    &mut buffers,
                ),
            )?;
            let name = api::string_at(name).unwrap_or_default();
            let data_type = DataType::from_code(data_type).ok_or_else(|| {
                let type_name = api::string_at((api.data_type_string)(data_type)).unwrap_or_default();
                BackendError::invalid(format!("input {name} has data type {type_name}, which this model does not take"))
            })?;
            let shape = if dims == 0 || shape.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(shape, dims as usize).to_vec()
            };
            // Where the data is (GPU memory cannot be read here) and whether this model could
            // take that much of it, before anything is allocated for it.
            let buffer_at = |b: u32| -> Result<(*const c_void, u64), BackendError> {
                let mut buffer: *const c_void = std::ptr::null();
                let mut size = 0u64;
                let mut memory_type = api::MEMORY_CPU;
                let mut memory_id = 0i64;
                api.check(
                    "TRITONBACKEND_InputBuffer",
                    (api.input_buffer)(input, b, &mut buffer, &mut size, &mut memory_type, &mut memory_id),
                )?;
                if memory_type == api::MEMORY_GPU {
                    return Err(BackendError::new(
                        api::ERROR_UNSUPPORTED,
                        format!("input {name} is in GPU memory; send it in CPU memory"),
                    ));
                }
                Ok((buffer, size))
            };
            let first = if buffers > 0 { Some(buffer_at(0)?) } else { None };
            limits.check_input_size(&name, byte_size).map_err(|e| BackendError::invalid(e.0))?;
            let mut data = Vec::new();
            data.try_reserve_exact(byte_size as usize).map_err(|_| {
                BackendError::new(
                    api::ERROR_UNAVAILABLE,
                    format!("input {name}: no memory for its {byte_size} bytes; try again later"),
                )
            })?;
            for b in 0..buffers {
                let (buffer, size) = match (b, first) {
                    (0, Some(first)) => first,
                    _ => buffer_at(b)?,
                };
                // Never more than declared: the copy stays within the memory reserved above.
                if size > byte_size - data.len() as u64 {
                    return Err(BackendError::invalid(format!(
                        "input {name}: its buffers hold more than the {byte_size} bytes declared"
                    )));
                }
                if size > 0 {
                    if buffer.is_null() {
                        return Err(BackendError::internal(format!("input {name}: buffer {b} is NULL")));
                    }
                    data.extend_from_slice(std::slice::from_raw_parts(buffer.cast::<u8>(), size as usize));
                }
            }
            if data.len() as u64 != byte_size {
                return Err(BackendError::invalid(format!(
                    "input {name}: {} bytes in its buffers, {byte_size} declared",
                    data.len()
                )));
            }
            inputs.insert(name, Tensor { data_type, shape, data });
        }
        Ok(inputs)
    }
}

fn requested_outputs(api: &Api, request: *mut api::Request) -> Result<Vec<String>, BackendError> {
    let mut count = 0u32;
    // SAFETY: the request is held.
    api.check("TRITONBACKEND_RequestOutputCount", unsafe { (api.request_output_count)(request, &mut count) })?;
    (0..count)
        .map(|i| {
            get_string(api, "TRITONBACKEND_RequestOutputName", |p| unsafe { (api.request_output_name)(request, i, p) })
        })
        .collect()
}

fn write_outputs(
    api: &Api,
    response: *mut api::Response,
    outputs: &[String],
    generation: &Generation,
) -> Result<(), BackendError> {
    for name in outputs {
        let (data_type, shape, bytes): (DataType, Vec<i64>, Vec<u8>) = match name.as_str() {
            "IMAGE" => {
                let (shape, bytes) = request::image_output(&generation.images).map_err(BackendError::internal)?;
                (DataType::Uint8, shape.to_vec(), bytes)
            }
            "SEED" => (DataType::Uint64, vec![1], generation.seed.to_le_bytes().to_vec()),
            other => return Err(BackendError::invalid(format!("unknown output {other}"))),
        };
        let c_name = api::c_string(name);
        let mut output: *mut api::Output = std::ptr::null_mut();
        let mut buffer: *mut c_void = std::ptr::null_mut();
        let mut memory_type = api::MEMORY_CPU;
        let mut memory_id = 0i64;
        // SAFETY: the response is ours until sent; the buffer Triton returns holds
        // `bytes.len()` bytes.
        unsafe {
            api.check(
                "TRITONBACKEND_ResponseOutput",
                (api.response_output)(
                    response,
                    &mut output,
                    c_name.as_ptr(),
                    data_type.code(),
                    shape.as_ptr(),
                    shape.len() as u32,
                ),
            )?;
            api.check(
                "TRITONBACKEND_OutputBuffer",
                (api.output_buffer)(output, &mut buffer, bytes.len() as u64, &mut memory_type, &mut memory_id),
            )?;
            if memory_type == api::MEMORY_GPU {
                return Err(BackendError::new(
                    api::ERROR_UNSUPPORTED,
                    format!("output {name} was asked for in GPU memory"),
                ));
            }
            if !bytes.is_empty() {
                if buffer.is_null() {
                    return Err(BackendError::internal(format!("output {name}: Triton gave no buffer")));
                }
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buffer.cast::<u8>(), bytes.len());
            }
        }
    }
    Ok(())
}
