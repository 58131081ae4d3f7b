//! TEMPORARY tuning sweep (not for commit).
use std::path::Path;
use stevedore_cache::LookaheadParams;
use stevedore_engine::config::Split;
use stevedore_engine::sim::{replay, Contender, ExpertSizes, Steering};
use stevedore_engine::trace;
use stevedore_predictor::{OnlineKind, RoutingShape};

fn main() {
    let dir = Path::new("../shared/traces");
    let files = [
        "flame-moe-290m/flame_moe_290m_prefill_2048tok.csv",
        "flame-moe-290m/flame_moe_290m_first10tok_64seq.csv",
        "mixtral-8x7b/mixtral_humaneval_p0_prefill_decode.csv",
        "mixtral-8x7b/gsm8k_2_routing.jsonl",
        "mixtral-8x7b/humaneval_2_routing.jsonl",
        "qwen1.5-moe-a2.7b/qwen15moe_gsm8k25_5layers.csv",
    ];
    let cap: f64 = std::env::var("CAP").ok().and_then(|v| v.parse().ok()).unwrap_or(0.25);
    let kind = OnlineKind::from_name(&std::env::var("KIND").unwrap_or("transition".into())).unwrap();
    let list = |name: &str, def: &str| -> Vec<f64> {
        std::env::var(name).unwrap_or(def.into()).split(',').map(|x| x.parse().unwrap()).collect()
    };
    let traces: Vec<_> = files.iter().map(|f| trace::load(&dir.join(f)).unwrap()).collect();
    let mut base = Vec::new();
    for t in &traces {
        let sizes = ExpertSizes::uniform(&t.meta, 1 << 20);
        let budget = (sizes.total() as f64 * cap) as u64;
        let lru = replay(t, &sizes, budget, Split::Shared, Contender::Lru, None).unwrap();
        let bel = replay(t, &sizes, budget, Split::Shared, Contender::Belady, None).unwrap();
        base.push((sizes, budget, lru, bel));
    }
    for depth in list("DEPTH", "2") {
        for pdepth in list("PDEPTH", "2") {
            for pmin in list("PMIN", "0.2") {
                for prot in list("PROT", "0.05") {
                    for maxp in list("MAXP", "0.5") {
                        for bud in list("BUD", "0.05") {
                            let mut line = format!("d{depth} pd{pdepth} pmin{pmin} prot{prot} maxp{maxp} bud{bud} |");
                            let mut ok = true;
                            for (i, t) in traces.iter().enumerate() {
                                let (sizes, budget, lru, bel) = &base[i];
                                let s = Steering {
                                    predictor: kind.build(RoutingShape::from(&t.meta)),
                                    params: LookaheadParams {
                                        protect_min_score: prot as f32,
                                        prefetch_min_score: pmin as f32,
                                        prefetch_depth: pdepth as usize,
                                        max_protected_fraction: maxp,
                                    },
                                    depth: depth as usize,
                                    prefetch_budget: (*budget as f64 * bud) as u64,
                                };
                                let p = replay(t, sizes, *budget, Split::Shared, Contender::Predictive, Some(s)).unwrap();
                                let gap = (p.hit_rate() - lru.hit_rate()) / (bel.hit_rate() - lru.hit_rate());
                                let ratio = p.bytes_moved() as f64 / lru.bytes_moved() as f64;
                                let good = p.hit_rate() >= lru.hit_rate() && ratio <= 1.5 && (i != 0 || gap >= 0.7);
                                ok &= good;
                                line += &format!(" {:.3}/{:.3} x{:.2} g{:.2}{}|", p.hit_rate(), lru.hit_rate(), ratio, gap, if good { "" } else { "!" });
                            }
                            println!("{}{line}", if ok { "OK " } else { "   " });
                        }
                    }
                }
            }
        }
    }
}
