//! One error type for the whole SDK. Callers branch on [`ErrorKind`] (also what the C ABI maps
//! to result codes); the message carries the detail, and [`std::error::Error::source`] reaches
//! the underlying ONNX Runtime or I/O error where there is one.

use std::path::PathBuf;

/// What went wrong, coarse enough to branch on. New kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The model package is missing, unreadable, of an unknown format or inconsistent.
    Package,
    /// The ONNX Runtime library could not be found, loaded, or is the wrong version.
    Runtime,
    /// An execution provider (CUDA, TensorRT) could not be set up.
    Provider,
    /// The request itself is invalid (size, steps, guidance, counts, images ...).
    InvalidRequest,
    /// An input image or mask could not be decoded or is unusable.
    Image,
    /// The caller stopped the run (progress callback or cancel handle).
    Cancelled,
    /// ONNX Runtime failed while running a graph, or produced non-finite values.
    Inference,
    /// Reading or writing a file failed.
    Io,
    /// A LoRA file is unreadable, malformed, or does not fit the model it is applied to.
    Lora,
}

/// The error underneath one of ours (ONNX Runtime's, mostly), kept for `source()`.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("model package {path}: {message}")]
    Package {
        path: PathBuf,
        message: String,
        #[source]
        source: Option<Source>,
    },

    #[error("{message}")]
    Runtime {
        message: String,
        #[source]
        source: Option<Source>,
    },

    #[error("execution provider {provider}: {message}")]
    Provider {
        provider: String,
        message: String,
        #[source]
        source: Option<Source>,
    },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("image: {0}")]
    Image(String),

    #[error("cancelled")]
    Cancelled,

    #[error("inference failed in {stage}: {message}")]
    Inference {
        stage: &'static str,
        message: String,
        #[source]
        source: Option<Source>,
    },

    #[error("LoRA {path}: {message}")]
    Lora { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Package { .. } => ErrorKind::Package,
            Error::Runtime { .. } => ErrorKind::Runtime,
            Error::Provider { .. } => ErrorKind::Provider,
            Error::InvalidRequest(_) => ErrorKind::InvalidRequest,
            Error::Image(_) => ErrorKind::Image,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Inference { .. } => ErrorKind::Inference,
            Error::Io { .. } => ErrorKind::Io,
            Error::Lora { .. } => ErrorKind::Lora,
        }
    }

    pub(crate) fn package(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Package { path: path.into(), message: message.into(), source: None }
    }

    pub(crate) fn runtime(message: impl Into<String>) -> Self {
        Error::Runtime { message: message.into(), source: None }
    }

    pub(crate) fn provider(provider: &str, message: impl Into<String>) -> Self {
        Error::Provider { provider: provider.into(), message: message.into(), source: None }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidRequest(message.into())
    }

    pub(crate) fn inference(stage: &'static str, message: impl std::fmt::Display) -> Self {
        Error::Inference { stage, message: message.to_string(), source: None }
    }

    /// ONNX Runtime failed while running `stage`: its message, and the error itself as source.
    pub(crate) fn ort(stage: &'static str, error: ort::Error) -> Self {
        Error::Inference { stage, message: error.to_string(), source: Some(Box::new(error)) }
    }

    /// Keeps an ONNX Runtime error that carries a value to recover (a session builder) as a
    /// plain one: the value is not `Send`, the code and message are what matter.
    pub(crate) fn detach_ort<R>(error: ort::Error<R>) -> ort::Error {
        ort::Error::new_with_code(error.code(), error.message())
    }

    pub(crate) fn lora(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Lora { path: path.into(), message: message.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Keeps `cause` as this error's [`source`](std::error::Error::source) (on the kinds that
    /// wrap another library's failure; the others are returned unchanged).
    pub(crate) fn caused_by(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        match &mut self {
            Error::Package { source, .. }
            | Error::Runtime { source, .. }
            | Error::Provider { source, .. }
            | Error::Inference { source, .. } => *source = Some(Box::new(cause)),
            Error::InvalidRequest(_) | Error::Image(_) | Error::Cancelled | Error::Io { .. } | Error::Lora { .. } => {}
        }
        self
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn sources_are_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = Error::runtime("loading failed").caused_by(io);
        assert_eq!(e.to_string(), "loading failed");
        assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("denied"));
        assert!(Error::invalid("x").source().is_none());
        assert_eq!(Error::inference("vae_decoder", "bad").kind(), ErrorKind::Inference);
    }
}
