//! Store tests on real safetensors checkpoints written to a temp dir ([`super::testutil`]), with
//! real reads (O_DIRECT where the file system allows it) and real reader threads.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use stevedore_cache::{AnticipationParams, Candidate};
use stevedore_models::ExpertStream;

use super::testutil::*;
use super::*;
use crate::io::AlignedBuf;

fn opts(readers: usize) -> StoreOptions {
    StoreOptions { readers, ..StoreOptions::default() }
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

#[test]
fn every_expert_is_exactly_the_files_bytes() {
    let fx = Fixture::new();
    for force_buffered in [false, true] {
        let store = fx.store(u64::MAX, StoreOptions { force_buffered, ..StoreOptions::default() });
        for layer in 0..3 {
            assert_eq!(sorted(route(&fx, &store, layer, &all_experts(&fx)).unwrap()), all_experts(&fx));
        }
        // Hits are handed out first, then misses in order.
        assert_eq!(route(&fx, &store, 1, &[1, 6]).unwrap(), vec![1, 6]);
        if force_buffered {
            assert!(!store.stats().direct_io);
        }
    }
}

#[test]
fn reads_are_planned_per_expert_and_coalesced_when_adjacent() {
    let fx = Fixture::new();
    let layouts = fx.layouts();
    let mut max_alloc = 0;
    for (layer, reads) in [(0, 1), (1, 3), (2, 1)] {
        for e in 0..8 {
            let l = layouts.get(ExpertKey::new(layer, e)).unwrap();
            assert_eq!(l.segments.len(), reads, "layer {layer} expert {e}");
            assert_eq!(l.alloc % crate::io::ALIGN, 0);
            let tensor_bytes: usize = l.tensors.iter().map(|t| t.len).sum();
            assert!(l.alloc >= tensor_bytes && l.alloc < tensor_bytes + (reads + 1) * 2 * crate::io::ALIGN);
            max_alloc = max_alloc.max(l.alloc as u64);
        }
    }
    assert_eq!(fx.min_budget(), 2 * max_alloc);
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
    let store = fx.store(fx.min_budget(), StoreOptions { force_buffered: true, ..StoreOptions::default() });
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
    assert!(nothing_pinned(&store));
    let s = store.stats();
    assert_eq!((s.hits, s.misses, s.reads, s.evictions), (0, 24, 24, 0));
    let allocs: u64 = (0..3)
        .flat_map(|l| (0..8).map(move |e| (l, e)))
        .map(|(l, e)| store.expert_bytes(ExpertKey::new(l, e)).unwrap())
        .sum();
    assert_eq!((s.resident_bytes, s.buffer_peak_bytes), (allocs, allocs));
    assert!(s.bytes_read > 0 && s.bytes_read <= allocs, "{s:?}");
    route(&fx, &store, 1, &[2, 5]).unwrap();
    route(&fx, &store, 2, &all).unwrap();
    let s = store.stats();
    assert_eq!((s.hits, s.misses, s.reads), (10, 24, 24));
    serde_json::to_string(&s).unwrap();
}

/// At every budget down to the minimum, with one and two readers: every expert arrives with
/// exactly its bytes, nothing is accounted or allocated beyond the budget, and the same
/// routing asks for the same experts (only hits and misses trade).
#[test]
fn never_exceeds_the_budget_and_delivers_every_expert() {
    let fx = Fixture::new();
    let min = fx.min_budget();
    let max_alloc = min / 2;
    let work = workload(&fx, 12);
    let requests: u64 = work.iter().map(|(_, e)| e.len() as u64).sum();
    for readers in [1, 2] {
        for budget in [u64::MAX, 12 * max_alloc, 5 * max_alloc + 123, min + 4096, min] {
            let store = fx.store(budget, opts(readers));
            for (l, e) in &work {
                assert_eq!(sorted(route(&fx, &store, *l, e).unwrap()), *e, "budget {budget}");
            }
            assert!(nothing_pinned(&store));
            let s = store.stats();
            assert!(s.peak_bytes <= budget && s.buffer_peak_bytes <= budget, "budget {budget}: {s:?}");
            assert_eq!(s.hits + s.misses, requests);
            eprintln!(
                "readers {readers} budget {budget}: peak {} hits {} misses {}",
                s.peak_bytes, s.hits, s.misses
            );
        }
    }
}

#[test]
fn budget_below_the_minimum_is_an_error_naming_it() {
    let fx = Fixture::new();
    let min = fx.min_budget();
    let err = fx.try_store(min - 1, StoreOptions::default(), None).err().unwrap().to_string();
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
    let err = route(&fx, &store, 2, &[1, 7]).unwrap_err();
    assert!(
        err.starts_with("reading layer 2 expert 7: ") && err.contains(SHARDS[1]) && err.contains("truncated"),
        "{err}"
    );
    // The failed entry is read again by the next layer that needs it; intact experts load.
    route(&fx, &store, 2, &[0, 1, 2, 3]).unwrap();
    assert!(route(&fx, &store, 2, &[7]).is_err());
    assert!(nothing_pinned(&store));
    let s = store.stats();
    assert!(s.peak_bytes <= fx.min_budget() && s.buffer_peak_bytes <= fx.min_budget(), "{s:?}");
}

/// A failure is one expert's: the stream still delivers the others, each once.
#[test]
fn a_failed_expert_fails_alone() {
    let fx = Fixture::new();
    let store = fx.store(u64::MAX, StoreOptions::default());
    let last = fx.index.info("model.layers.2.mlp.experts.7.up_proj.weight").unwrap();
    let path = fx.dir.path().join(SHARDS[1]);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(last.offset + 10).unwrap();
    let data = PlanData::new(2, &[1, 3, 7]);
    let plan = data.plan();
    let mut s = store.stream(&plan, &[]).unwrap();
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    while let Some(item) = s.next() {
        match item {
            Ok((i, w)) => {
                fx.check(2, plan.experts[i].expert, &w);
                ok.push(plan.experts[i].expert);
            }
            Err(f) => failed.push(plan.experts[f.expert.unwrap()].expert),
        }
    }
    assert_eq!((sorted(ok), failed), (vec![1, 3], vec![7]));
}

fn anticipation() -> AnticipationParams {
    AnticipationParams {
        protect_min_score: 0.0,
        prefetch_min_score: 0.5,
        prefetch_depth: 4,
        prefetch_top: 8,
        max_protected_fraction: 1.0,
    }
}

fn cand(layer: usize, e: usize, distance: usize) -> Candidate {
    Candidate { key: ExpertKey::new(layer, e), distance, score: 0.9, bytes: 0 }
}

/// Predictions at a step's start are read ahead; a layer then finds them (hits, counted once as
/// prefetch hits) whether their reads have landed or not.
#[test]
fn predicted_experts_are_read_ahead_and_then_hit() {
    let fx = Fixture::new();
    let policy = StoreOptions { policy: PolicyKind::Predictive, ..StoreOptions::default() };
    let store = fx.try_store(u64::MAX, policy, Some((anticipation(), u64::MAX))).unwrap();
    store.begin_step(&[cand(1, 2, 1), cand(1, 5, 1), cand(2, 0, 2)]);
    route(&fx, &store, 1, &[2, 5]).unwrap();
    route(&fx, &store, 1, &[2]).unwrap();
    assert!(nothing_pinned(&store));
    let s = store.stats();
    assert_eq!((s.hits, s.misses, s.prefetch_reads, s.prefetch_hits, s.reads), (3, 0, 3, 2, 3));
    // Candidates naming no expert of the model are dropped, not an error.
    store.begin_step(&[cand(9, 0, 1), cand(1, 99, 1)]);
}

/// At the minimum budget, protected predictions yield to a layer's misses, and a prefetch never
/// takes a pinned expert's room: every layer gets its experts, within the budget.
#[test]
fn prefetch_never_takes_what_a_layer_holds() {
    let fx = Fixture::new();
    let policy = StoreOptions { policy: PolicyKind::Predictive, ..StoreOptions::default() };
    let store = fx.try_store(fx.min_budget(), policy, Some((anticipation(), u64::MAX))).unwrap();
    let ahead: Vec<Candidate> = (0..8).map(|e| cand(2, e, 1)).collect();
    for (layer, experts) in workload(&fx, 6) {
        let data = PlanData::new(layer, &experts);
        assert_eq!(sorted(stream_all(&fx, &store, &data.plan(), &ahead).unwrap()), experts);
    }
    assert!(nothing_pinned(&store));
    let s = store.stats();
    assert!(s.peak_bytes <= fx.min_budget() && s.buffer_peak_bytes <= fx.min_budget(), "{s:?}");
}

#[test]
fn bad_routing_is_an_error_naming_layer_and_expert() {
    let fx = Fixture::new();
    let store = fx.store(fx.min_budget(), StoreOptions::default());
    let err = route(&fx, &store, 3, &[0]).unwrap_err();
    assert!(err.contains("layer 3"), "{err}");
    let err = route(&fx, &store, 1, &[0, 8]).unwrap_err();
    assert!(err.contains("expert 8") && err.contains("8 experts"), "{err}");
}

/// A stream dropped half-way (the forward pass failed) releases its pins: with the minimum
/// budget, leaked pins would make every later layer wait forever.
#[test]
fn dropping_a_stream_releases_its_pins() {
    let fx = Fixture::new();
    let store = fx.store(fx.min_budget(), StoreOptions::default());
    let data = PlanData::new(0, &[1, 2, 3]);
    let plan = data.plan();
    let mut s = store.stream(&plan, &[]).unwrap();
    assert!(s.next().unwrap().is_ok());
    drop(s);
    assert!(nothing_pinned(&store));
    for layer in 0..3 {
        route(&fx, &store, layer, &all_experts(&fx)).unwrap();
    }
}

#[test]
fn concurrent_streams_each_get_their_experts() {
    let fx = Fixture::new();
    let store = fx.store(fx.min_budget() + 4096, opts(2));
    let calls = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..3 {
            let (fx, store, calls) = (&fx, &store, &calls);
            s.spawn(move || {
                for (layer, experts) in workload(fx, 6 + t) {
                    assert_eq!(sorted(route(fx, store, layer, &experts).unwrap()), experts);
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(calls.load(Ordering::Relaxed), 3 * (6 + 7 + 8));
    assert!(nothing_pinned(&store));
    assert!(store.stats().peak_bytes <= fx.min_budget() + 4096);
}

/// Waits until the warm start's reads have all landed.
fn warm_filled(store: &ExpertStore) -> StoreStats {
    for _ in 0..2000 {
        let s = store.stats();
        if s.warm_fill_seconds.is_some() {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("the warm start never finished: {:?}", store.stats());
}

/// A warm start at a budget that holds everything reads every expert once, in layer order,
/// and every layer step afterwards is all hits with nothing more read; the bytes are the
/// file's.
#[test]
fn a_warm_start_reads_every_expert_once_then_every_step_hits() {
    let fx = Fixture::new();
    let total = fx.layouts().footprint().total_bytes;
    let store = fx.store(total, opts(2));
    assert_eq!(store.warm(), 24);
    let s = warm_filled(&store);
    assert_eq!((s.warm_fills, s.warm_reads, s.warm_bytes, s.reads), (24, 24, total, 24));
    assert!(s.bytes_read > 0 && s.bytes_read <= total, "{s:?}");
    for layer in 0..3 {
        assert_eq!(sorted(route(&fx, &store, layer, &all_experts(&fx)).unwrap()), all_experts(&fx));
    }
    let s = store.stats();
    assert_eq!((s.hits, s.misses, s.reads), (24, 0, 24), "{s:?}");
    assert!(nothing_pinned(&store));
}

/// At a budget that holds part of the model the warm start takes a prefix in layer order and
/// evicts nothing; a layer that needs an expert still queued gets it (its read moves to the
/// front), and later misses evict as usual.
#[test]
fn a_partial_warm_start_fills_layer_order_and_yields_to_demand() {
    let fx = Fixture::new();
    // Layer 0's eight experts and two of layer 1's (larger, f32) ones.
    let keys = fx.layouts().all_keys(stevedore_cache::Precision::Full);
    let budget: u64 = keys[..10].iter().map(|(_, b)| b).sum();
    let store = fx.store(budget, opts(1));
    assert_eq!(store.warm(), 10);
    assert_eq!(sorted(route(&fx, &store, 1, &[0, 1]).unwrap()), vec![0, 1]);
    assert_eq!(sorted(route(&fx, &store, 2, &[3, 4]).unwrap()), vec![3, 4]);
    let s = store.stats();
    assert_eq!((s.hits, s.misses, s.warm_fills, s.warm_bytes), (2, 2, 10, budget), "{s:?}");
    assert!(s.peak_bytes <= budget && s.buffer_peak_bytes <= budget, "{s:?}");
}

/// `next_ready` hands out every resident expert of a layer at once (up to `max`), each exactly
/// once, and the next call releases them all.
#[test]
fn ready_experts_come_together_and_are_released_together() {
    let fx = Fixture::new();
    let store = fx.store(u64::MAX, opts(1));
    route(&fx, &store, 0, &all_experts(&fx)).unwrap();
    let data = PlanData::new(0, &[1, 3, 4, 6]);
    let plan = data.plan();
    let mut s = store.stream(&plan, &[]).unwrap();
    let first: Vec<u32> =
        s.next_ready(3).unwrap().unwrap().into_iter().map(|(i, _)| plan.experts[i].expert).collect();
    assert_eq!(first, vec![1, 3, 4]);
    let rest = s.next_ready(3).unwrap().unwrap();
    assert_eq!(rest.len(), 1);
    fx.check(0, plan.experts[rest[0].0].expert, &rest[0].1);
    assert!(s.next_ready(3).is_none());
    drop(s);
    assert!(nothing_pinned(&store));
}
