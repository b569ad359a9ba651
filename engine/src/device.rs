use std::fmt;
use std::str::FromStr;

use crate::EngineError;

/// A device a model runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// What a configuration asks for: `auto`, `cpu` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceRequest {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| EngineError::Device(format!("unknown device {s:?}: expected auto, cpu or cuda:N"))),
        }
    }
}

impl DeviceRequest {
    /// Picks the device: `auto` is the first GPU when this build has CUDA and one is present,
    /// else the CPU; an explicit `cuda:N` is an error when it cannot be had.
    pub fn resolve(self) -> Result<Device, EngineError> {
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Auto => Ok(if cuda_available(0) { Device::Cuda(0) } else { Device::Cpu }),
            DeviceRequest::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    Err(EngineError::Device(format!(
                        "cuda:{n} requested, but this algolink was built without the `cuda` feature"
                    )))
                } else if cuda_available(n) {
                    Ok(Device::Cuda(n))
                } else {
                    Err(EngineError::Device(format!("cuda:{n} is not available on this machine")))
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_available(ordinal: usize) -> bool {
    candle_core::Device::new_cuda(ordinal).is_ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_available(_ordinal: usize) -> bool {
    false
}

impl Device {
    pub(crate) fn candle(self) -> Result<candle_core::Device, EngineError> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(n) => {
                candle_core::Device::new_cuda(n).map_err(|e| EngineError::Device(format!("cuda:{n}: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("auto".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!("cuda:1".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda(1));
        assert!("gpu".parse::<DeviceRequest>().is_err());
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_auto_is_cpu_and_cuda_is_an_error() {
        assert_eq!(DeviceRequest::Auto.resolve().unwrap(), Device::Cpu);
        let err = DeviceRequest::Cuda(0).resolve().unwrap_err().to_string();
        assert!(err.contains("without the `cuda` feature"), "{err}");
    }
}
