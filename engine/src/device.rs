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
    /// The device a candle device is.
    pub(crate) fn of(device: &candle_core::Device) -> Device {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => Device::Cuda(gpu_id),
            _ => Device::Cpu,
        }
    }

    pub(crate) fn candle(self) -> Result<candle_core::Device, EngineError> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(n) => {
                candle_core::Device::new_cuda(n).map_err(|e| EngineError::Device(format!("cuda:{n}: {e}")))
            }
        }
    }
}

/// Room a version needs on a GPU beyond its weights: activations of a batch and the BLAS
/// library's workspace.
const WORKSPACE_BYTES: u64 = 256 << 20;

impl Device {
    /// Free and total memory of the device in bytes; `None` on the CPU, where the operating system
    /// decides.
    pub fn memory(self) -> Result<Option<(u64, u64)>, EngineError> {
        match self {
            Device::Cpu => Ok(None),
            Device::Cuda(n) => cuda_memory(n).map(Some),
        }
    }

    /// Refuses, with a message naming both figures, to place `weight_bytes` of weights on a GPU
    /// that has not that much free plus a tenth and [`WORKSPACE_BYTES`] for running batches: the
    /// load fails before anything is allocated rather than half-way, or later in a batch.
    pub fn check_room(self, weight_bytes: u64) -> Result<(), EngineError> {
        match self.memory()? {
            None => Ok(()),
            Some((free, total)) => room(self, weight_bytes, free, total),
        }
    }
}

fn room(device: Device, weight_bytes: u64, free: u64, total: u64) -> Result<(), EngineError> {
    let needed = weight_bytes + weight_bytes / 10 + WORKSPACE_BYTES;
    if needed <= free {
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Err(EngineError::DeviceMemory(format!(
        "{device} has {:.0} MiB free of {:.0} MiB; this version needs about {:.0} MiB ({:.0} MiB of weights \
         as loaded, a tenth more and {:.0} MiB to run batches): unload a version there or choose another device",
        mib(free),
        mib(total),
        mib(needed),
        mib(weight_bytes),
        mib(WORKSPACE_BYTES),
    )))
}

#[cfg(feature = "cuda")]
fn cuda_memory(ordinal: usize) -> Result<(u64, u64), EngineError> {
    // The device's primary context, which candle's devices share: no stream or cuBLAS handle is
    // made just to ask.
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        EngineError::Device(format!("cuda:{ordinal}: reading free memory: {e}"))
    };
    let (free, total) = CudaContext::new(ordinal).map_err(err)?.mem_get_info().map_err(err)?;
    Ok((free as u64, total as u64))
}

#[cfg(not(feature = "cuda"))]
fn cuda_memory(ordinal: usize) -> Result<(u64, u64), EngineError> {
    Err(EngineError::Device(format!("cuda:{ordinal}: this algolink was built without the `cuda` feature")))
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

    #[test]
    fn room_counts_weights_a_tenth_and_the_workspace() {
        let gib = 1u64 << 30;
        assert!(room(Device::Cuda(0), gib, 2 * gib, 80 * gib).is_ok());
        // 1 GiB + 0.1 GiB + 0.25 GiB does not fit in 1.3 GiB.
        let err = room(Device::Cuda(1), gib, gib + 3 * gib / 10, 80 * gib).unwrap_err();
        assert!(matches!(err, EngineError::DeviceMemory(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("cuda:1 has 1331 MiB free of 81920 MiB") && text.contains("needs about 1382 MiB"),
            "{text}"
        );
        assert!(Device::Cpu.check_room(u64::MAX).is_ok(), "the CPU is not checked");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_auto_is_cpu_and_cuda_is_an_error() {
        assert_eq!(DeviceRequest::Auto.resolve().unwrap(), Device::Cpu);
        let err = DeviceRequest::Cuda(0).resolve().unwrap_err().to_string();
        assert!(err.contains("without the `cuda` feature"), "{err}");
    }
}
