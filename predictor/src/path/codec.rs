//! The path model's file format, as bytes (the engine reads and writes the file).
//!
//! Little-endian throughout:
//! ```text
//! magic        8 bytes  "STVDPATH"
//! version      u32      1
//! moe_layers, num_experts, top_k, max_depth, context_layers, num_token_rows: u32 each
//! token_ids    u32 x num_token_rows, strictly increasing
//! bias         f32 x positions * num_experts
//! token_w      f32 x num_token_rows * moe_layers * num_experts
//! layer_w      f32 x blocks * num_experts^2
//! recent_w     f32 x positions * num_experts
//! ```
//! where `positions = moe_layers + min(max_depth, moe_layers)` and `blocks` counts the (target
//! position, source layer) pairs a prediction can use (see `backs` in the parent module).

use super::{ModelError, PathModel};
use crate::RoutingShape;

const MAGIC: &[u8; 8] = b"STVDPATH";
const VERSION: u32 = 1;
/// Generous limits that keep a corrupt header from asking for absurd allocations.
const MAX_LAYERS: u64 = 4096;
const MAX_EXPERTS: u64 = 1 << 16;
/// Largest model accepted, in weights (4 GiB of f32).
const MAX_WEIGHTS: u64 = 1 << 30;

impl PathModel {
    /// Serialises the model (see the module docs for the layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.bias.len() + self.token_w.len() + self.layer_w.len() + self.recent_w.len();
        let mut out = Vec::with_capacity(8 + 4 * (7 + self.token_ids.len() + n));
        out.extend_from_slice(MAGIC);
        let s = self.shape;
        for v in [VERSION as usize, s.moe_layers, s.num_experts, s.top_k, self.max_depth, self.context]
            .into_iter()
            .chain([self.token_ids.len()])
        {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for id in &self.token_ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        for w in self.bias.iter().chain(&self.token_w).chain(&self.layer_w).chain(&self.recent_w) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Parses bytes written by [`PathModel::to_bytes`], checking every size against the header
    /// and the data length before allocating.
    pub fn from_bytes(bytes: &[u8]) -> Result<PathModel, ModelError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(8)? != MAGIC {
            return Err(ModelError::BadMagic);
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(ModelError::UnsupportedVersion(version));
        }
        let moe_layers = r.dim("moe_layers", 1, MAX_LAYERS)?;
        let num_experts = r.dim("num_experts", 1, MAX_EXPERTS)?;
        let top_k = r.dim("top_k", 1, num_experts)?;
        let max_depth = r.dim("max_depth", 1, MAX_LAYERS)?;
        let context = r.dim("context_layers", 1, MAX_LAYERS)?;
        let rows = r.dim("num_token_rows", 0, u32::MAX as u64)?;

        let positions = moe_layers + max_depth.min(moe_layers);
        let offsets = super::layer_offsets(moe_layers as usize, max_depth as usize, context as usize);
        let blocks = offsets[offsets.len() - 1] as u64;
        let counts = [
            positions * num_experts,
            rows * moe_layers * num_experts,
            blocks * num_experts * num_experts,
            positions * num_experts,
        ];
        let weights: u64 = counts.iter().sum();
        if weights > MAX_WEIGHTS {
            return Err(ModelError::BadDimension { field: "total weights", value: weights });
        }
        let needed = r.at as u64 + 4 * (rows + weights);
        if needed > bytes.len() as u64 {
            return Err(ModelError::Truncated { needed, have: bytes.len() as u64 });
        }
        if needed < bytes.len() as u64 {
            return Err(ModelError::TrailingBytes(bytes.len() as u64 - needed));
        }

        let mut token_ids = Vec::with_capacity(rows as usize);
        for i in 0..rows as usize {
            let id = r.u32()?;
            if token_ids.last().is_some_and(|&prev| prev >= id) {
                return Err(ModelError::UnsortedTokenIds(i));
            }
            token_ids.push(id);
        }
        let shape = RoutingShape {
            moe_layers: moe_layers as usize,
            num_experts: num_experts as usize,
            top_k: top_k as usize,
        };
        Ok(PathModel {
            shape,
            max_depth: max_depth as usize,
            context: context as usize,
            token_ids,
            bias: r.floats("bias", counts[0])?,
            token_w: r.floats("token_w", counts[1])?,
            layer_w: r.floats("layer_w", counts[2])?,
            layer_offsets: offsets,
            recent_w: r.floats("recent_w", counts[3])?,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end =
            self.at.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or(ModelError::Truncated {
                needed: self.at as u64 + n as u64,
                have: self.bytes.len() as u64,
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn dim(&mut self, field: &'static str, min: u64, max: u64) -> Result<u64, ModelError> {
        let value = self.u32()? as u64;
        if value < min || value > max {
            return Err(ModelError::BadDimension { field, value });
        }
        Ok(value)
    }

    fn floats(&mut self, name: &'static str, n: u64) -> Result<Vec<f32>, ModelError> {
        let b = self.take(4 * n as usize)?;
        let out: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if out.iter().any(|w| !w.is_finite()) {
            return Err(ModelError::NonFinite(name));
        }
        Ok(out)
    }
}
