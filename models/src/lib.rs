//! Model configs, the safetensors weight index, and each architecture's forward pass. Models
//! never know where an expert lives: an MoE layer describes its routing to an [`Experts`] source
//! and is handed each expert's weights.

mod attention;
pub mod config;
mod error;
pub mod experts;
mod model;
mod moe;
pub mod names;
mod tensor;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::Error;
pub use experts::{ExpertWeights, Experts, ExpertsError, LayerRouting, MappedExperts};
pub use model::{KvCache, Model};
pub use weights::{TensorInfo, TensorRef, WeightIndex};
