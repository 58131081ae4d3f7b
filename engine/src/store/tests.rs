//! Store tests on real safetensors checkpoints written to a temp dir (headers by hand, so that
//! the tests control where each tensor lands: adjacent, far apart, across shards).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicUsize;

use serde_json::json;
use stevedore_cache::LruPolicy;
use stevedore_kernels::DType;
use stevedore_models::names::{expert_tensor_names, expert_tensor_shapes};
use stevedore_models::Arch;

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

struct Fixture {
    dir: tempfile::TempDir,
    cfg: ModelConfig,
    index: WeightIndex,
    files: Vec<Vec<u8>>,
}

const SHARDS: [&str; 2] = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];

impl Fixture {
    fn new() -> Self {
        Self::sized(64, 96, 8, 3)
    }

    fn sized(hidden: usize, inter: usize, experts: usize, layers: usize) -> Self {
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

    fn min_budget(&self) -> u64 {
        ExpertStore::min_budget_for(&self.index, &self.cfg).unwrap()
    }

    fn store(&self, budget: u64, opts: StoreOptions) -> ExpertStore {
        ExpertStore::new(&self.index, &self.cfg, budget, Box::new(LruPolicy::new()), opts).unwrap()
    }

    /// The file's bytes of `name`, read without the store.
    fn expected(&self, name: &str) -> &[u8] {
        let info = self.index.info(name).unwrap();
        &self.files[info.shard][info.offset as usize..(info.offset + info.len) as usize]
    }

    /// Asserts that `w` is exactly the checkpoint's expert `expert` of `layer`.
    fn check(&self, layer: usize, expert: u32, w: &ExpertWeights<'_>) {
        let names = expert_tensor_names(Arch::Olmoe, layer, expert as usize);
        let shapes = expert_tensor_shapes(&self.cfg);
        let dtype = if layer % 3 == 1 { DType::F32 } else { DType::BF16 };
        for ((weight, name), [rows, cols]) in [w.gate, w.up, w.down].iter().zip(&names).zip(shapes) {
            assert_eq!((weight.dtype, weight.rows, weight.cols), (dtype, rows, cols), "{name}");
            assert!(weight.data == self.expected(name), "{name}: bytes differ from the file");
        }
    }
}

/// Runs one `for_each` over `experts` of `layer`, checking every expert's bytes and the call
/// order. Returns the experts in the order `f` saw them.
fn route(fx: &Fixture, store: &ExpertStore, layer: usize, experts: &[u32]) -> Result<Vec<u32>, ExpertsError> {
    let weights = vec![1.0; experts.len()];
    let tokens = vec![0; experts.len()];
    let routing = LayerRouting {
        layer,
        first_pos: 0,
        tokens: &tokens,
        topk_ids: experts,
        topk_weights: &weights,
        top_k: 1,
        experts,
    };
    let mut seen = Vec::new();
    store.for_each(&routing, &mut |e, w| {
        fx.check(layer, e, &w);
        seen.push(e);
        Ok(())
    })?;
    Ok(seen)
}

/// A deterministic mix of decode steps (top_k experts) and prefill batches (most experts).
fn workload(fx: &Fixture, steps: usize) -> Vec<(usize, Vec<u32>)> {
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

/// Waits for reads in flight to finish, then says whether the store holds no pin at all (every
/// byte of the budget could be reclaimed).
fn nothing_pinned(store: &ExpertStore) -> bool {
    let mut st = store.shared.lock();
    while st.counters.reads < st.counters.misses + st.counters.prefetch_reads {
        st = store.shared.wait(st);
    }
    st.cache.can_make_room(st.cache.budget(), &|_| false)
}

fn all_experts(fx: &Fixture) -> Vec<u32> {
    (0..fx.cfg.num_experts as u32).collect()
}

#[test]
fn every_expert_is_exactly_the_files_bytes() {
    let fx = Fixture::new();
    for force_buffered in [false, true] {
        let opts = StoreOptions { force_buffered, ..Default::default() };
        let store = fx.store(u64::MAX, opts);
        for layer in 0..3 {
            assert_eq!(route(&fx, &store, layer, &all_experts(&fx)).unwrap(), all_experts(&fx));
        }
        assert_eq!(route(&fx, &store, 1, &[1, 6]).unwrap(), vec![1, 6]);
        if force_buffered {
            assert!(!store.stats().direct_io);
        }
    }
}

#[test]
fn reads_are_planned_per_expert_and_coalesced_when_adjacent() {
    let fx = Fixture::new();
    let layouts = Layouts::build(&fx.index, &fx.cfg).unwrap();
    for (layer, reads) in [(0, 1), (1, 3), (2, 1)] {
        for e in 0..8 {
            let l = layouts.get(ExpertKey::new(layer, e)).unwrap();
            assert_eq!(l.segments.len(), reads, "layer {layer} expert {e}");
            assert_eq!(l.alloc % crate::io::ALIGN, 0);
            let tensor_bytes: usize = l.tensors.iter().map(|t| t.len).sum();
            assert!(l.alloc >= tensor_bytes && l.alloc < tensor_bytes + (reads + 1) * 2 * crate::io::ALIGN);
        }
    }
    assert_eq!(ExpertStore::min_budget_for(&fx.index, &fx.cfg).unwrap(), 2 * layouts.max_alloc as u64);
}

/// Can this directory's file system do an aligned O_DIRECT read? Asked of the kernel directly,
/// to check what the store reports.
fn direct_io_works(dir: &Path) -> bool {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = dir.join("probe");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    let Ok(file) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path) else {
        return false;
    };
    let mut buf = AlignedBuf::zeroed(4096).unwrap();
    file.read_at(buf.as_mut_slice(), 4096).is_ok_and(|n| n == 4096)
}

#[test]
fn direct_io_is_used_where_the_file_system_allows_it() {
    let fx = Fixture::new();
    let expected = direct_io_works(fx.dir.path());
    eprintln!("O_DIRECT works in {}: {expected}", fx.dir.path().display());
    let store = fx.store(fx.min_budget(), StoreOptions::default());
    route(&fx, &store, 0, &[0, 3, 7]).unwrap();
    assert_eq!(store.stats().direct_io, expected);
    let buffered = StoreOptions { force_buffered: true, ..Default::default() };
    let store = fx.store(fx.min_budget(), buffered);
    route(&fx, &store, 0, &[0, 3, 7]).unwrap();
    assert!(!store.stats().direct_io);
}

#[test]
fn counts_hits_and_misses() {
    let fx = Fixture::new();
    let store = fx.store(u64::MAX, StoreOptions::default());
    let all = all_experts(&fx);
    for layer in 0..3 {
        route(&fx, &store, layer, &all).unwrap();
    }
    let s = store.stats();
    assert_eq!((s.hits, s.misses, s.reads, s.evictions), (0, 24, 24, 0));
    let layouts = Layouts::build(&fx.index, &fx.cfg).unwrap();
    let allocs: u64 = (0..3)
        .flat_map(|l| (0..8).map(move |e| (l, e)))
        .map(|(l, e)| layouts.get(ExpertKey::new(l, e)).unwrap().alloc as u64)
        .sum();
    assert_eq!(s.resident_bytes, allocs);
    assert!(s.bytes_read > 0 && s.bytes_read <= allocs, "{s:?}");
    route(&fx, &store, 1, &[2, 5]).unwrap();
    route(&fx, &store, 2, &all).unwrap();
    let s = store.stats();
    assert_eq!((s.hits, s.misses, s.reads), (10, 24, 24));
    eprintln!(
        "{} reads, {} bytes, {:.1} us per expert read (direct_io {})",
        s.reads,
        s.bytes_read,
        s.read_seconds / s.reads as f64 * 1e6,
        s.direct_io
    );
    serde_json::to_string(&s).unwrap();
}

#[test]
fn never_exceeds_the_budget_and_outputs_do_not_depend_on_it() {
    let fx = Fixture::new();
    let min = fx.min_budget();
    let max_alloc = min / 2;
    let work = workload(&fx, 12);
    let mut reference = None;
    for (budget, lookahead) in [
        (u64::MAX, usize::MAX),
        (12 * max_alloc, usize::MAX),
        (5 * max_alloc + 123, usize::MAX),
        (min + 4096, 1),
        (min, usize::MAX),
        (min, 0),
    ] {
        let store = fx.store(budget, StoreOptions { lookahead, ..Default::default() });
        let seen: Vec<Vec<u32>> = work.iter().map(|(l, e)| route(&fx, &store, *l, e).unwrap()).collect();
        let s = store.stats();
        assert!(s.peak_bytes <= budget, "budget {budget}: peak {}", s.peak_bytes);
        assert_eq!(s.hits + s.misses, work.iter().map(|(_, e)| e.len() as u64).sum::<u64>());
        eprintln!("budget {budget}: peak {} hits {} misses {}", s.peak_bytes, s.hits, s.misses);
        match &reference {
            None => reference = Some(seen),
            Some(r) => assert_eq!(&seen, r, "budget {budget}"),
        }
    }
}

#[test]
fn budget_below_the_minimum_is_an_error_naming_it() {
    let fx = Fixture::new();
    let min = fx.min_budget();
    let err =
        ExpertStore::new(&fx.index, &fx.cfg, min - 1, Box::new(LruPolicy::new()), StoreOptions::default())
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains(&format!("minimum of {min} bytes")) && err.contains("2 active experts"), "{err}");
}

#[test]
fn truncated_file_is_a_clear_error_and_the_store_goes_on() {
    let fx = Fixture::new();
    let store = fx.store(fx.min_budget(), StoreOptions::default());
    // Cut the second shard inside the last expert of layer 2.
    let last = fx.index.info("model.layers.2.mlp.experts.7.up_proj.weight").unwrap();
    let path = fx.dir.path().join(SHARDS[1]);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(last.offset + 10).unwrap();
    let err = route(&fx, &store, 2, &[1, 7]).unwrap_err().to_string();
    assert!(
        err.starts_with("reading layer 2 expert 7: ") && err.contains(SHARDS[1]) && err.contains("truncated"),
        "{err}"
    );
    assert!(!store.contains(&ExpertKey::new(2, 7)));
    // The failed read released its room; intact experts still load, the broken one fails again.
    route(&fx, &store, 2, &[0, 1, 2, 3]).unwrap();
    assert!(route(&fx, &store, 2, &[7]).is_err());
    assert!(nothing_pinned(&store));
    assert!(store.stats().peak_bytes <= fx.min_budget());
}

#[test]
fn prefetch_reads_ahead_and_its_hits_are_counted() {
    let fx = Fixture::new();
    let store = fx.store(u64::MAX, StoreOptions::default());
    let keys = [ExpertKey::new(1, 2), ExpertKey::new(1, 5), ExpertKey::new(2, 0)];
    assert_eq!(store.prefetch(&keys).unwrap(), 3);
    assert_eq!(store.prefetch(&keys).unwrap(), 0, "already resident or in flight");
    route(&fx, &store, 1, &[2, 5]).unwrap();
    route(&fx, &store, 1, &[2]).unwrap();
    let s = store.stats();
    assert_eq!((s.hits, s.misses, s.prefetch_reads, s.prefetch_hits), (3, 0, 3, 2));
    let err = store.prefetch(&[ExpertKey::new(9, 0)]).unwrap_err().to_string();
    assert!(err.contains("layer 9"), "{err}");
}

/// Prefetching from inside the callback, at the minimum budget, must neither evict nor
/// corrupt the experts in use (the callback re-checks the bytes after the prefetch).
#[test]
fn prefetch_never_evicts_pinned_experts() {
    let fx = Fixture::new();
    let store = fx.store(fx.min_budget(), StoreOptions::default());
    let ahead: Vec<ExpertKey> = (0..8).map(|e| ExpertKey::new(2, e)).collect();
    let routing = LayerRouting {
        layer: 0,
        first_pos: 0,
        tokens: &[0],
        topk_ids: &[3, 4],
        topk_weights: &[0.5, 0.5],
        top_k: 2,
        experts: &[3, 4],
    };
    store
        .for_each(&routing, &mut |e, w| {
            store.prefetch(&ahead).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
            fx.check(0, e, &w);
            Ok(())
        })
        .unwrap();
    route(&fx, &store, 2, &[0, 1, 2]).unwrap();
    assert!(store.stats().peak_bytes <= fx.min_budget());
    assert!(nothing_pinned(&store));
}

#[test]
fn bad_routing_is_an_error_naming_layer_and_expert() {
    let fx = Fixture::new();
    let store = fx.store(fx.min_budget(), StoreOptions::default());
    let err = route(&fx, &store, 3, &[0]).unwrap_err().to_string();
    assert!(err.contains("layer 3"), "{err}");
    let err = route(&fx, &store, 1, &[0, 8]).unwrap_err().to_string();
    assert!(err.contains("expert 8") && err.contains("8 experts"), "{err}");
}

#[test]
fn callback_errors_release_pins() {
    let fx = Fixture::new();
    let store = fx.store(fx.min_budget(), StoreOptions::default());
    let routing = LayerRouting {
        layer: 0,
        first_pos: 0,
        tokens: &[0],
        topk_ids: &[1, 2],
        topk_weights: &[1.0, 1.0],
        top_k: 2,
        experts: &[1, 2],
    };
    let err = store.for_each(&routing, &mut |_, _| Err("model failed".into())).unwrap_err();
    assert_eq!(err.to_string(), "model failed");
    assert!(nothing_pinned(&store));
    // With the minimum budget, leaked pins would make every later call wait forever.
    for layer in 0..3 {
        route(&fx, &store, layer, &all_experts(&fx)).unwrap();
    }
}

#[test]
fn checkpoint_with_the_wrong_shape_is_rejected() {
    let fx = Fixture::new();
    let mut cfg = fx.cfg.clone();
    cfg.moe_intermediate_size += 1;
    let err =
        ExpertStore::new(&fx.index, &cfg, u64::MAX, Box::new(LruPolicy::new()), StoreOptions::default())
            .err()
            .unwrap()
            .to_string();
    assert!(
        err.contains("model.layers.0.mlp.experts.0.gate_proj.weight") && err.contains(SHARDS[0]),
        "{err}"
    );
}

#[test]
fn concurrent_callers_each_get_their_experts() {
    let fx = Fixture::new();
    let store = fx.store(fx.min_budget() + 4096, StoreOptions::default());
    let calls = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..3 {
            let (fx, store, calls) = (&fx, &store, &calls);
            s.spawn(move || {
                for (layer, experts) in workload(fx, 6 + t) {
                    route(fx, store, layer, &experts).unwrap();
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(calls.load(Ordering::Relaxed), 3 * (6 + 7 + 8));
    assert!(store.stats().peak_bytes <= fx.min_budget() + 4096);
    assert!(nothing_pinned(&store));
}

/// Disk throughput with experts of realistic size (9 MiB each): direct vs buffered, and what
/// overlapping reads with (simulated) compute saves. Writes ~300 MB, so it runs only with
/// `STEVEDORE_SLOW_TESTS=1`: `STEVEDORE_SLOW_TESTS=1 cargo test -p stevedore-engine --release
/// store::tests::read_throughput -- --nocapture`.
#[test]
fn read_throughput() {
    if std::env::var_os("STEVEDORE_SLOW_TESTS").is_none() {
        eprintln!("skipped: set STEVEDORE_SLOW_TESTS=1 to run");
        return;
    }
    let fx = Fixture::sized(1024, 1536, 16, 2);
    let all = all_experts(&fx);
    let report = |name: &str, s: &StoreStats, wall: f64| {
        eprintln!(
            "{name}: {} reads, {:.2} ms/expert, {:.0} MB/s, stall {:.3} s, wall {:.3} s, direct_io {}",
            s.reads,
            s.read_seconds / s.reads as f64 * 1e3,
            s.bytes_read as f64 / s.read_seconds / 1e6,
            s.stall_seconds,
            wall,
            s.direct_io
        );
    };
    for force_buffered in [false, true] {
        let store = fx.store(fx.min_budget(), StoreOptions { force_buffered, ..Default::default() });
        let t0 = Instant::now();
        for layer in 0..2 {
            route(&fx, &store, layer, &all).unwrap();
        }
        report(
            if force_buffered { "buffered (page cache warm)" } else { "direct" },
            &store.stats(),
            t0.elapsed().as_secs_f64(),
        );
    }
    // 4 ms of "compute" per expert: with lookahead the next read runs meanwhile.
    for lookahead in [0, usize::MAX] {
        let store = fx.store(4 * fx.min_budget(), StoreOptions { lookahead, ..Default::default() });
        let routing = LayerRouting {
            layer: 0,
            first_pos: 0,
            tokens: &[0; 16],
            topk_ids: &all,
            topk_weights: &[1.0; 16],
            top_k: 1,
            experts: &all,
        };
        let t0 = Instant::now();
        store
            .for_each(&routing, &mut |_, _| {
                std::thread::sleep(std::time::Duration::from_millis(4));
                Ok(())
            })
            .unwrap();
        report(
            &format!("lookahead {lookahead} with 4 ms compute"),
            &store.stats(),
            t0.elapsed().as_secs_f64(),
        );
    }
}
