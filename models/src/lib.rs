//! Model configs, the safetensors weight index, and each architecture's forward pass over a
//! batch of sequences. Models never know where an expert lives: an MoE layer describes what it
//! needs to an [`ExpertSource`] and is handed each expert's weights as they become ready.

mod attention;
mod batch;
pub mod config;
mod error;
pub mod experts;
pub mod family;
pub mod kv;
mod layers;
mod mla;
mod model;
mod moe;
pub mod names;
pub mod profile;
pub mod quantized;
mod tensor;
pub mod weights;

pub use batch::{Batch, Logits, Row, SeqId, Span};
pub use config::{Arch, ModelConfig, RopeKind, RouterKind};
pub use error::Error;
pub use experts::{
    ExpertFailure, ExpertPlan, ExpertSource, ExpertStream, ExpertTensors, ExpertUse, ExpertWeights,
    ExpertsError, Foresight, GateEstimate, GateInput, MappedExperts, ReadyExperts, Served, TensorLoc,
};
pub use family::QkNormKind;
pub use kv::{KvError, KvPool};
pub use layers::{LayerId, LayerMap, MoeIndex};
pub use model::{Forward, Model};
pub use quantized::{LowBitExperts, LOW_BIT_FORMATS};
pub use weights::{TensorInfo, TensorRef, WeightIndex};
