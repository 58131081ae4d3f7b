//! Dense weights held by a loaded model: matrices stay in the memory-mapped checkpoint and are
//! read in place; small vectors (norms, biases) are converted to f32 once at load.

use stevedore_kernels::{Backend, DType, Weight};

use crate::{Error, WeightIndex};

/// A matrix inside one of the checkpoint's mapped shards.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    shard: usize,
    start: usize,
    dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

impl Mat {
    pub fn load(index: &WeightIndex, name: &str, rows: usize, cols: usize) -> Result<Self, Error> {
        let (info, dtype) = index.check(name, &[rows, cols])?;
        Ok(Mat { shard: info.shard, start: info.offset as usize, dtype, rows, cols })
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.dtype.bytes(self.cols).expect("checked at load: rows of whole blocks")
    }

    pub fn weight<'a>(&self, index: &'a WeightIndex) -> Weight<'a> {
        let data = &index.shard_data(self.shard)[self.start..self.start + self.bytes()];
        Weight { dtype: self.dtype, data, rows: self.rows, cols: self.cols }
    }
}

/// A normalisation layer: RMSNorm, or LayerNorm with bias (Phi-3.5-MoE), with its epsilon.
pub struct Norm {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    eps: f32,
}

impl Norm {
    /// `{name}.weight` (and `{name}.bias` for a LayerNorm) of `len` elements.
    pub fn load(
        index: &WeightIndex,
        name: &str,
        len: usize,
        cfg: &crate::ModelConfig,
    ) -> Result<Self, Error> {
        Ok(Norm {
            weight: load_vec(index, &format!("{name}.weight"), len)?,
            bias: match cfg.layer_norm {
                true => Some(load_vec(index, &format!("{name}.bias"), len)?),
                false => None,
            },
            eps: cfg.rms_norm_eps,
        })
    }

    /// Normalises each row of `x` in place.
    pub fn apply(&self, x: &mut [f32]) {
        match &self.bias {
            None => stevedore_kernels::rms_norm(x, &self.weight, self.eps),
            Some(b) => stevedore_kernels::layer_norm(x, &self.weight, b, self.eps),
        }
    }
}

/// A 1-D tensor of `len` elements, converted to f32.
pub fn load_vec(index: &WeightIndex, name: &str, len: usize) -> Result<Vec<f32>, Error> {
    Ok(index.get(name, &[len])?.to_f32_vec())
}

/// [`linear`] of the same `x` through several matrices of the same input width, as one
/// backend launch.
pub fn linears(
    index: &WeightIndex,
    backend: &dyn Backend,
    x: &[f32],
    ws: &[(&Mat, Option<&[f32]>)],
) -> Vec<Vec<f32>> {
    let n = ws.first().map_or(0, |(w, _)| x.len() / w.cols);
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|(w, _)| vec![0.0; n * w.rows]).collect();
    let mut parts: Vec<_> =
        ws.iter().zip(outs.iter_mut()).map(|((w, _), o)| (w.weight(index), &mut o[..])).collect();
    backend.matmuls(x, &mut parts);
    for ((w, bias), out) in ws.iter().zip(outs.iter_mut()) {
        if let Some(b) = bias {
            for row in out.chunks_mut(w.rows) {
                row.iter_mut().zip(b.iter()).for_each(|(o, b)| *o += b);
            }
        }
    }
    outs
}

/// `y = x @ w^T (+ bias)` for a batch of rows of `x`.
pub fn linear(
    index: &WeightIndex,
    backend: &dyn Backend,
    x: &[f32],
    w: &Mat,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    linears(index, backend, x, &[(w, bias)]).pop().expect("one matrix in, one output out")
}
