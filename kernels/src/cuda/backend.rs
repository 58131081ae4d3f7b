//! [`CudaBackend`]: the [`Backend`] methods on a CUDA device, with the weights kept in device
//! memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaSlice;

use super::device::{Device, DeviceInfo};
use super::CudaError;
use crate::{Backend, SwiGlu, Weight};

/// The CUDA backend: every call uploads its activation rows, computes on the device and
/// downloads the results before it returns; weights are uploaded on first use and then kept in
/// device memory.
///
/// The weight cache is keyed by the host bytes' identity, `(address, length)`: a weight must be
/// the same bytes at the same address for as long as the backend lives (a memory-mapped
/// checkpoint's dense tensors). A caller that frees or rewrites the memory behind a weight it
/// passed (a recycled expert buffer, an activation viewed as a weight) must [`forget`] it first;
/// otherwise a later weight at the same address and length is taken for it. The cache has no
/// byte budget yet: it grows until [`forget`] or [`clear_weights`].
///
/// Matmuls accumulate in f32 in a fixed order per (row, token) whatever the batch, so rows are
/// independent (batched equals alone), as [`Backend`] asks. Plain weights (bf16, f16, f32) give
/// what the CPU gives to f32 rounding. Block-format weights (q8_0, q4_0) are multiplied with the
/// activations in f32, dequantized weights against unquantized activations, where the CPU path
/// first quantizes each activation row to q8_0 (as llama.cpp's CPU backend does): the two differ
/// by at most the activations' q8_0 rounding, per block of 32 columns `e_b * sum |w_c|`, with
/// `e_b` about half a step, `max |x| / 254` of the block (the bound the tests use,
/// `kernels/src/tests/quant.rs`).
///
/// The [`Backend`] methods panic on a CUDA error (the trait has no error path); the `try_`
/// methods return it.
///
/// [`forget`]: CudaBackend::forget
/// [`clear_weights`]: CudaBackend::clear_weights
pub struct CudaBackend {
    device: Arc<Device>,
    /// Device copies of the weights by host `(address, length)`. Held for a whole call, which
    /// also keeps one call's launches and copies together.
    weights: Mutex<HashMap<(usize, usize), CudaSlice<u8>>>,
}

impl CudaBackend {
    /// A backend on device `ordinal`: the device is opened and the kernels compiled for it on
    /// first use in the process (a few hundred milliseconds), shared by later backends.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Ok(CudaBackend { device: Device::open(ordinal)?, weights: Mutex::new(HashMap::new()) })
    }

    pub fn device(&self) -> &DeviceInfo {
        &self.device.info
    }

    /// Bytes of weights held in device memory.
    pub fn cached_weight_bytes(&self) -> usize {
        self.cache().values().map(|w| w.len()).sum()
    }

    /// Drops the device copy of the weight whose bytes are `data`, if there is one.
    pub fn forget(&self, data: &[u8]) {
        self.cache().remove(&key(data));
    }

    /// Drops every device copy of a weight.
    pub fn clear_weights(&self) {
        self.cache().clear();
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<(usize, usize), CudaSlice<u8>>> {
        self.weights.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Backend::matmuls`], returning CUDA errors and shape mismatches.
    pub fn try_matmuls(&self, x: &[f32], parts: &mut [(Weight<'_>, &mut [f32])]) -> Result<(), CudaError> {
        let Some(cols) = parts.first().map(|(w, _)| w.cols) else { return Ok(()) };
        let n = tokens(x, cols)?;
        for (w, out) in parts.iter() {
            check_product(w, cols, n, out.len())?;
        }
        if n == 0 {
            return Ok(());
        }
        let mut cache = self.cache();
        let stream = &self.device.stream;
        let x_d = stream.clone_htod(x).map_err(|e| CudaError::driver("uploading activations", e))?;
        for (w, out) in parts.iter_mut() {
            if w.rows == 0 || cols == 0 {
                out.fill(0.0);
                continue;
            }
            let w_d = upload(&mut cache, &self.device, w)?;
            let mut out_d = alloc(&self.device, out.len())?;
            self.device.matmul(w_d, w.dtype, (w.rows, w.cols), &x_d, n, &mut out_d)?;
            download(&self.device, &out_d, out)?;
        }
        Ok(())
    }

    /// [`Backend::swiglu`], returning CUDA errors and shape mismatches.
    pub fn try_swiglu(&self, x: &[f32], w: &SwiGlu<'_>, out: &mut [f32]) -> Result<(), CudaError> {
        let (hidden, inter) = (w.gate.cols, w.gate.rows);
        let n = tokens(x, hidden)?;
        check_product(&w.up, hidden, n, n * inter)?;
        check_product(&w.down, inter, n, out.len())?;
        if w.up.rows != inter {
            return Err(CudaError::Shape(format!("gate has {inter} rows, up {}", w.up.rows)));
        }
        if n == 0 {
            return Ok(());
        }
        if [&w.gate, &w.up, &w.down].iter().any(|m| m.rows == 0 || m.cols == 0) {
            // An empty product: down of nothing is zeros (the CPU backend gives the same).
            out.fill(0.0);
            return Ok(());
        }
        let mut cache = self.cache();
        let dev = &self.device;
        let x_d = dev.stream.clone_htod(x).map_err(|e| CudaError::driver("uploading activations", e))?;
        let (mut g, mut u, mut y) = (alloc(dev, n * inter)?, alloc(dev, n * inter)?, alloc(dev, out.len())?);
        dev.matmul(upload(&mut cache, dev, &w.gate)?, w.gate.dtype, (inter, hidden), &x_d, n, &mut g)?;
        dev.matmul(upload(&mut cache, dev, &w.up)?, w.up.dtype, (inter, hidden), &x_d, n, &mut u)?;
        dev.silu_mul(&mut g, &u)?;
        dev.matmul(upload(&mut cache, dev, &w.down)?, w.down.dtype, (w.down.rows, inter), &g, n, &mut y)?;
        download(dev, &y, out)
    }

    /// RMSNorm of each row of `x` (`w.len()` columns) in place, on the device.
    pub fn rms_norm(&self, x: &mut [f32], w: &[f32], eps: f32) -> Result<(), CudaError> {
        if x.is_empty() {
            return Ok(());
        }
        let dev = &self.device;
        let _call = self.cache();
        let mut x_d = dev.stream.clone_htod(x).map_err(|e| CudaError::driver("uploading activations", e))?;
        let w_d = dev.stream.clone_htod(w).map_err(|e| CudaError::driver("uploading norm weights", e))?;
        dev.rms_norm(&mut x_d, &w_d, eps)?;
        download(dev, &x_d, x)
    }

    /// Softmax of each row of `x` (`cols` columns) in place, on the device.
    pub fn softmax(&self, x: &mut [f32], cols: usize) -> Result<(), CudaError> {
        if x.is_empty() {
            return Ok(());
        }
        let dev = &self.device;
        let _call = self.cache();
        let mut x_d = dev.stream.clone_htod(x).map_err(|e| CudaError::driver("uploading activations", e))?;
        dev.softmax(&mut x_d, cols)?;
        download(dev, &x_d, x)
    }

    /// `gate[i] = silu(gate[i]) * up[i]`, on the device.
    pub fn silu_mul(&self, gate: &mut [f32], up: &[f32]) -> Result<(), CudaError> {
        if gate.len() != up.len() {
            return Err(CudaError::Shape(format!("silu_mul: {} gates, {} ups", gate.len(), up.len())));
        }
        if gate.is_empty() {
            return Ok(());
        }
        let dev = &self.device;
        let _call = self.cache();
        let mut g = dev.stream.clone_htod(gate).map_err(|e| CudaError::driver("uploading gates", e))?;
        let u = dev.stream.clone_htod(up).map_err(|e| CudaError::driver("uploading ups", e))?;
        dev.silu_mul(&mut g, &u)?;
        download(dev, &g, gate)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matmuls(&self, x: &[f32], parts: &mut [(Weight<'_>, &mut [f32])]) {
        if let Err(e) = self.try_matmuls(x, parts) {
            panic!("CUDA matmul on device {}: {e}", self.device.info.ordinal);
        }
    }

    fn swiglu(&self, x: &[f32], w: &SwiGlu<'_>, out: &mut [f32]) {
        if let Err(e) = self.try_swiglu(x, w, out) {
            panic!("CUDA SwiGLU on device {}: {e}", self.device.info.ordinal);
        }
    }
}

fn key(data: &[u8]) -> (usize, usize) {
    (data.as_ptr() as usize, data.len())
}

/// The device copy of `w`, uploaded now if it is not cached.
fn upload<'c>(
    cache: &'c mut HashMap<(usize, usize), CudaSlice<u8>>,
    device: &Device,
    w: &Weight,
) -> Result<&'c CudaSlice<u8>, CudaError> {
    match cache.entry(key(w.data)) {
        std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
        std::collections::hash_map::Entry::Vacant(e) => {
            let bytes = w.data.len();
            let copy = device
                .stream
                .clone_htod(w.data)
                .map_err(|err| CudaError::driver(format!("uploading a {bytes}-byte weight"), err))?;
            Ok(e.insert(copy))
        }
    }
}

fn alloc(device: &Device, len: usize) -> Result<CudaSlice<f32>, CudaError> {
    device.stream.alloc_zeros(len).map_err(|e| CudaError::driver(format!("allocating {len} floats"), e))
}

/// Copies `src` into `dst` and waits for the stream (and so for every launch before it).
fn download(device: &Device, src: &CudaSlice<f32>, dst: &mut [f32]) -> Result<(), CudaError> {
    device.stream.memcpy_dtoh(src, dst).map_err(|e| CudaError::driver("downloading results", e))?;
    device.stream.synchronize().map_err(|e| CudaError::driver("waiting for the stream", e))
}

/// Rows of `x` of `cols` values: `x.len() / cols` (none when `cols` is 0 and `x` empty).
fn tokens(x: &[f32], cols: usize) -> Result<usize, CudaError> {
    match (x.len(), cols) {
        (0, _) => Ok(0),
        (len, 0) => Err(CudaError::Shape(format!("{len} activations for weights of 0 columns"))),
        (len, cols) if len.is_multiple_of(cols) => Ok(len / cols),
        (len, cols) => Err(CudaError::Shape(format!("{len} activations are not rows of {cols}"))),
    }
}

/// `w` against `n` rows of `cols` into `out_len` values.
fn check_product(w: &Weight, cols: usize, n: usize, out_len: usize) -> Result<(), CudaError> {
    if w.cols != cols {
        return Err(CudaError::Shape(format!("a {}x{} weight against rows of {cols}", w.rows, w.cols)));
    }
    if out_len != n * w.rows {
        return Err(CudaError::Shape(format!("{n} rows x {} outputs into {out_len} values", w.rows)));
    }
    Ok(())
}
