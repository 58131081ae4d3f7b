//! Real safetensors checkpoints written to a temp dir for the store's tests and the prefetch
//! driver's (headers by hand, so that the tests control where each tensor lands: adjacent, far
//! apart, across shards), and helpers that route through a store and check every byte.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use stevedore_cache::AnticipationParams;
use stevedore_kernels::DType;
use stevedore_models::names::{expert_tensor_names, expert_tensor_shapes};
use stevedore_models::{
    Arch, ExpertPlan, ExpertStream, ExpertTensors, ExpertUse, LayerId, LayerMap, ModelConfig, MoeIndex, Row,
    Served, WeightIndex,
};

use super::*;

/// OLMoE-style: every layer is MoE. Layer 0 is BF16 with each expert's tensors side by side;
/// layer 1 is F32 with all gates, then all ups, then all downs (three reads per expert); layer
/// 2 is BF16 in a second shard with a small tensor between each gate and up.
fn config_json(hidden: usize, inter: usize, experts: usize, layers: usize) -> String {
    json!({"architectures": ["OlmoeForCausalLM"], "vocab_size": 30, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_experts": experts, "num_experts_per_tok": 2})
    .to_string()
}

struct Tensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Deterministic bytes, different for every tensor name.
fn pattern(name: &str, len: usize) -> Vec<u8> {
    let mut x =
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn tensor(name: String, dtype: &'static str, shape: &[usize]) -> Tensor {
    let size = if dtype == "F32" { 4 } else { 2 };
    let data = pattern(&name, shape.iter().product::<usize>() * size);
    Tensor { name, dtype, shape: shape.to_vec(), data }
}

/// Writes a safetensors file with the tensors' data in the given order.
fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for t in tensors {
        let end = offset + t.data.len();
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    for t in tensors {
        bytes.extend_from_slice(&t.data);
    }
    std::fs::write(path, bytes).unwrap();
}

pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub cfg: ModelConfig,
    pub index: WeightIndex,
    pub files: Vec<Vec<u8>>,
}

pub(crate) const SHARDS: [&str; 2] = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];

impl Fixture {
    pub(crate) fn new() -> Self {
        Self::sized(64, 96, 8, 3)
    }

    pub(crate) fn sized(hidden: usize, inter: usize, experts: usize, layers: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::from_json(&config_json(hidden, inter, experts, layers)).unwrap();
        let [g, u, d] = expert_tensor_shapes(&cfg);
        let names = |l, e| expert_tensor_names(Arch::Olmoe, l, e);
        let mut shards: [Vec<Tensor>; 2] =
            [vec![tensor("model.embed_tokens.weight".into(), "BF16", &[30, hidden])], vec![]];
        for layer in 0..layers {
            let (shard, dtype) = match layer % 3 {
                0 => (0, "BF16"),
                1 => (0, "F32"),
                _ => (1, "BF16"),
            };
            let out = &mut shards[shard];
            if layer % 3 == 1 {
                for (t, shape) in [g, u, d].iter().enumerate() {
                    for e in 0..experts {
                        let [n0, n1, n2] = names(layer, e);
                        out.push(tensor([n0, n1, n2][t].clone(), dtype, shape));
                    }
                }
                continue;
            }
            for e in 0..experts {
                let [gate, up, down] = names(layer, e);
                out.push(tensor(gate, dtype, &g));
                if layer % 3 == 2 {
                    out.push(tensor(format!("model.layers.{layer}.mlp.filler.{e}"), "F32", &[25]));
                }
                out.push(tensor(up, dtype, &u));
                out.push(tensor(down, dtype, &d));
            }
        }
        let mut weight_map = BTreeMap::new();
        for (file, tensors) in SHARDS.iter().zip(&shards) {
            write_safetensors(&dir.path().join(file), tensors);
            for t in tensors {
                weight_map.insert(t.name.clone(), *file);
            }
        }
        let index_json = json!({"metadata": {}, "weight_map": weight_map}).to_string();
        std::fs::write(dir.path().join("model.safetensors.index.json"), index_json).unwrap();
        let index = WeightIndex::open(dir.path()).unwrap();
        let files = SHARDS.iter().map(|f| std::fs::read(dir.path().join(f)).unwrap()).collect();
        Fixture { dir, cfg, index, files }
    }

    pub(crate) fn layouts(&self) -> Layouts {
        let map = LayerMap::new(&self.cfg);
        let tensors = ExpertTensors::load(&self.index, &self.cfg, &map).unwrap();
        Layouts::new(&tensors, &map, self.cfg.num_experts_per_tok)
    }

    pub(crate) fn min_budget(&self) -> u64 {
        self.layouts().footprint().min_budget
    }

    fn shards(&self) -> Vec<std::path::PathBuf> {
        self.index.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// A store of `budget` bytes with `opts` (no anticipation).
    pub(crate) fn store(&self, budget: u64, opts: StoreOptions) -> ExpertStore {
        self.try_store(budget, opts, None).unwrap()
    }

    pub(crate) fn try_store(
        &self,
        budget: u64,
        opts: StoreOptions,
        anticipation: Option<(AnticipationParams, u64)>,
    ) -> Result<ExpertStore, StoreError> {
        ExpertStore::new(
            self.layouts(),
            &self.shards(),
            budget,
            opts,
            anticipation,
            self.cfg.num_experts_per_tok,
        )
    }

    /// The file's bytes of `name`, read without the store.
    pub(crate) fn expected(&self, name: &str) -> &[u8] {
        let info = self.index.info(name).unwrap();
        &self.files[info.shard][info.offset as usize..(info.offset + info.len) as usize]
    }

    /// Asserts that `served` is exactly the checkpoint's expert `expert` of `layer`.
    pub(crate) fn check(&self, layer: usize, expert: u32, served: &Served<'_>) {
        let Served::Weights(w) = served else { panic!("layer {layer} expert {expert} was skipped") };
        let names = expert_tensor_names(Arch::Olmoe, layer, expert as usize);
        let shapes = expert_tensor_shapes(&self.cfg);
        let dtype = if layer % 3 == 1 { DType::F32 } else { DType::BF16 };
        for ((weight, name), [rows, cols]) in [w.gate, w.up, w.down].iter().zip(&names).zip(shapes) {
            assert_eq!((weight.dtype, weight.rows, weight.cols), (dtype, rows, cols), "{name}");
            assert!(weight.data == self.expected(name), "{name}: bytes differ from the file");
        }
    }
}

/// The plan of one MoE layer step: `rows[r]` routes to `choices[r]` (weights equal).
pub(crate) struct PlanData {
    layer: usize,
    top_k: usize,
    rows: Vec<Row>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    routed: Vec<bool>,
    uses: Vec<ExpertUse>,
    assigned_rows: Vec<u32>,
    assigned_weights: Vec<f32>,
}

impl PlanData {
    /// One row per expert of `experts` (top-1 routing), the fixture's layers all MoE.
    pub(crate) fn new(layer: usize, experts: &[u32]) -> Self {
        let choices: Vec<Vec<u32>> = experts.iter().map(|&e| vec![e]).collect();
        Self::rows(layer, &choices)
    }

    /// Rows with the given choices (each row's experts, best first; equal top-k).
    pub(crate) fn rows(layer: usize, choices: &[Vec<u32>]) -> Self {
        let top_k = choices.first().map_or(1, Vec::len);
        let rows = (0..choices.len()).map(|i| Row { seq: i as u64, token: 0, pos: 0 }).collect();
        let ids: Vec<u32> = choices.iter().flatten().copied().collect();
        let weights = vec![1.0 / top_k as f32; ids.len()];
        let mut experts: Vec<u32> = ids.clone();
        experts.sort_unstable();
        experts.dedup();
        let (mut uses, mut assigned_rows, mut assigned_weights) = (Vec::new(), Vec::new(), Vec::new());
        for &e in &experts {
            let start = assigned_rows.len();
            for (r, c) in choices.iter().enumerate() {
                if c.contains(&e) {
                    assigned_rows.push(r as u32);
                    assigned_weights.push(1.0 / top_k as f32);
                }
            }
            uses.push(ExpertUse { expert: e, assigned: start..assigned_rows.len() });
        }
        PlanData {
            layer,
            top_k,
            routed: vec![true; choices.len()],
            rows,
            ids,
            weights,
            uses,
            assigned_rows,
            assigned_weights,
        }
    }

    pub(crate) fn plan(&self) -> ExpertPlan<'_> {
        ExpertPlan {
            layer: LayerId(self.layer),
            moe: MoeIndex(self.layer),
            top_k: self.top_k,
            rows: &self.rows,
            topk_ids: &self.ids,
            topk_weights: &self.weights,
            routed: &self.routed,
            experts: &self.uses,
            assigned_rows: &self.assigned_rows,
            assigned_weights: &self.assigned_weights,
            ahead: &[],
        }
    }
}

/// Streams every expert of `plan` from `store` with `candidates`, checking each one's bytes;
/// returns the experts in the order they came. The first failure ends it.
pub(crate) fn stream_all(
    fx: &Fixture,
    store: &ExpertStore,
    plan: &ExpertPlan<'_>,
    candidates: &[stevedore_cache::Candidate],
) -> Result<Vec<u32>, String> {
    let mut s = store.stream(plan, candidates).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    while let Some(item) = s.next() {
        let (i, w) = item.map_err(|f| f.error.to_string())?;
        let e = plan.experts[i].expert;
        fx.check(plan.layer.0, e, &w);
        seen.push(e);
    }
    Ok(seen)
}

/// One layer step over `experts` of `layer` (one row each); the experts in delivery order.
pub(crate) fn route(
    fx: &Fixture,
    store: &ExpertStore,
    layer: usize,
    experts: &[u32],
) -> Result<Vec<u32>, String> {
    let data = PlanData::new(layer, experts);
    stream_all(fx, store, &data.plan(), &[])
}

/// A deterministic mix of decode steps (top_k experts) and prefill batches (most experts).
pub(crate) fn workload(fx: &Fixture, steps: usize) -> Vec<(usize, Vec<u32>)> {
    let (mut x, n) = (0x9e37_79b9u64, fx.cfg.num_experts as u64);
    let mut out = Vec::new();
    for step in 0..steps {
        for layer in 0..fx.cfg.num_hidden_layers {
            let mut set = std::collections::BTreeSet::new();
            let want = if step % 5 == 0 { n - 1 } else { fx.cfg.num_experts_per_tok as u64 };
            while (set.len() as u64) < want {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                set.insert(((x >> 33) % n) as u32);
            }
            out.push((layer, set.into_iter().collect()));
        }
    }
    out
}

/// Waits for queued reads to land, then says whether the store holds no pin and no buffer
/// beyond its accounted entries (every byte of the budget could be reclaimed).
pub(crate) fn nothing_pinned(store: &ExpertStore) -> bool {
    let shared = &store.shared;
    let mut st = shared.lock();
    while st.slots.busy() {
        st = shared.wait(&shared.landed, st);
    }
    st.tier.cache().pinned_bytes() == 0
}

pub(crate) fn all_experts(fx: &Fixture) -> Vec<u32> {
    (0..fx.cfg.num_experts as u32).collect()
}
