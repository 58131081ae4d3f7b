//! Model configs, the safetensors weight index, and each architecture's forward pass. Models
//! never know where an expert lives: an MoE layer describes its routing to an [`Experts`] source
//! and is handed each expert's weights.

pub mod config;
mod error;
pub mod experts;
pub mod names;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::Error;
pub use experts::{ExpertWeights, Experts, ExpertsError, LayerRouting};
pub use weights::{TensorInfo, TensorRef, WeightIndex};
