//! A random OLMoE-shaped checkpoint in the Hugging Face hub layout, written streaming.
//!
//! The benchmark needs a checkpoint of a few GB with a realistic shape, and must not hold it in
//! RAM: the whole point is that experts do not fit. So the layout is planned first (names, shapes,
//! shard of every tensor, each shard's safetensors header), and the data is then generated chunk by
//! chunk straight into the files. The plan is a pure function of [`Shape`], which lets a later run
//! reuse a kept directory and still know every expert's byte range without parsing anything.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use half::bf16;
use serde::Serialize;
use serde_json::json;

use crate::direct::DirectWriter;

/// Hyper-parameters of the random checkpoint (names follow config.json where one exists).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Intermediate size of one routed expert (`intermediate_size` in OLMoE's config.json).
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Decoder layers per safetensors shard.
    pub layers_per_shard: usize,
}

impl Default for Shape {
    /// OLMoE-1B-7B's hidden size and depth with half its experts and a smaller vocabulary: about
    /// 5.4 GB in bf16, of which 4.5 GiB are experts.
    fn default() -> Self {
        Shape {
            hidden_size: 2048,
            num_hidden_layers: 16,
            num_attention_heads: 16,
            num_key_value_heads: 4,
            num_experts: 32,
            num_experts_per_tok: 8,
            intermediate_size: 768,
            vocab_size: 32000,
            layers_per_shard: 4,
        }
    }
}

/// Standard deviation of the random matrices: small enough that activations stay finite through
/// every layer, like the 0.02 initialiser of the published configs.
pub const WEIGHT_STD: f32 = 0.02;
/// Router weights are larger so that different tokens pick different experts with clear margins.
pub const ROUTER_STD: f32 = 0.1;
/// Embeddings are large next to what the layers add, so the current token dominates the residual
/// stream: routing differs from token to token, and greedy decoding walks a random map over the
/// vocabulary instead of settling on one token that every context maps to (which would make
/// every step route alike and flatter the cache).
pub const EMBED_STD: f32 = 1.0;
const BF16_BYTES: u64 = 2;

impl Shape {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("layers_per_shard", self.layers_per_shard),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(format!("shape: `{name}` must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) || !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "shape: hidden size {} must split into {} heads of even size",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "shape: {} key/value heads must divide {} attention heads",
                self.num_key_value_heads, self.num_attention_heads
            ));
        }
        if self.num_experts_per_tok > self.num_experts {
            return Err(format!(
                "shape: top-k {} exceeds the {} experts",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        Ok(())
    }

    /// Bytes of one routed expert (gate, up and down projections in bf16).
    pub fn expert_bytes(&self) -> u64 {
        3 * (self.hidden_size * self.intermediate_size) as u64 * BF16_BYTES
    }

    /// Bytes of expert weights one token reads: top-k experts in every (MoE) layer.
    pub fn expert_bytes_touched_per_token(&self) -> u64 {
        (self.num_experts_per_tok * self.num_hidden_layers) as u64 * self.expert_bytes()
    }

    /// config.json for `OlmoeForCausalLM`. `eos_token_id` is left out on purpose: a random model
    /// could emit any id, and the benchmark needs every run to produce exactly the tokens it asks for.
    pub fn config_json(&self) -> String {
        let cfg = json!({
            "architectures": ["OlmoeForCausalLM"],
            "model_type": "olmoe",
            "attention_bias": false,
            "bos_token_id": 1,
            "clip_qkv": null,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": WEIGHT_STD,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 4096,
            "norm_topk_prob": false,
            "num_attention_heads": self.num_attention_heads,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "vocab_size": self.vocab_size,
        });
        serde_json::to_string_pretty(&cfg).expect("a JSON value always serialises")
    }
}

/// How a tensor's values are made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// RMSNorm weights.
    Ones,
    /// Uniform with this standard deviation, from a generator seeded by the tensor's name.
    Uniform { std: f32 },
}

/// What a tensor is, as far as the benchmark's byte accounting cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Expert {
        layer: usize,
        expert: usize,
    },
    /// `model.embed_tokens.weight`: a token reads one row of it, not the whole matrix.
    Embedding,
    /// Every other resident weight (attention, norms, routers, lm_head).
    Dense,
}

#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub role: Role,
}

impl TensorSpec {
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * BF16_BYTES
    }
}

/// One safetensors file: its tensors in file order and where each lies.
#[derive(Clone, Debug)]
pub struct Shard {
    pub file_name: String,
    pub tensors: Vec<TensorSpec>,
    /// The 8-byte length prefix and the padded JSON header: exactly the file's first bytes.
    pub header: Vec<u8>,
    /// Absolute file offsets `[start, end)` of each tensor's data, parallel to `tensors`.
    pub ranges: Vec<Range>,
}

impl Shard {
    pub fn file_len(&self) -> u64 {
        self.ranges.last().map_or(self.header.len() as u64, |r| r.1)
    }
}

/// One expert's bytes in the checkpoint: its three tensors, which the plan lays out contiguously.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertSpan {
    pub layer: usize,
    pub expert: usize,
    pub shard: usize,
    pub start: u64,
    pub end: u64,
}

/// Every tensor of the checkpoint, its shard and byte range.
#[derive(Clone, Debug)]
pub struct Plan {
    pub shape: Shape,
    pub shards: Vec<Shard>,
}

impl Plan {
    pub fn new(shape: Shape) -> Result<Plan, String> {
        shape.validate()?;
        let s = &shape;
        let (h, hd) = (s.hidden_size, s.head_dim());
        let (q_dim, kv_dim) = (s.num_attention_heads * hd, s.num_key_value_heads * hd);
        let spec = |name: String, shape: Vec<usize>, init, role| TensorSpec { name, shape, init, role };
        let weight = Init::Uniform { std: WEIGHT_STD };
        // Projections back into the residual stream get GPT-2's scaled initialisation,
        // 0.02 / sqrt(2 x layers), so sixteen layers' additions stay small next to the embedding.
        let out_proj = Init::Uniform { std: WEIGHT_STD / (2.0 * s.num_hidden_layers as f32).sqrt() };
        let embed = Init::Uniform { std: EMBED_STD };
        let n_shards = s.num_hidden_layers.div_ceil(s.layers_per_shard);
        let mut shards = Vec::with_capacity(n_shards);
        for i in 0..n_shards {
            let mut t = Vec::new();
            if i == 0 {
                t.push(spec(
                    "model.embed_tokens.weight".into(),
                    vec![s.vocab_size, h],
                    embed,
                    Role::Embedding,
                ));
            }
            let first = i * s.layers_per_shard;
            for l in first..(first + s.layers_per_shard).min(s.num_hidden_layers) {
                let p = format!("model.layers.{l}");
                for norm in ["input_layernorm", "post_attention_layernorm"] {
                    t.push(spec(format!("{p}.{norm}.weight"), vec![h], Init::Ones, Role::Dense));
                }
                let a = format!("{p}.self_attn");
                t.push(spec(format!("{a}.q_proj.weight"), vec![q_dim, h], weight, Role::Dense));
                t.push(spec(format!("{a}.k_proj.weight"), vec![kv_dim, h], weight, Role::Dense));
                t.push(spec(format!("{a}.v_proj.weight"), vec![kv_dim, h], weight, Role::Dense));
                t.push(spec(format!("{a}.o_proj.weight"), vec![h, q_dim], out_proj, Role::Dense));
                // OLMoE normalises q and k over the whole projection, not per head.
                t.push(spec(format!("{a}.q_norm.weight"), vec![q_dim], Init::Ones, Role::Dense));
                t.push(spec(format!("{a}.k_norm.weight"), vec![kv_dim], Init::Ones, Role::Dense));
                let router = Init::Uniform { std: ROUTER_STD };
                t.push(spec(format!("{p}.mlp.gate.weight"), vec![s.num_experts, h], router, Role::Dense));
                for e in 0..s.num_experts {
                    let x = format!("{p}.mlp.experts.{e}");
                    let role = Role::Expert { layer: l, expert: e };
                    let i = s.intermediate_size;
                    t.push(spec(format!("{x}.gate_proj.weight"), vec![i, h], weight, role));
                    t.push(spec(format!("{x}.up_proj.weight"), vec![i, h], weight, role));
                    t.push(spec(format!("{x}.down_proj.weight"), vec![h, i], out_proj, role));
                }
            }
            if i + 1 == n_shards {
                t.push(spec("model.norm.weight".into(), vec![h], Init::Ones, Role::Dense));
                t.push(spec("lm_head.weight".into(), vec![s.vocab_size, h], weight, Role::Dense));
            }
            // Files written by `safetensors` (and so by transformers) store tensors sorted by name;
            // one expert's down, gate and up projections end up next to each other.
            t.sort_by(|a, b| a.name.cmp(&b.name));
            let (header, rel) = safetensors_header(&t)?;
            let base = header.len() as u64;
            let ranges = rel.iter().map(|&(a, b)| (base + a, base + b)).collect();
            let file_name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards);
            shards.push(Shard { file_name, tensors: t, header, ranges });
        }
        Ok(Plan { shape, shards })
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(Shard::file_len).sum()
    }

    /// Bytes of the tensor data alone (what `model.safetensors.index.json` calls `total_size`).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors().map(|(_, t)| t.bytes()).sum()
    }

    pub fn expert_bytes_total(&self) -> u64 {
        self.tensors().filter(|(_, t)| matches!(t.role, Role::Expert { .. })).map(|(_, t)| t.bytes()).sum()
    }

    /// Dense weight bytes one decode step reads: every resident matrix once, plus one embedding row.
    pub fn dense_bytes_touched_per_token(&self) -> u64 {
        let dense: u64 = self.tensors().filter(|(_, t)| t.role == Role::Dense).map(|(_, t)| t.bytes()).sum();
        dense + self.shape.hidden_size as u64 * BF16_BYTES
    }

    fn tensors(&self) -> impl Iterator<Item = (usize, &TensorSpec)> {
        self.shards.iter().enumerate().flat_map(|(i, s)| s.tensors.iter().map(move |t| (i, t)))
    }

    /// Every expert's byte span, in file order; an error if one is not contiguous.
    pub fn expert_spans(&self) -> Result<Vec<ExpertSpan>, String> {
        let mut spans: BTreeMap<(usize, usize), ExpertSpan> = BTreeMap::new();
        for (si, shard) in self.shards.iter().enumerate() {
            for (t, &(a, b)) in shard.tensors.iter().zip(&shard.ranges) {
                if let Role::Expert { layer, expert } = t.role {
                    let span = spans.entry((layer, expert)).or_insert(ExpertSpan {
                        layer,
                        expert,
                        shard: si,
                        start: a,
                        end: b,
                    });
                    span.start = span.start.min(a);
                    span.end = span.end.max(b);
                }
            }
        }
        let mut out: Vec<ExpertSpan> = spans.into_values().collect();
        if let Some(s) = out.iter().find(|s| s.end - s.start != self.shape.expert_bytes()) {
            return Err(format!("expert ({}, {}) is not stored contiguously", s.layer, s.expert));
        }
        out.sort_by_key(|s| (s.shard, s.start));
        Ok(out)
    }

    /// `model.safetensors.index.json`: which shard holds each tensor.
    pub fn index_json(&self) -> String {
        let mut map = serde_json::Map::new();
        for s in &self.shards {
            for t in &s.tensors {
                map.insert(t.name.clone(), json!(s.file_name));
            }
        }
        let index = json!({ "metadata": { "total_size": self.tensor_bytes() }, "weight_map": map });
        serde_json::to_string_pretty(&index).expect("a JSON value always serialises")
    }

    /// Whether `dir` already holds this exact checkpoint (same config and shard sizes), so a kept
    /// directory can be reused without writing gigabytes again.
    pub fn is_written_in(&self, dir: &Path) -> bool {
        let same_config =
            std::fs::read_to_string(dir.join("config.json")).is_ok_and(|c| c == self.shape.config_json());
        same_config
            && self
                .shards
                .iter()
                .all(|s| std::fs::metadata(dir.join(&s.file_name)).is_ok_and(|m| m.len() == s.file_len()))
    }

    /// Writes the shards (with O_DIRECT where allowed, see [`crate::direct`]), the index and
    /// config.json (last, so a half-written directory is never taken for a whole one).
    pub fn write(&self, dir: &Path, threads: usize, log: &mut dyn FnMut(&str)) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
        let _ = std::fs::remove_file(dir.join("config.json"));
        let mut chunk = vec![0u8; CHUNK_BYTES];
        for shard in &self.shards {
            let path = dir.join(&shard.file_name);
            let t0 = Instant::now();
            let mut f = DirectWriter::create(&path, CHUNK_BYTES)?;
            f.write(&shard.header)?;
            for t in &shard.tensors {
                let seed = name_seed(&t.name);
                let mut done = 0u64;
                while done < t.bytes() {
                    let n = (t.bytes() - done).min(CHUNK_BYTES as u64) as usize;
                    fill(&mut chunk[..n], t.init, seed, done, threads);
                    f.write(&chunk[..n])?;
                    done += n as u64;
                }
            }
            let direct = f.direct;
            let len = f.finish()?;
            if len != shard.file_len() {
                return Err(format!("{}: wrote {len} bytes, planned {}", path.display(), shard.file_len()));
            }
            let secs = t0.elapsed().as_secs_f64();
            log(&format!(
                "wrote {} ({:.2} GB, {:.2} GB/s{})",
                shard.file_name,
                shard.file_len() as f64 / 1e9,
                shard.file_len() as f64 / 1e9 / secs,
                if direct { ", O_DIRECT" } else { "" }
            ));
        }
        for (name, text) in
            [("model.safetensors.index.json", self.index_json()), ("config.json", self.shape.config_json())]
        {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: write failed: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// A byte range `[start, end)`.
pub type Range = (u64, u64);

/// Builds a safetensors header for bf16 `tensors` stored back to back in the given order: the
/// 8-byte little-endian length, then JSON padded with spaces to a multiple of 8 bytes (as the
/// format asks). Returns it with each tensor's `[start, end)` relative to the data section.
pub fn safetensors_header(tensors: &[TensorSpec]) -> Result<(Vec<u8>, Vec<Range>), String> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut ranges = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.bytes();
        let prev = map.insert(
            t.name.clone(),
            json!({ "dtype": "BF16", "shape": t.shape, "data_offsets": [offset, end] }),
        );
        if prev.is_some() || t.name == "__metadata__" {
            return Err(format!("tensor name `{}` appears twice", t.name));
        }
        ranges.push((offset, end));
        offset = end;
    }
    let mut text = serde_json::to_string(&map).expect("a JSON value always serialises").into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut header = (text.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&text);
    Ok((header, ranges))
}

/// Write granularity: large enough for sequential disk speed, small enough to stay out of the way.
const CHUNK_BYTES: usize = 8 << 20;
/// Values come in independently seeded blocks so the output does not depend on the thread count.
const BLOCK_BYTES: usize = 1 << 20;

/// Fills `buf` with the bf16 values at byte `offset` of a tensor made by `init` from `seed`.
fn fill(buf: &mut [u8], init: Init, seed: u64, offset: u64, threads: usize) {
    debug_assert!(offset.is_multiple_of(BLOCK_BYTES as u64));
    match init {
        Init::Ones => {
            let one = bf16::ONE.to_le_bytes();
            buf.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&one));
        }
        Init::Uniform { std } => {
            let first_block = offset / BLOCK_BYTES as u64;
            let per_thread = buf.len().div_ceil(BLOCK_BYTES).div_ceil(threads.max(1)) * BLOCK_BYTES;
            std::thread::scope(|scope| {
                for (t, part) in buf.chunks_mut(per_thread).enumerate() {
                    let first = first_block + (t * per_thread / BLOCK_BYTES) as u64;
                    scope.spawn(move || {
                        for (i, block) in part.chunks_mut(BLOCK_BYTES).enumerate() {
                            let index = first + i as u64;
                            fill_uniform(block, std, seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93));
                        }
                    });
                }
            });
        }
    }
}

/// Uniform values in `[-a, a]` with `a = std * sqrt(3)`, four per 64 random bits.
fn fill_uniform(buf: &mut [u8], std: f32, seed: u64) {
    let scale = std * 3f32.sqrt() / 32768.0;
    let mut rng = SplitMix64(seed);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        let r = rng.next_u64();
        for (i, out) in w.chunks_exact_mut(2).enumerate() {
            let u = (r >> (16 * i)) as u16;
            let x = (u as i32 - 32768) as f32 * scale;
            out.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
        }
    }
    // Tensors hold whole bf16 values, so a tail is a multiple of 2 bytes.
    for out in words.into_remainder().chunks_exact_mut(2) {
        let x = ((rng.next_u64() >> 48) as i32 - 32768) as f32 * scale;
        out.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
    }
}

/// SplitMix64: tiny and fast; statistical quality is irrelevant for random weights.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// FNV-1a of the tensor name: each tensor gets its own stream, stable across runs.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use safetensors::{Dtype, SafeTensors};

    use super::*;

    fn tiny() -> Shape {
        Shape {
            hidden_size: 16,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            num_experts: 4,
            num_experts_per_tok: 2,
            intermediate_size: 8,
            vocab_size: 32,
            layers_per_shard: 2,
        }
    }

    fn bf16s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
    }

    #[test]
    fn header_round_trips_through_the_safetensors_reader() {
        let weight = Init::Uniform { std: WEIGHT_STD };
        let t = |name: &str, shape: Vec<usize>| TensorSpec {
            name: name.into(),
            shape,
            init: weight,
            role: Role::Dense,
        };
        let tensors = vec![t("b.weight", vec![3, 5]), t("a.weight", vec![7]), t("c", vec![2, 1, 2])];
        let (header, ranges) = safetensors_header(&tensors).unwrap();
        assert_eq!((header.len() - 8) % 8, 0, "JSON must be padded to 8 bytes");
        assert_eq!(u64::from_le_bytes(header[..8].try_into().unwrap()) as usize, header.len() - 8);
        assert_eq!(ranges, vec![(0, 30), (30, 44), (44, 52)]);
        let mut file = header.clone();
        for (i, t) in tensors.iter().enumerate() {
            file.extend((0..t.bytes()).map(|b| (b as u8).wrapping_mul(i as u8 + 1)));
        }
        let st = SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.len(), 3);
        for (i, t) in tensors.iter().enumerate() {
            let view = st.tensor(&t.name).unwrap();
            assert_eq!(view.dtype(), Dtype::BF16);
            assert_eq!(view.shape(), &t.shape[..]);
            let want: Vec<u8> = (0..t.bytes()).map(|b| (b as u8).wrapping_mul(i as u8 + 1)).collect();
            assert_eq!(view.data(), &want[..], "{}", t.name);
        }
    }

    #[test]
    fn header_rejects_a_repeated_name() {
        let t = TensorSpec { name: "x".into(), shape: vec![2], init: Init::Ones, role: Role::Dense };
        let err = safetensors_header(&[t.clone(), t]).unwrap_err();
        assert!(err.contains("`x` appears twice"), "{err}");
    }

    #[test]
    fn written_checkpoint_reads_back_with_its_index() {
        let plan = Plan::new(tiny()).unwrap();
        assert_eq!(plan.shards.len(), 2);
        let dir = crate::TempDir::new("checkpoint-test").unwrap();
        plan.write(dir.path(), 3, &mut |_| {}).unwrap();
        assert!(plan.is_written_in(dir.path()));

        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let mut seen = 0;
        let a = WEIGHT_STD * 3f32.sqrt() * 1.01;
        for shard in &plan.shards {
            let bytes = std::fs::read(dir.path().join(&shard.file_name)).unwrap();
            assert_eq!(bytes.len() as u64, shard.file_len());
            let st = SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.len(), shard.tensors.len());
            for t in &shard.tensors {
                assert_eq!(map[&t.name], shard.file_name.as_str());
                let values = bf16s(st.tensor(&t.name).unwrap().data());
                match t.init {
                    Init::Ones => assert!(values.iter().all(|&v| v == 1.0), "{}", t.name),
                    Init::Uniform { std } => {
                        let a = a * std / WEIGHT_STD;
                        assert!(values.iter().all(|v| v.abs() <= a), "{}", t.name);
                        assert!(values.iter().any(|&v| v != values[0]), "{} is constant", t.name);
                    }
                }
                seen += 1;
            }
        }
        assert_eq!(map.len(), seen);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["architectures"][0], "OlmoeForCausalLM");
        assert_eq!(cfg["num_experts"], 4);
        assert_eq!(cfg["intermediate_size"], 8);
        assert_eq!(index["metadata"]["total_size"], plan.tensor_bytes());
    }

    #[test]
    fn output_does_not_depend_on_the_thread_count() {
        let plan = Plan::new(tiny()).unwrap();
        let one = crate::TempDir::new("threads-1").unwrap();
        let four = crate::TempDir::new("threads-4").unwrap();
        plan.write(one.path(), 1, &mut |_| {}).unwrap();
        plan.write(four.path(), 4, &mut |_| {}).unwrap();
        for s in &plan.shards {
            let a = std::fs::read(one.path().join(&s.file_name)).unwrap();
            assert_eq!(a, std::fs::read(four.path().join(&s.file_name)).unwrap(), "{}", s.file_name);
        }
        let mut big = vec![0u8; 3 * BLOCK_BYTES + 6];
        let mut big4 = big.clone();
        fill(&mut big, Init::Uniform { std: 1.0 }, 7, 0, 1);
        fill(&mut big4, Init::Uniform { std: 1.0 }, 7, 0, 4);
        assert_eq!(big, big4);
    }

    #[test]
    fn uniform_values_have_the_asked_spread() {
        let mut buf = vec![0u8; 1 << 20];
        fill_uniform(&mut buf, WEIGHT_STD, 42);
        let v = bf16s(&buf);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((std / WEIGHT_STD - 1.0).abs() < 0.02, "std {std}");
    }

    #[test]
    fn experts_are_contiguous_and_sized() {
        let plan = Plan::new(tiny()).unwrap();
        let spans = plan.expert_spans().unwrap();
        assert_eq!(spans.len(), 3 * 4);
        assert!(spans.iter().all(|s| s.end - s.start == plan.shape.expert_bytes()));
        assert_eq!(plan.expert_bytes_total(), 12 * plan.shape.expert_bytes());
        // Layers 0 and 1 in the first shard, layer 2 in the second.
        assert!(spans.iter().all(|s| s.shard == s.layer / 2));
        // Attention (q, k, v, o), q/k norms, two layer norms and the router per layer, plus the
        // final norm, lm_head and one embedding row.
        let per_layer = 16 * 16 + 8 * 16 * 2 + 16 * 16 + 16 + 8 + 2 * 16 + 4 * 16;
        assert_eq!(plan.dense_bytes_touched_per_token(), 2 * (3 * per_layer + 16 + 32 * 16 + 16) as u64);
    }

    #[test]
    fn bad_shapes_are_named() {
        let mut s = tiny();
        s.num_experts_per_tok = 5;
        assert!(Plan::new(s).unwrap_err().contains("top-k 5 exceeds the 4 experts"));
        let mut s = tiny();
        s.num_key_value_heads = 3;
        assert!(s.validate().unwrap_err().contains("key/value heads"));
        let mut s = tiny();
        s.vocab_size = 0;
        assert!(s.validate().unwrap_err().contains("`vocab_size` must be positive"));
    }
}
