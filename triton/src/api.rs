//! The part of Triton's C API this backend uses, written by hand from `tritonbackend.h` and
//! `tritonserver.h` of triton-inference-server/core at tag r24.10 (commit
//! bfec7c61dc0939433f64f14e89b1973073eac8ba), the release of Triton 2.51.0: backend API 1.19,
//! server API 1.34. See `triton/README.md`.
//!
//! The functions are not linked at build time: they are looked up in the server process when
//! the backend is initialised ([`Api::get`]), so the crate builds and its unit tests run
//! without Triton, and a server that lacks one of them fails to load the backend with the
//! missing name instead of failing inside the dynamic loader. The enum values below are
//! checked against the running server's own names for them ([`Api::check_enums`]).

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;

/// The backend API version this backend is written against (`TRITONBACKEND_API_VERSION_*`).
pub const BACKEND_API_VERSION: (u32, u32) = (1, 19);
/// The server API version of the same release (`TRITONSERVER_API_VERSION_*`).
pub const SERVER_API_VERSION: (u32, u32) = (1, 34);

/// Opaque handles.
#[repr(C)]
pub struct TritonError {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Message {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Backend {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Model {
    _private: [u8; 0],
}
#[repr(C)]
pub struct ModelInstance {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Request {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Input {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Response {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Output {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Parameter {
    _private: [u8; 0],
}
#[repr(C)]
pub struct MetricFamily {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Metric {
    _private: [u8; 0],
}

// C enums are passed as plain integers: a value this code does not know must not become an
// invalid Rust enum.

/// `TRITONSERVER_DataType`.
pub type DataTypeCode = u32;
pub const TYPE_INVALID: DataTypeCode = 0;
pub const TYPE_UINT8: DataTypeCode = 2;
pub const TYPE_UINT64: DataTypeCode = 5;
pub const TYPE_INT32: DataTypeCode = 8;
pub const TYPE_FP32: DataTypeCode = 11;
pub const TYPE_FP64: DataTypeCode = 12;
pub const TYPE_BYTES: DataTypeCode = 13;

/// `TRITONSERVER_MemoryType`.
pub type MemoryType = u32;
pub const MEMORY_CPU: MemoryType = 0;
pub const MEMORY_CPU_PINNED: MemoryType = 1;
pub const MEMORY_GPU: MemoryType = 2;

/// `TRITONSERVER_InstanceGroupKind`.
pub type InstanceGroupKind = u32;
pub const INSTANCEGROUPKIND_AUTO: InstanceGroupKind = 0;
pub const INSTANCEGROUPKIND_CPU: InstanceGroupKind = 1;
pub const INSTANCEGROUPKIND_GPU: InstanceGroupKind = 2;
pub const INSTANCEGROUPKIND_MODEL: InstanceGroupKind = 3;

/// `TRITONSERVER_LogLevel`.
pub type LogLevel = u32;
pub const LOG_INFO: LogLevel = 0;
pub const LOG_WARN: LogLevel = 1;
pub const LOG_ERROR: LogLevel = 2;
pub const LOG_VERBOSE: LogLevel = 3;

/// `TRITONSERVER_Error_Code`.
pub type ErrorCode = u32;
pub const ERROR_UNKNOWN: ErrorCode = 0;
pub const ERROR_INTERNAL: ErrorCode = 1;
pub const ERROR_NOT_FOUND: ErrorCode = 2;
pub const ERROR_INVALID_ARG: ErrorCode = 3;
pub const ERROR_UNAVAILABLE: ErrorCode = 4;
pub const ERROR_UNSUPPORTED: ErrorCode = 5;
pub const ERROR_ALREADY_EXISTS: ErrorCode = 6;
pub const ERROR_CANCELLED: ErrorCode = 7;

/// `TRITONSERVER_ParameterType`.
pub const PARAMETER_STRING: u32 = 0;
/// `TRITONSERVER_MetricKind`.
pub const METRIC_KIND_COUNTER: u32 = 0;
/// `TRITONSERVER_RequestReleaseFlag`.
pub const REQUEST_RELEASE_ALL: u32 = 1;
/// `TRITONSERVER_ResponseCompleteFlag`.
pub const RESPONSE_COMPLETE_FINAL: u32 = 1;
/// `TRITONBACKEND_ArtifactType`.
pub const ARTIFACT_FILESYSTEM: u32 = 0;

type Err = *mut TritonError;

macro_rules! triton_api {
    (
        required {
            $($field:ident = $symbol:literal: fn($($arg:ty),* $(,)?) -> $ret:ty;)*
        }
        optional {
            $($opt_field:ident = $opt_symbol:literal: fn($($opt_arg:ty),* $(,)?) -> $opt_ret:ty;)*
        }
    ) => {
        /// Triton's functions, looked up by name in the server process. The optional ones are
        /// `None` in a server that lacks them; the backend then does without what they offer.
        pub struct Api {
            $(pub $field: unsafe extern "C" fn($($arg),*) -> $ret,)*
            $(pub $opt_field: Option<unsafe extern "C" fn($($opt_arg),*) -> $opt_ret>,)*
        }

        impl Api {
            /// Every function by name; the first missing one that is not optional is an error.
            fn resolve() -> Result<Api, String> {
                Ok(Api {
                    $($field: {
                        let address = lookup(concat!($symbol, "\0"))?;
                        // SAFETY: the symbol is Triton's function of this name, whose C
                        // signature (r24.10 headers) this declaration repeats.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(address)
                        }
                    },)*
                    $($opt_field: lookup(concat!($opt_symbol, "\0")).ok().map(|address| {
                        // SAFETY: as above.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($opt_arg),*) -> $opt_ret>(
                                address,
                            )
                        }
                    }),)*
                })
            }
        }
    };
}

triton_api! {
    required {
        server_api_version = "TRITONSERVER_ApiVersion": fn(*mut u32, *mut u32) -> Err;
        error_new = "TRITONSERVER_ErrorNew": fn(ErrorCode, *const c_char) -> Err;
        error_delete = "TRITONSERVER_ErrorDelete": fn(Err) -> ();
        error_code = "TRITONSERVER_ErrorCode": fn(Err) -> ErrorCode;
        error_code_string = "TRITONSERVER_ErrorCodeString": fn(Err) -> *const c_char;
        error_message = "TRITONSERVER_ErrorMessage": fn(Err) -> *const c_char;
        data_type_string = "TRITONSERVER_DataTypeString": fn(DataTypeCode) -> *const c_char;
        memory_type_string = "TRITONSERVER_MemoryTypeString": fn(MemoryType) -> *const c_char;
        instance_group_kind_string = "TRITONSERVER_InstanceGroupKindString": fn(InstanceGroupKind) -> *const c_char;
        log_is_enabled = "TRITONSERVER_LogIsEnabled": fn(LogLevel) -> bool;
        log_message = "TRITONSERVER_LogMessage": fn(LogLevel, *const c_char, i32, *const c_char) -> Err;
        message_serialize_to_json = "TRITONSERVER_MessageSerializeToJson": fn(*mut Message, *mut *const c_char, *mut usize) -> Err;
        message_delete = "TRITONSERVER_MessageDelete": fn(*mut Message) -> Err;
        parameter_new = "TRITONSERVER_ParameterNew": fn(*const c_char, u32, *const c_void) -> *mut Parameter;
        parameter_delete = "TRITONSERVER_ParameterDelete": fn(*mut Parameter) -> ();
        metric_family_new = "TRITONSERVER_MetricFamilyNew": fn(*mut *mut MetricFamily, u32, *const c_char, *const c_char) -> Err;
        metric_family_delete = "TRITONSERVER_MetricFamilyDelete": fn(*mut MetricFamily) -> Err;
        metric_new = "TRITONSERVER_MetricNew": fn(*mut *mut Metric, *mut MetricFamily, *const *const Parameter, u64) -> Err;
        metric_delete = "TRITONSERVER_MetricDelete": fn(*mut Metric) -> Err;
        metric_increment = "TRITONSERVER_MetricIncrement": fn(*mut Metric, f64) -> Err;

        backend_api_version = "TRITONBACKEND_ApiVersion": fn(*mut u32, *mut u32) -> Err;
        backend_name = "TRITONBACKEND_BackendName": fn(*mut Backend, *mut *const c_char) -> Err;
        model_name = "TRITONBACKEND_ModelName": fn(*mut Model, *mut *const c_char) -> Err;
        model_version = "TRITONBACKEND_ModelVersion": fn(*mut Model, *mut u64) -> Err;
        model_repository = "TRITONBACKEND_ModelRepository": fn(*mut Model, *mut u32, *mut *const c_char) -> Err;
        model_config = "TRITONBACKEND_ModelConfig": fn(*mut Model, u32, *mut *mut Message) -> Err;
        model_set_state = "TRITONBACKEND_ModelSetState": fn(*mut Model, *mut c_void) -> Err;
        model_state = "TRITONBACKEND_ModelState": fn(*mut Model, *mut *mut c_void) -> Err;
        instance_name = "TRITONBACKEND_ModelInstanceName": fn(*mut ModelInstance, *mut *const c_char) -> Err;
        instance_kind = "TRITONBACKEND_ModelInstanceKind": fn(*mut ModelInstance, *mut InstanceGroupKind) -> Err;
        instance_device_id = "TRITONBACKEND_ModelInstanceDeviceId": fn(*mut ModelInstance, *mut i32) -> Err;
        instance_model = "TRITONBACKEND_ModelInstanceModel": fn(*mut ModelInstance, *mut *mut Model) -> Err;
        instance_set_state = "TRITONBACKEND_ModelInstanceSetState": fn(*mut ModelInstance, *mut c_void) -> Err;
        instance_state = "TRITONBACKEND_ModelInstanceState": fn(*mut ModelInstance, *mut *mut c_void) -> Err;
        instance_report_statistics = "TRITONBACKEND_ModelInstanceReportStatistics": fn(*mut ModelInstance, *mut Request, bool, u64, u64, u64, u64) -> Err;
        instance_report_batch_statistics = "TRITONBACKEND_ModelInstanceReportBatchStatistics": fn(*mut ModelInstance, u64, u64, u64, u64, u64) -> Err;
        request_id = "TRITONBACKEND_RequestId": fn(*mut Request, *mut *const c_char) -> Err;
        request_input_count = "TRITONBACKEND_RequestInputCount": fn(*mut Request, *mut u32) -> Err;
        request_input_by_index = "TRITONBACKEND_RequestInputByIndex": fn(*mut Request, u32, *mut *mut Input) -> Err;
        request_output_count = "TRITONBACKEND_RequestOutputCount": fn(*mut Request, *mut u32) -> Err;
        request_output_name = "TRITONBACKEND_RequestOutputName": fn(*mut Request, u32, *mut *const c_char) -> Err;
        request_release = "TRITONBACKEND_RequestRelease": fn(*mut Request, u32) -> Err;
        input_properties = "TRITONBACKEND_InputProperties": fn(*mut Input, *mut *const c_char, *mut DataTypeCode, *mut *const i64, *mut u32, *mut u64, *mut u32) -> Err;
        input_buffer = "TRITONBACKEND_InputBuffer": fn(*mut Input, u32, *mut *const c_void, *mut u64, *mut MemoryType, *mut i64) -> Err;
        response_new = "TRITONBACKEND_ResponseNew": fn(*mut *mut Response, *mut Request) -> Err;
        response_delete = "TRITONBACKEND_ResponseDelete": fn(*mut Response) -> Err;
        response_output = "TRITONBACKEND_ResponseOutput": fn(*mut Response, *mut *mut Output, *const c_char, DataTypeCode, *const i64, u32) -> Err;
        response_send = "TRITONBACKEND_ResponseSend": fn(*mut Response, u32, Err) -> Err;
        output_buffer = "TRITONBACKEND_OutputBuffer": fn(*mut Output, *mut *mut c_void, u64, *mut MemoryType, *mut i64) -> Err;
    }
    optional {
        // In r24.10's tritonbackend.h; a host without it still serves, each request to its end.
        request_is_cancelled = "TRITONBACKEND_RequestIsCancelled": fn(*mut Request, *mut bool) -> Err;
    }
}

/// The address of a Triton function: first in the process's global scope (the `tritonserver`
/// executable links libtritonserver.so), then in an already loaded `libtritonserver.so`
/// (a host that opened it with RTLD_LOCAL).
fn lookup(symbol: &'static str) -> Result<*mut c_void, String> {
    let name = symbol.as_ptr().cast::<c_char>();
    // SAFETY: dlsym/dlopen with a NUL-terminated name; RTLD_NOLOAD never loads anything.
    unsafe {
        let address = libc::dlsym(libc::RTLD_DEFAULT, name);
        if !address.is_null() {
            return Ok(address);
        }
        let library = libc::dlopen(c"libtritonserver.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if !library.is_null() {
            let address = libc::dlsym(library, name);
            libc::dlclose(library);
            if !address.is_null() {
                return Ok(address);
            }
        }
    }
    Err(format!("the Triton function {} is not in this process", symbol.trim_end_matches('\0')))
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

impl Api {
    /// The function table, looked up once.
    pub fn get() -> Result<&'static Api, &'static str> {
        API.get_or_init(Api::resolve).as_ref().map_err(String::as_str)
    }

    /// A new Triton error (owned by whoever receives it).
    pub fn error(&self, code: ErrorCode, message: &str) -> *mut TritonError {
        let message = c_string(message);
        // SAFETY: a valid C string; Triton copies it.
        unsafe { (self.error_new)(code, message.as_ptr()) }
    }

    /// Takes a Triton error apart (and frees it): `None` for success.
    pub(crate) fn take_error(&self, error: *mut TritonError) -> Option<(ErrorCode, String)> {
        if error.is_null() {
            return None;
        }
        // SAFETY: a live error object, freed once here.
        unsafe {
            let code = (self.error_code)(error);
            let message = string_at((self.error_message)(error)).unwrap_or_default();
            (self.error_delete)(error);
            Some((code, message))
        }
    }

    /// Runs a Triton call that returns an error object: the error becomes a Rust one.
    pub(crate) fn check(&self, what: &str, error: *mut TritonError) -> Result<(), BackendError> {
        match self.take_error(error) {
            None => Ok(()),
            Some((code, message)) => Err(BackendError::new(code, format!("{what}: {message}"))),
        }
    }

    /// Whether `request` was cancelled (a gRPC client's `cancel()`, for one). False when the
    /// server cannot say: a server without the function, or an error
    /// asking it (logged), lets the request run to its end as before.
    ///
    /// # Safety
    /// `request` is a request the backend holds (not yet released).
    pub unsafe fn request_cancelled(&self, request: *mut Request) -> bool {
        let Some(is_cancelled) = self.request_is_cancelled else { return false };
        let mut cancelled = false;
        match self.take_error(is_cancelled(request, &mut cancelled)) {
            None => cancelled,
            Some((_, message)) => {
                self.log(LOG_WARN, &format!("zimage backend: TRITONBACKEND_RequestIsCancelled: {message}"));
                false
            }
        }
    }

    /// Writes a line to Triton's log when that level is enabled.
    pub fn log(&self, level: LogLevel, message: &str) {
        // SAFETY: plain calls with valid C strings.
        unsafe {
            if !(self.log_is_enabled)(level) {
                return;
            }
            let message = c_string(message);
            let error = (self.log_message)(level, c"zimage".as_ptr(), 0, message.as_ptr());
            let _ = self.take_error(error);
        }
    }

    /// Checks the enum values this backend passes against the server's own names for them, so
    /// a server whose headers changed a value fails at load rather than mislabelling data.
    pub fn check_enums(&self) -> Result<(), String> {
        let mut wrong = Vec::new();
        // SAFETY: these functions return static strings (or NULL) for any value.
        unsafe {
            for (code, name) in [
                (TYPE_UINT8, "UINT8"),
                (TYPE_UINT64, "UINT64"),
                (TYPE_INT32, "INT32"),
                (TYPE_FP32, "FP32"),
                (TYPE_FP64, "FP64"),
                (TYPE_BYTES, "BYTES"),
            ] {
                let got = string_at((self.data_type_string)(code));
                if got.as_deref() != Some(name) {
                    wrong.push(format!(
                        "data type {code} is {} in this server, expected {name}",
                        got.as_deref().unwrap_or("NULL")
                    ));
                }
            }
            for (code, name) in [(MEMORY_CPU, "CPU"), (MEMORY_CPU_PINNED, "CPU_PINNED"), (MEMORY_GPU, "GPU")] {
                let got = string_at((self.memory_type_string)(code));
                if got.as_deref() != Some(name) {
                    wrong.push(format!(
                        "memory type {code} is {} in this server, expected {name}",
                        got.as_deref().unwrap_or("NULL")
                    ));
                }
            }
            for (code, name) in [
                (INSTANCEGROUPKIND_AUTO, "AUTO"),
                (INSTANCEGROUPKIND_CPU, "CPU"),
                (INSTANCEGROUPKIND_GPU, "GPU"),
                (INSTANCEGROUPKIND_MODEL, "MODEL"),
            ] {
                let got = string_at((self.instance_group_kind_string)(code));
                if got.as_deref() != Some(name) {
                    wrong.push(format!(
                        "instance group kind {code} is {} in this server, expected {name}",
                        got.as_deref().unwrap_or("NULL")
                    ));
                }
            }
            // Triton 2.51 names the codes up to ALREADY_EXISTS; CANCELLED has no name to check.
            for (code, name) in [
                (ERROR_INTERNAL, "Internal"),
                (ERROR_INVALID_ARG, "Invalid argument"),
                (ERROR_UNAVAILABLE, "Unavailable"),
                (ERROR_UNSUPPORTED, "Unsupported"),
            ] {
                let error = (self.error_new)(code, c"check".as_ptr());
                let got = string_at((self.error_code_string)(error));
                (self.error_delete)(error);
                if got.as_deref() != Some(name) {
                    wrong.push(format!(
                        "error code {code} is {} in this server, expected {name}",
                        got.as_deref().unwrap_or("NULL")
                    ));
                }
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    }

    /// A Triton message (model or backend configuration) as JSON text; the message is freed.
    pub(crate) fn message_json(&self, message: *mut Message) -> Result<String, BackendError> {
        let mut base: *const c_char = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: a live message; its buffer is copied before the message is deleted.
        unsafe {
            let serialized = self
                .check("serialising a Triton message", (self.message_serialize_to_json)(message, &mut base, &mut size));
            let text = match serialized {
                Ok(()) if !base.is_null() => {
                    Ok(String::from_utf8_lossy(std::slice::from_raw_parts(base.cast::<u8>(), size)).into_owned())
                }
                Ok(()) => Ok(String::new()),
                Err(e) => Err(e),
            };
            let _ = self.take_error((self.message_delete)(message));
            text
        }
    }
}

/// An error on its way back to Triton: a code from `TRITONSERVER_Error_Code` and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    pub code: ErrorCode,
    pub message: String,
}

impl BackendError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        BackendError { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ERROR_INVALID_ARG, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ERROR_INTERNAL, message)
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A C string from Rust text; an interior NUL (which C cannot carry) is replaced.
pub fn c_string(text: &str) -> CString {
    CString::new(text.replace('\0', "\u{FFFD}")).expect("no NUL left")
}

/// A borrowed C string as owned text (lossy), `None` for NULL.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string.
pub unsafe fn string_at(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        Some(CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}
