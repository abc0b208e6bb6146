//! Where a graph runs: the CPU, or a GPU through CUDA or TensorRT.

use crate::error::{Error, Result};

/// Where a graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda {
        device_id: i32,
    },
    TensorRt {
        device_id: i32,
    },
}

impl Device {
    pub fn provider_name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda { .. } => "cuda",
            Device::TensorRt { .. } => "tensorrt",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;

    /// `cpu`, `cuda`, `cuda:N`, `tensorrt`, `tensorrt:N`.
    fn from_str(s: &str) -> Result<Device> {
        let (name, id) = match s.split_once(':') {
            Some((n, i)) => {
                let id = i.parse::<i32>().ok().filter(|v| *v >= 0).ok_or_else(|| {
                    Error::invalid(format!("device {s:?}: the index after ':' must be a non-negative integer"))
                })?;
                (n, id)
            }
            None => (s, 0),
        };
        match name {
            "cpu" if !s.contains(':') => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda { device_id: id }),
            "tensorrt" | "trt" => Ok(Device::TensorRt { device_id: id }),
            _ => Err(Error::invalid(format!("unknown device {s:?}: use cpu, cuda[:N] or tensorrt[:N]"))),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda { device_id } => write!(f, "cuda:{device_id}"),
            Device::TensorRt { device_id } => write!(f, "tensorrt:{device_id}"),
        }
    }
}
