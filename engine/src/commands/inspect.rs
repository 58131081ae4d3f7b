//! `stevedore inspect`: what a checkpoint is and what fits in a host-cache budget.

use std::path::PathBuf;

use clap::Args;

use super::{load_model, parse_size, CliError};
use crate::size::{human, Size};
use crate::store::Layouts;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Show what fits in this host-cache budget (`512MiB`, `2GiB`, `25%`).
    #[arg(long, value_parser = parse_size)]
    pub host_cache: Option<Size>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> Result<(), CliError> {
    let model = load_model(&args.model)?;
    let cfg = &model.config;
    let fp = Layouts::of(&model).footprint();
    let expert_tensor_bytes = model.index.bytes_where(stevedore_models::names::is_expert_tensor);
    let dense = model.dense_bytes();
    let moe_layers: Vec<usize> = cfg.moe_layers().collect();
    let fit = args.host_cache.map(|s| {
        let budget = s.bytes(fp.total_bytes);
        let experts = budget.checked_div(fp.max_expert_bytes).unwrap_or(0).min(fp.experts);
        (budget, experts)
    });
    if args.json {
        let mut v = serde_json::json!({
            "architecture": cfg.arch.hf_name(),
            "layers": cfg.num_hidden_layers,
            "moe_layers": moe_layers,
            "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok,
            "dense_bytes": dense,
            "expert_bytes": expert_tensor_bytes,
            "expert_cache_bytes": fp.total_bytes,
            "bytes_per_expert": fp.max_expert_bytes,
            "min_host_cache_bytes": fp.min_budget,
            "available_memory_bytes": crate::sys::available_memory_bytes(),
        });
        if let Some((budget, experts)) = fit {
            v["host_cache"] = serde_json::json!({
                "budget_bytes": budget, "experts": experts, "fraction": experts as f64 / fp.experts.max(1) as f64,
                "valid": budget >= fp.min_budget,
            });
        }
        println!("{v}");
        return Ok(());
    }
    println!("model:            {}", args.model.display());
    println!("architecture:     {}", cfg.arch.hf_name());
    println!("layers:           {} ({} MoE: {:?})", cfg.num_hidden_layers, moe_layers.len(), moe_layers);
    println!("hidden size:      {}", cfg.hidden_size);
    println!("experts:          {} per MoE layer, top-{}", cfg.num_experts, cfg.num_experts_per_tok);
    if cfg.shared_expert_intermediate_size > 0 {
        println!("shared expert:    intermediate {}", cfg.shared_expert_intermediate_size);
    }
    println!("dense weights:    {} (resident)", human(dense));
    println!("expert weights:   {} ({} experts, streamed)", human(expert_tensor_bytes), fp.experts);
    println!("bytes per expert: {} in the host cache (4 KiB-aligned buffer)", human(fp.max_expert_bytes));
    println!("all experts:      {} in the host cache (= --host-cache 100%)", human(fp.total_bytes));
    println!(
        "min host cache:   {} (one layer's {} active experts)",
        human(fp.min_budget),
        cfg.num_experts_per_tok
    );
    if let Some(a) = crate::sys::available_memory_bytes() {
        println!("memory available: {} (the machine's, or less under a cgroup memory limit)", human(a));
    }
    if let Some((budget, experts)) = fit {
        let pct = 100.0 * experts as f64 / fp.experts.max(1) as f64;
        let verdict =
            if budget < fp.min_budget { "below the minimum: generate would refuse it" } else { "ok" };
        println!(
            "host cache {}: {} holds {experts} of {} experts ({pct:.1}%): {verdict}",
            args.host_cache.unwrap(),
            human(budget),
            fp.experts
        );
    }
    Ok(())
}
