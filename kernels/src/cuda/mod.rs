//! The GPU tier (feature `cuda`): CUDA kernels for the products a forward pass hands to a
//! [`Backend`](crate::Backend), and [`CudaBackend`], which runs them on weights it keeps in
//! device memory.
//!
//! Everything CUDA is loaded at run time through `cudarc` (the driver's `libcuda.so` and
//! `libnvrtc.so`): a build needs no CUDA toolkit, and a binary built with the feature still
//! starts on a machine without a GPU ([`probe`] says why there is none). The kernels
//! (`kernels/*.cu`, no headers) are compiled by NVRTC when a device is first opened, for that
//! device's architecture, and the modules are kept for the life of the process.
//!
//! Module map: `nvrtc` (the sources and their compilation), `device` (one context, stream and
//! set of loaded kernels per device; the launches), `backend` ([`CudaBackend`]: the weight cache
//! and the [`Backend`](crate::Backend) methods).

mod backend;
mod device;
mod nvrtc;

pub use backend::CudaBackend;
pub use device::{probe, DeviceInfo};
pub use nvrtc::{compile, nvrtc_present, nvrtc_version, options, Source, SOURCES};

/// Why the GPU tier cannot run, or what failed in it.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("libcuda.so not found: no NVIDIA driver")]
    NoDriver,
    #[error(
        "libnvrtc not found: install CUDA's NVRTC (the toolkit, or scripts/install-nvrtc.sh) and put \
         its library directory on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("no CUDA device: the driver is loaded but sees no GPU")]
    NoDevice,
    #[error("CUDA device {ordinal} does not exist: the driver sees {count}")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("CUDA driver: {what}: {error}")]
    Driver { what: String, error: String },
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("NVRTC could not compile {file} for {arch} cleanly (options: {options}):\n{log}")]
    Compile { file: &'static str, arch: String, options: String, log: String },
    #[error("{0}")]
    Shape(String),
}

impl CudaError {
    fn driver(what: impl Into<String>, error: cudarc::driver::DriverError) -> Self {
        CudaError::Driver { what: what.into(), error: format!("{error:?}") }
    }
}
