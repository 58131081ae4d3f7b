//! Store tests on real safetensors checkpoints written to a temp dir ([`super::testutil`]).

use std::path::Path;
use std::sync::atomic::AtomicUsize;

use stevedore_cache::LruPolicy;

use super::testutil::*;
use super::*;

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
