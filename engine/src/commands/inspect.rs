//! `stevedore inspect`: what a checkpoint is and what fits in a host-cache budget.

use std::fmt::Write as _;
use std::io::Write as _;
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
    let text = describe(args)?;
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("stdout: {e}").into()),
        _ => Ok(()),
    }
}

/// One format's copies: (bytes of the largest expert, of all), or why they cannot be used.
type CopiesFound = Result<(u64, u64), String>;

/// The low-bit copies written beside the checkpoint (`stevedore quantize`): per format, the
/// host-cache bytes of the largest expert and of all, or why the copies cannot be used.
fn low_bit_copies(model: &stevedore_models::Model) -> Vec<(stevedore_kernels::DType, CopiesFound)> {
    stevedore_models::LowBitExperts::available(&model.index.dir)
        .into_iter()
        .map(|format| {
            let found = stevedore_models::LowBitExperts::open(model, format, 0).map(|low| {
                let fp = Layouts::of(model).with_low(&low.tensors, &model.layers).footprint();
                (fp.low_max_expert_bytes.unwrap_or(0), fp.low_total_bytes.unwrap_or(0))
            });
            (format, found.map_err(|e| e.to_string()))
        })
        .collect()
}

/// What `run` prints.
fn describe(args: &InspectArgs) -> Result<String, CliError> {
    let mut out = String::new();
    let model = load_model(&args.model)?;
    let cfg = &model.config;
    let fp = Layouts::of(&model).footprint();
    let expert_tensor_bytes = model.index.bytes_where(stevedore_models::names::is_expert_tensor);
    let dense = model.dense_bytes();
    let moe_layers: Vec<usize> = cfg.moe_layers().collect();
    // The formats the routed experts' tensors are stored in (one, in every checkpoint seen).
    let mut formats: Vec<&str> =
        model.experts.iter().flat_map(|(_, _, t)| t.iter().map(|l| l.dtype.name())).collect();
    formats.sort_unstable();
    formats.dedup();
    let formats = formats.join(", ");
    let low = low_bit_copies(&model);
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
            "router": router_name(cfg),
            "expert_format": formats,
            "dense_bytes": dense,
            "derived_bytes": model.derived_bytes(),
            "expert_bytes": expert_tensor_bytes,
            "expert_cache_bytes": fp.total_bytes,
            "bytes_per_expert": fp.max_expert_bytes,
            "min_host_cache_bytes": fp.min_budget,
            "available_memory_bytes": crate::sys::available_memory_bytes(),
        });
        let mut copies = serde_json::Map::new();
        for (format, found) in &low {
            let v = match found {
                Ok((per, total)) => serde_json::json!({"bytes_per_expert": per, "total_bytes": total}),
                Err(e) => serde_json::json!({"error": e}),
            };
            copies.insert(format.name().to_ascii_lowercase(), v);
        }
        v["low_bit_copies"] = copies.into();
        if let Some((budget, experts)) = fit {
            v["host_cache"] = serde_json::json!({
                "budget_bytes": budget, "experts": experts, "fraction": experts as f64 / fp.experts.max(1) as f64,
                "valid": budget >= fp.min_budget,
            });
        }
        return Ok(format!("{v}\n"));
    }
    let _ = writeln!(out, "model:            {}", args.model.display());
    let _ = writeln!(out, "architecture:     {}", cfg.arch.hf_name());
    let _ = writeln!(
        out,
        "layers:           {} ({} MoE: {:?})",
        cfg.num_hidden_layers,
        moe_layers.len(),
        moe_layers
    );
    let _ = writeln!(out, "hidden size:      {}", cfg.hidden_size);
    let _ =
        writeln!(out, "experts:          {} per MoE layer, top-{}", cfg.num_experts, cfg.num_experts_per_tok);
    if cfg.shared_expert_intermediate_size > 0 {
        let gated = if cfg.shared_expert_gated { ", sigmoid-gated" } else { "" };
        let _ =
            writeln!(out, "shared expert:    intermediate {}{gated}", cfg.shared_expert_intermediate_size);
    }
    let _ = writeln!(out, "router:           {}", router_name(cfg));
    if cfg.layer_norm {
        let _ = writeln!(out, "norms:            LayerNorm with bias");
    }
    let _ = writeln!(
        out,
        "attention:        {}{}{}{}{}",
        match &cfg.mla {
            Some(m) => format!(
                "MLA {} heads (q rank {}, latent {} cached with {} rotary dims, key {}+{}, value {})",
                cfg.num_attention_heads,
                m.q_lora_rank.map_or("full".to_owned(), |r| r.to_string()),
                m.kv_lora_rank,
                m.qk_rope_head_dim,
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim
            ),
            None => format!(
                "GQA {} q / {} kv heads of {}",
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            ),
        },
        if cfg.rotary_dim < cfg.head_dim {
            format!(", RoPE on {} dims", cfg.rotary_dim)
        } else {
            String::new()
        },
        match cfg.rope_kind {
            stevedore_models::RopeKind::LongRope => {
                format!(", LongRoPE (short factors, up to {} positions)", cfg.max_position_embeddings)
            }
            stevedore_models::RopeKind::Yarn => ", YaRN RoPE".to_owned(),
            stevedore_models::RopeKind::Default => String::new(),
        },
        match cfg.qk_norm {
            stevedore_models::QkNormKind::PerHead => ", per-head q/k norm",
            stevedore_models::QkNormKind::Full => ", q/k norm over the projections",
            stevedore_models::QkNormKind::None => "",
        },
        if cfg.o_proj_bias {
            ", q/k/v/o bias"
        } else if cfg.attention_bias {
            ", q/k/v bias"
        } else {
            ""
        },
    );
    let _ = writeln!(out, "dense weights:    {} (resident)", human(dense));
    if model.derived_bytes() > 0 {
        let _ = writeln!(
            out,
            "derived at load:  {} (resident: MLA's key expansion absorbed into the queries, f32)",
            human(model.derived_bytes())
        );
    }
    let _ = writeln!(
        out,
        "expert weights:   {} ({} experts, {formats}, streamed)",
        human(expert_tensor_bytes),
        fp.experts
    );
    let _ = writeln!(
        out,
        "bytes per expert: {} in the host cache (4 KiB-aligned buffer)",
        human(fp.max_expert_bytes)
    );
    for (format, found) in &low {
        let name = format.name().to_ascii_lowercase();
        let _ = match found {
            Ok((per, total)) => {
                writeln!(out, "  {name} copies:    {} per expert, {} in all", human(*per), human(*total))
            }
            Err(e) => writeln!(out, "  {name} copies:    unusable: {e}"),
        };
    }
    let _ =
        writeln!(out, "all experts:      {} in the host cache (= --host-cache 100%)", human(fp.total_bytes));
    let _ = writeln!(
        out,
        "min host cache:   {} (one layer's {} active experts)",
        human(fp.min_budget),
        cfg.num_experts_per_tok
    );
    if let Some(a) = crate::sys::available_memory_bytes() {
        let _ = writeln!(
            out,
            "memory available: {} (the machine's, or less under a cgroup memory limit)",
            human(a)
        );
    }
    if let Some((budget, experts)) = fit {
        let pct = 100.0 * experts as f64 / fp.experts.max(1) as f64;
        let verdict =
            if budget < fp.min_budget { "below the minimum: generate would refuse it" } else { "ok" };
        let _ = writeln!(
            out,
            "host cache {}: {} holds {experts} of {} experts ({pct:.1}%): {verdict}",
            args.host_cache.unwrap(),
            human(budget),
            fp.experts
        );
    }
    Ok(out)
}

/// The router's rule in words: what `inspect` names.
fn router_name(cfg: &stevedore_models::ModelConfig) -> String {
    let norm = if cfg.norm_topk_prob { ", renormalised" } else { "" };
    match cfg.router {
        stevedore_models::RouterKind::Softmax => format!("softmax top-{}{norm}", cfg.num_experts_per_tok),
        stevedore_models::RouterKind::SoftmaxGroupLimited { n_group, topk_group, routed_scaling_factor } => format!(
            "softmax top-{} within the best {topk_group} of {n_group} groups{norm}, scaled by {routed_scaling_factor}",
            cfg.num_experts_per_tok
        ),
        stevedore_models::RouterKind::SparseMixer { jitter_eps } => {
            format!("sparsemixer top-2 (jitter eps {jitter_eps})")
        }
        stevedore_models::RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } => format!(
            "sigmoid + correction bias, top-{} within the best {topk_group} of {n_group} groups{norm}, scaled by \
             {routed_scaling_factor}",
            cfg.num_experts_per_tok
        ),
    }
}
