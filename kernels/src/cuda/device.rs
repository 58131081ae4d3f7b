//! One CUDA device: its context, the stream every launch goes to, and the kernels compiled for
//! it (once per process: [`Device::open`] keeps each opened device).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{self, Source, THREADS, TOKENS};
use super::CudaError;
use crate::DType;

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    /// Devices the driver sees.
    pub count: usize,
    pub name: String,
    /// `(major, minor)`: `(9, 0)` for an H100 or H200.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    /// NVRTC's `(major, minor)`.
    pub nvrtc: (i32, i32),
}

impl DeviceInfo {
    /// The real architecture the kernels are compiled for (`sm_90`).
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// Whether device 0 is usable, and what it is; the error names what is missing. Checks, in this
/// order: the driver library (`libcuda.so`: without it every driver call would panic), the
/// number of devices, a context on device 0, and the NVRTC library the kernels are compiled
/// with. Does not compile the kernels ([`CudaBackend::new`](super::CudaBackend::new) does).
pub fn probe() -> Result<DeviceInfo, CudaError> {
    open_context(0).map(|(info, _)| info)
}

fn open_context(ordinal: usize) -> Result<(DeviceInfo, Arc<CudaContext>), CudaError> {
    // SAFETY: only tries to dlopen libcuda by its candidate names, and closes it again.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let count = match CudaContext::device_count() {
        Ok(count) => count.max(0) as usize,
        // cuInit itself fails with CUDA_ERROR_NO_DEVICE on a machine with a driver and no GPU.
        Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => 0,
        Err(e) => return Err(CudaError::driver("cuInit / cuDeviceGetCount", e)),
    };
    if count == 0 {
        return Err(CudaError::NoDevice);
    }
    if ordinal >= count {
        return Err(CudaError::NoSuchDevice { ordinal, count });
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| CudaError::driver(format!("context on device {ordinal}"), e))?;
    let attr = |what: &'static str| move |e| CudaError::driver(format!("{what} of device {ordinal}"), e);
    let name = ctx.name().map_err(attr("name"))?;
    let compute_capability = ctx.compute_capability().map_err(attr("compute capability"))?;
    let total_memory = ctx.total_mem().map_err(attr("memory size"))?;
    let nvrtc = nvrtc::nvrtc_version()?;
    Ok((DeviceInfo { ordinal, count, name, compute_capability, total_memory, nvrtc }, ctx))
}

/// An opened device with its kernels loaded.
pub(crate) struct Device {
    pub(crate) info: DeviceInfo,
    pub(crate) stream: Arc<CudaStream>,
    /// `matmul_*` in [`DType::ALL`]'s order.
    matmul: Vec<CudaFunction>,
    silu_mul: CudaFunction,
    rms_norm: CudaFunction,
    softmax: CudaFunction,
}

impl Device {
    /// Device `ordinal`, opened and its kernels compiled on first use; the same `Device`
    /// afterwards.
    pub(crate) fn open(ordinal: usize) -> Result<Arc<Device>, CudaError> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
        let mut devices = DEVICES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = devices.get(&ordinal) {
            return Ok(device.clone());
        }
        let (info, ctx) = open_context(ordinal)?;
        let load = |source: &Source| -> Result<Vec<CudaFunction>, CudaError> {
            let cubin = nvrtc::compile(source, &info.arch())?;
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| CudaError::driver(format!("loading {} on device {ordinal}", source.name), e))?;
            source
                .kernels
                .iter()
                .map(|k| module.load_function(k).map_err(|e| CudaError::driver(format!("kernel {k}"), e)))
                .collect()
        };
        let matmul = load(&nvrtc::MATMUL)?;
        let [silu_mul, rms_norm, softmax]: [CudaFunction; 3] =
            load(&nvrtc::ELEMENTWISE)?.try_into().expect("elementwise.cu lists three kernels");
        let device =
            Arc::new(Device { info, stream: ctx.default_stream(), matmul, silu_mul, rms_norm, softmax });
        devices.insert(ordinal, device.clone());
        Ok(device)
    }

    /// `out[t, r] = sum_c x[t, c] * w[r, c]` for `t < n`, on the device's stream. `w` holds
    /// `rows x cols` weights of `dtype`; `x` at least `n * cols` values; `out` at least
    /// `n * rows`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul(
        &self,
        w: &CudaSlice<u8>,
        dtype: DType,
        (rows, cols): (usize, usize),
        x: &CudaSlice<f32>,
        n: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let expected = dtype.bytes(cols).and_then(|b| b.checked_mul(rows));
        check(expected == Some(w.len()), || format!("{rows}x{cols} {dtype:?} weight of {} bytes", w.len()))?;
        check(x.len() >= n * cols && out.len() >= n * rows, || "matmul buffers too short".into())?;
        if n == 0 || rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, n_i) = (to_i32(rows)?, to_i32(cols)?, to_i32(n)?);
        let k = DType::ALL.iter().position(|d| *d == dtype).expect("every dtype has a kernel");
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, n.div_ceil(TOKENS as usize).min(65_535) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.matmul[k]);
        launch.arg(w).arg(x).arg(out).arg(&rows_i).arg(&cols_i).arg(&n_i);
        // SAFETY: the kernel's parameters are (const u8*, const float*, float*, int, int, int),
        // pushed in that order; `w` holds exactly `rows x cols` weights of the kernel's format,
        // `x` and `out` at least `n * cols` and `n * rows` floats (checked above), which is all
        // the kernel touches; grid.x = rows and grid.y within its limit (the kernel loops over
        // the token groups past it).
        unsafe { launch.launch(cfg) }
            .map_err(|e| CudaError::driver(format!("launching {}", nvrtc::MATMUL.kernels[k]), e))?;
        Ok(())
    }

    /// `gate[i] = silu(gate[i]) * up[i]` for `i < gate.len()`.
    pub(crate) fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<(), CudaError> {
        check(up.len() >= gate.len(), || format!("silu_mul: {} gates, {} ups", gate.len(), up.len()))?;
        let n = gate.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(THREADS as u64).min(1 << 16) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(&self.silu_mul);
        launch.arg(gate).arg(up).arg(&n);
        // SAFETY: parameters (float*, const float*, unsigned long long) in that order; the
        // kernel touches indices below n, and both buffers hold at least n floats.
        unsafe { launch.launch(cfg) }.map_err(|e| CudaError::driver("launching silu_mul", e))?;
        Ok(())
    }

    /// RMSNorm of each row of `x` (`w.len()` columns) in place.
    pub(crate) fn rms_norm(
        &self,
        x: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (rows, cols) = rows_of(x.len(), w.len())?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i) = (to_i32(rows)?, to_i32(cols)?);
        let mut launch = self.stream.launch_builder(&self.rms_norm);
        launch.arg(x).arg(w).arg(&rows_i).arg(&cols_i).arg(&eps);
        // SAFETY: parameters (float*, const float*, int, int, float) in that order; the kernel
        // touches rows * cols values of x (its whole length) and cols of w.
        unsafe { launch.launch(row_launch(rows)) }.map_err(|e| CudaError::driver("launching rms_norm", e))?;
        Ok(())
    }

    /// Softmax of each row of `x` (`cols` columns) in place.
    pub(crate) fn softmax(&self, x: &mut CudaSlice<f32>, cols: usize) -> Result<(), CudaError> {
        let (rows, cols) = rows_of(x.len(), cols)?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i) = (to_i32(rows)?, to_i32(cols)?);
        let mut launch = self.stream.launch_builder(&self.softmax);
        launch.arg(x).arg(&rows_i).arg(&cols_i);
        // SAFETY: parameters (float*, int, int) in that order; the kernel touches rows * cols
        // values of x, its whole length.
        unsafe { launch.launch(row_launch(rows)) }.map_err(|e| CudaError::driver("launching softmax", e))?;
        Ok(())
    }
}

/// One thread block per row (the kernels loop when there are more rows than blocks).
fn row_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.min(1 << 16) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `len` values as rows of `cols`: `(rows, cols)`; an error unless whole rows of a nonzero width.
fn rows_of(len: usize, cols: usize) -> Result<(usize, usize), CudaError> {
    check(cols > 0 && len.is_multiple_of(cols), || format!("{len} values are not rows of {cols}"))?;
    Ok((len / cols, cols))
}

fn to_i32(v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Shape(format!("{v} is beyond the kernels' 32-bit sizes")))
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), CudaError> {
    match ok {
        true => Ok(()),
        false => Err(CudaError::Shape(what())),
    }
}
