//! Two ways to count layers, kept apart by type: a decoder layer ([`LayerId`], the `N` of
//! `model.layers.N` in tensor names) and an MoE layer ([`MoeIndex`], the position among the
//! layers that have routed experts, which is what routing traces and predictors count). The
//! [`LayerMap`] between them is built once, from the config.

use crate::ModelConfig;

/// A decoder layer, as numbered in tensor names and configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub usize);

/// An MoE layer: 0 is the first decoder layer with routed experts, 1 the next, and so on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoeIndex(pub usize);

impl std::fmt::Display for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "decoder layer {}", self.0)
    }
}

impl std::fmt::Display for MoeIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MoE layer {}", self.0)
    }
}

/// Which decoder layers have routed experts, both ways.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerMap {
    /// The decoder layer of each MoE layer, ascending.
    moe_layers: Vec<LayerId>,
    /// The MoE index of each decoder layer; `None` for dense ones.
    moe: Vec<Option<MoeIndex>>,
}

impl LayerMap {
    pub fn new(cfg: &ModelConfig) -> Self {
        let moe_layers: Vec<LayerId> = cfg.moe_layers().map(LayerId).collect();
        let mut moe = vec![None; cfg.num_hidden_layers];
        for (m, l) in moe_layers.iter().enumerate() {
            moe[l.0] = Some(MoeIndex(m));
        }
        LayerMap { moe_layers, moe }
    }

    pub fn num_decoder_layers(&self) -> usize {
        self.moe.len()
    }

    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers.len()
    }

    /// The decoder layers with routed experts, in order (index `m` is [`MoeIndex`] `m`).
    pub fn moe_layers(&self) -> &[LayerId] {
        &self.moe_layers
    }

    /// The MoE index of decoder layer `layer`, or `None` if it is dense or out of range.
    pub fn moe(&self, layer: LayerId) -> Option<MoeIndex> {
        self.moe.get(layer.0).copied().flatten()
    }

    /// The decoder layer of MoE layer `m`, or `None` past the last.
    pub fn decoder(&self, m: MoeIndex) -> Option<LayerId> {
        self.moe_layers.get(m.0).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways_around_dense_layers() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures":["Qwen3MoeForCausalLM"],"vocab_size":32,"hidden_size":16,
            "intermediate_size":24,"moe_intermediate_size":8,"num_hidden_layers":5,"num_attention_heads":4,
            "num_experts":8,"num_experts_per_tok":2,"mlp_only_layers":[0,3]}"#,
        )
        .unwrap();
        let map = LayerMap::new(&cfg);
        assert_eq!(map.moe_layers(), [LayerId(1), LayerId(2), LayerId(4)]);
        assert_eq!((map.num_decoder_layers(), map.num_moe_layers()), (5, 3));
        assert_eq!(map.moe(LayerId(4)), Some(MoeIndex(2)));
        assert_eq!(map.moe(LayerId(3)), None);
        assert_eq!(map.moe(LayerId(9)), None);
        assert_eq!(map.decoder(MoeIndex(1)), Some(LayerId(2)));
        assert_eq!(map.decoder(MoeIndex(3)), None);
    }
}
