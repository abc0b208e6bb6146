//! One error type for the whole SDK. Callers branch on [`ErrorKind`] (also what the C ABI maps
//! to result codes); the message carries the detail.

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
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("model package {path}: {message}")]
    Package { path: PathBuf, message: String },

    #[error("{0}")]
    Runtime(String),

    #[error("execution provider {provider}: {message}")]
    Provider { provider: String, message: String },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("image: {0}")]
    Image(String),

    #[error("cancelled")]
    Cancelled,

    #[error("inference failed in {stage}: {message}")]
    Inference { stage: &'static str, message: String },

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
            Error::Runtime(_) => ErrorKind::Runtime,
            Error::Provider { .. } => ErrorKind::Provider,
            Error::InvalidRequest(_) => ErrorKind::InvalidRequest,
            Error::Image(_) => ErrorKind::Image,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Inference { .. } => ErrorKind::Inference,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    pub(crate) fn package(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Package { path: path.into(), message: message.into() }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidRequest(message.into())
    }

    pub(crate) fn inference(stage: &'static str, message: impl std::fmt::Display) -> Self {
        Error::Inference { stage, message: message.to_string() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
