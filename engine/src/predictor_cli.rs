//! `stevedore predictor train` and `stevedore predictor eval`: fit the routing-path model to a
//! trace and measure every predictor on the trace's held-out part. The predictor crate does
//! the work; this module reads and writes the files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use stevedore_predictor::{
    evaluate, replay, split_holdout, train_path_model, Hits, NextGatePredictor, OnlineKind, PathModel,
    PathPredictor, Report, RoutePredictor, RoutingShape, SequenceCursors, Split, Trace, TrainConfig,
};

use crate::commands::CliError;

#[derive(Subcommand, Debug)]
pub enum PredictorCommand {
    /// Train the routing-path model on a trace and write it to a file.
    Train(TrainArgs),
    /// Measure recall and precision of every predictor on a trace's held-out tokens.
    Eval(EvalArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Routing trace (stevedore's format or an imported one).
    #[arg(long)]
    pub trace: PathBuf,
    /// Where to write the model.
    #[arg(long)]
    pub out: PathBuf,
    /// Routed experts per MoE layer of the traced model, for a CSV whose header does not say
    /// (without it: read from the file, else inferred from the largest id, and printed).
    #[arg(long, value_name = "N")]
    pub experts: Option<usize>,
    /// Fraction of the trace held out from training and evaluated on (0 = train on all).
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    #[command(flatten)]
    pub train: TrainFlags,
}

/// The path model's training parameters (see `stevedore_predictor::TrainConfig`).
#[derive(Args, Debug, Clone)]
pub struct TrainFlags {
    /// Longest look-ahead, in MoE layers, the model is trained for.
    #[arg(long, default_value_t = TrainConfig::default().max_depth)]
    pub max_depth: usize,
    /// How many of the latest routed layers feed a prediction.
    #[arg(long, default_value_t = TrainConfig::default().context_layers)]
    pub context_layers: usize,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    pub learning_rate: f32,
    #[arg(long, default_value_t = TrainConfig::default().l2)]
    pub l2: f32,
    /// Token ids seen fewer times than this in training get no weights of their own.
    #[arg(long, default_value_t = TrainConfig::default().min_token_count)]
    pub min_token_count: usize,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
}

impl TrainFlags {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            max_depth: self.max_depth,
            context_layers: self.context_layers,
            epochs: self.epochs,
            learning_rate: self.learning_rate,
            l2: self.l2,
            min_token_count: self.min_token_count,
            seed: self.seed,
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Routing trace (stevedore's format or an imported one).
    #[arg(long)]
    pub trace: PathBuf,
    /// Routed experts per MoE layer of the traced model (see `predictor train --experts`).
    #[arg(long, value_name = "N")]
    pub experts: Option<usize>,
    /// A trained path model. Without one, a model is trained on the trace's training part.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Fraction of the trace held out: online predictors learn from the rest first, and an
    /// untrained path model is fitted to it.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    /// Score distances 1..=depth (in MoE layers).
    #[arg(long, default_value_t = 3)]
    pub depth: usize,
    /// Experts taken from each prediction, comma-separated. Default: top_k and 2*top_k.
    #[arg(long, value_delimiter = ',')]
    pub k: Option<Vec<usize>>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub train: TrainFlags,
}

/// Reads a trace (with `--experts N` when given), saying on stderr where its shape came from.
fn load_trace(path: &std::path::Path, experts: Option<usize>) -> Result<crate::trace::Trace, CliError> {
    let declared = crate::trace::declared(None, experts)?;
    let imported = crate::trace::load_with(path, &declared)?;
    eprintln!("trace {}", imported.describe(path));
    Ok(imported.trace)
}

pub fn run(command: &PredictorCommand) -> Result<(), CliError> {
    match command {
        PredictorCommand::Train(a) => train(a),
        PredictorCommand::Eval(a) => eval(a),
    }
}

fn train(args: &TrainArgs) -> Result<(), CliError> {
    check_holdout(args.holdout)?;
    let trace = load_trace(&args.trace, args.experts)?;
    let shape = RoutingShape::from(&trace.meta);
    let split = if args.holdout > 0.0 {
        split_holdout(&trace.tokens, args.holdout)
    } else {
        Split { train: trace.tokens.clone(), test: Vec::new() }
    };
    let t = Instant::now();
    let model = train_path_model(shape, &split.train, &args.train.config())
        .map_err(|e| format!("{}: {e}", args.trace.display()))?;
    let seconds = t.elapsed().as_secs_f64();
    let bytes = model.to_bytes();
    std::fs::write(&args.out, &bytes).map_err(|e| format!("{}: {e}", args.out.display()))?;
    println!(
        "trained on {} tokens in {seconds:.2}s; wrote {} ({} bytes, {} token rows)",
        split.train.len(),
        args.out.display(),
        bytes.len(),
        model.num_token_rows()
    );
    if !split.test.is_empty() {
        let (mut p, mut cursors) = (PathPredictor::new(Arc::new(model)), SequenceCursors::new(shape));
        replay(&mut p, &mut cursors, &split.train);
        let r = evaluate(&mut p, &mut cursors, &split.test, 1, shape.top_k);
        let d = &r.distances[0];
        println!(
            "held out {} tokens: next-layer recall@{} {:.3} within the token, {:.3} overall",
            split.test.len(),
            shape.top_k,
            d.within.recall(),
            d.all().recall()
        );
    }
    Ok(())
}

/// Reads a path model written by `stevedore predictor train`.
pub fn read_path_model(path: &Path) -> Result<PathModel, CliError> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(PathModel::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))?)
}

fn check_holdout(holdout: f64) -> Result<(), CliError> {
    if !(0.0..1.0).contains(&holdout) {
        return Err(format!("--holdout must be in [0, 1), got {holdout}").into());
    }
    Ok(())
}

/// Every predictor's reports on the held-out tokens, for each k.
pub struct Evaluation {
    pub train_tokens: usize,
    pub test_tokens: usize,
    /// Whether the path model came from a file or was trained here.
    pub path_model: String,
    pub reports: Vec<Report>,
}

/// Evaluates the online predictors (after replaying the training part to them), the path
/// model and, when the trace recorded next-gate estimates, the gate predictor on `trace`'s
/// held-out part.
pub fn evaluate_all(
    trace: &Trace,
    model: Option<(PathModel, String)>,
    holdout: f64,
    depth: usize,
    ks: &[usize],
    train: &TrainConfig,
) -> Result<Evaluation, CliError> {
    let shape = RoutingShape::from(&trace.meta);
    let split = split_holdout(&trace.tokens, holdout);
    let (model, path_model) = match model {
        Some((m, source)) => {
            if m.shape() != shape {
                return Err(format!(
                    "{source}: the model was trained for {:?} but the trace has {shape:?}",
                    m.shape()
                )
                .into());
            }
            (m, source)
        }
        None => (train_path_model(shape, &split.train, train)?, "trained on the training part".into()),
    };
    let model = Arc::new(model);
    let mut reports = Vec::new();
    for &k in ks {
        let mut predictors: Vec<Box<dyn RoutePredictor>> =
            OnlineKind::ALL.iter().map(|kind| kind.build(shape)).collect();
        predictors.push(Box::new(PathPredictor::new(model.clone())));
        // The live next-gate estimates, replayed as recorded (`generate --trace` with the gate
        // predictor); their margin is whatever the live run kept.
        if trace.tokens.iter().any(|t| !t.ahead.is_empty()) {
            predictors.push(Box::new(NextGatePredictor::new(shape, shape.num_experts)));
        }
        for p in &mut predictors {
            // One cursor per traced sequence, carried from the training part into the test part.
            let mut cursors = SequenceCursors::new(shape);
            replay(p.as_mut(), &mut cursors, &split.train);
            reports.push(evaluate(p.as_mut(), &mut cursors, &split.test, depth, k));
        }
    }
    Ok(Evaluation { train_tokens: split.train.len(), test_tokens: split.test.len(), path_model, reports })
}

fn eval(args: &EvalArgs) -> Result<(), CliError> {
    check_holdout(args.holdout)?;
    if args.holdout == 0.0 {
        return Err("--holdout must be above 0: evaluation needs held-out tokens".into());
    }
    let trace = load_trace(&args.trace, args.experts)?;
    let shape = RoutingShape::from(&trace.meta);
    let ks = args.k.clone().unwrap_or_else(|| vec![shape.top_k, 2 * shape.top_k]);
    if ks.contains(&0) || args.depth == 0 {
        return Err("--k values and --depth must be at least 1".into());
    }
    let model = match &args.model {
        Some(path) => Some((read_path_model(path)?, path.display().to_string())),
        None => None,
    };
    let ev = evaluate_all(&trace, model, args.holdout, args.depth, &ks, &args.train.config())?;
    if args.json {
        println!("{}", to_json(&args.trace, &trace, &ev));
    } else {
        print!("{}", to_table(&args.trace, &trace, &ev));
    }
    Ok(())
}

fn hits_json(h: Hits) -> Value {
    json!({"recall": h.recall(), "precision": h.precision(), "events": h.events})
}

fn to_json(path: &Path, trace: &Trace, ev: &Evaluation) -> Value {
    let reports: Vec<Value> = (ev.reports.iter())
        .map(|r| {
            let distances: Vec<Value> = (r.distances.iter())
                .map(|d| {
                    json!({
                        "distance": d.distance,
                        "within": hits_json(d.within),
                        "token_start": hits_json(d.token_start),
                        "next_token": hits_json(d.next_token),
                        "all": hits_json(d.all()),
                    })
                })
                .collect();
            json!({"predictor": r.predictor, "k": r.k, "distances": distances})
        })
        .collect();
    json!({
        "trace": path.display().to_string(),
        "model": trace.meta.model,
        "train_tokens": ev.train_tokens,
        "test_tokens": ev.test_tokens,
        "path_model": ev.path_model,
        "results": reports,
    })
}

/// One row per (predictor, k, distance): recall/precision within the token, at token start,
/// into the next token, and overall.
fn to_table(path: &Path, trace: &Trace, ev: &Evaluation) -> String {
    let m = &trace.meta;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}, {} MoE layers, {} experts, top-{}): trained on {} tokens, evaluated on {}; path model {}",
        path.display(),
        m.model,
        m.layer_ids.len(),
        m.num_experts,
        m.top_k,
        ev.train_tokens,
        ev.test_tokens,
        ev.path_model
    );
    let _ = writeln!(s, "recall/precision of the top-k predicted experts at distance d (MoE layers ahead)");
    let _ = writeln!(
        s,
        "{:<11} {:>3} {:>2}  {:>13}  {:>13}  {:>13}  {:>13}",
        "predictor", "k", "d", "within", "token start", "next token", "all"
    );
    for r in &ev.reports {
        for d in &r.distances {
            // "-" where the predictor made no prediction of that kind (the gate at a token start).
            let cell = |h: Hits| match h.events {
                0 => "-".to_owned(),
                _ => format!("{:.3}/{:.3}", h.recall(), h.precision()),
            };
            let _ = writeln!(
                s,
                "{:<11} {:>3} {:>2}  {:>13}  {:>13}  {:>13}  {:>13}",
                r.predictor,
                r.k,
                d.distance,
                cell(d.within),
                cell(d.token_start),
                cell(d.next_token),
                cell(d.all())
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use stevedore_predictor::{LayerChoice, Phase, TokenRouting, TraceMeta};

    /// A shared real trace (`../shared/traces` from the repo root), or `None` after saying
    /// `skipped: ...`.
    fn shared_trace(rel: &str) -> Option<PathBuf> {
        crate::trace::tests::shared_traces().map(|dir| dir.join(rel))
    }

    fn within(ev: &Evaluation, predictor: &str, k: usize, distance: usize) -> f64 {
        let r = ev.reports.iter().find(|r| r.predictor == predictor && r.k == k).unwrap();
        r.distances[distance - 1].within.recall()
    }

    /// The bar from issue 3: on held-out FLAME-MoE-290M tokens, the learned path model's
    /// next-layer recall@k beats the transition table's (which also keeps learning online
    /// while it is evaluated).
    #[test]
    fn path_model_beats_transition_table_on_flame() {
        let Some(path) = shared_trace("flame-moe-290m/flame_moe_290m_prefill_2048tok.csv") else { return };
        let trace = crate::trace::load(&path).unwrap();
        let top_k = trace.meta.top_k;
        let ev = evaluate_all(&trace, None, 0.2, 3, &[top_k, 2 * top_k], &TrainConfig::default()).unwrap();
        print!("{}", to_table(&path, &trace, &ev));
        for k in [top_k, 2 * top_k] {
            let (path_r, table_r) = (within(&ev, "path", k, 1), within(&ev, "transition", k, 1));
            assert!(path_r > table_r + 0.03, "k={k}: path {path_r:.3} vs transition {table_r:.3}");
        }
        // Both learned predictors are far above the per-layer popularity baseline.
        assert!(within(&ev, "transition", top_k, 1) > 2.0 * within(&ev, "frequency", top_k, 1));
    }

    /// On each shared set's main trace, the path model predicts the next layer at least as well
    /// as the best baseline.
    #[test]
    fn path_model_leads_next_layer_recall_on_every_shared_set() {
        for rel in [
            "flame-moe-290m/flame_moe_290m_prefill_2048tok.csv",
            "mixtral-8x7b/mixtral_humaneval_p0_prefill_decode.csv",
            "qwen1.5-moe-a2.7b/qwen15moe_gsm8k25_5layers.csv",
        ] {
            let Some(path) = shared_trace(rel) else { continue };
            let trace = crate::trace::load(&path).unwrap();
            let k = trace.meta.top_k;
            let ev = evaluate_all(&trace, None, 0.2, 1, &[k], &TrainConfig::default()).unwrap();
            let best_baseline = ["frequency", "recency", "transition"]
                .map(|p| within(&ev, p, k, 1))
                .into_iter()
                .fold(0.0, f64::max);
            let path_r = within(&ev, "path", k, 1);
            assert!(path_r > best_baseline, "{rel}: path {path_r:.3} vs best baseline {best_baseline:.3}");
        }
    }

    #[test]
    fn train_writes_a_model_that_eval_reads_back() {
        let Some(trace) = shared_trace("mixtral-8x7b/mixtral_humaneval_p0_prefill_decode.csv") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("path.model");
        let flags = TrainFlags {
            max_depth: 2,
            context_layers: 2,
            epochs: 2,
            learning_rate: 0.03,
            l2: 1e-3,
            min_token_count: 2,
            seed: 1,
        };
        train(&TrainArgs {
            trace: trace.clone(),
            out: out.clone(),
            experts: None,
            holdout: 0.2,
            train: flags.clone(),
        })
        .unwrap();
        let model = read_path_model(&out).unwrap();
        assert_eq!((model.shape().moe_layers, model.shape().num_experts, model.max_depth()), (32, 8, 2));
        let loaded = crate::trace::load(&trace).unwrap();
        let ev = evaluate_all(&loaded, Some((model, "file".into())), 0.2, 2, &[2], &flags.config()).unwrap();
        assert_eq!(ev.reports.len(), 4);
        assert!(within(&ev, "path", 2, 1) > 0.3);
        let v = to_json(&trace, &loaded, &ev);
        assert_eq!(v["results"][3]["predictor"], "path");
        assert_eq!(v["results"][3]["distances"][1]["distance"], 2);
    }

    #[derive(clap::Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: PredictorCommand,
    }

    #[test]
    fn command_line_parses_and_runs() {
        use clap::{CommandFactory, Parser};
        TestCli::command().debug_assert();
        let cli =
            TestCli::try_parse_from(["predictor", "eval", "--trace", "t.csv", "--k", "2,4", "--depth", "2"])
                .unwrap();
        let PredictorCommand::Eval(a) = &cli.command else { panic!("not eval") };
        assert_eq!(
            (a.k.as_deref(), a.depth, a.holdout, a.model.is_none()),
            (Some(&[2, 4][..]), 2, 0.2, true)
        );
        let err = run(&cli.command).unwrap_err().to_string();
        assert!(err.contains("t.csv"), "{err}");

        let Some(trace) = shared_trace("mixtral-8x7b/mixtral_humaneval_p0_prefill_decode.csv") else {
            return;
        };
        let trace = trace.to_str().unwrap();
        let cli = TestCli::try_parse_from(["predictor", "eval", "--trace", trace, "--json", "--epochs", "1"])
            .unwrap();
        run(&cli.command).unwrap();
        let bad = TestCli::try_parse_from(["predictor", "eval", "--trace", trace, "--holdout", "0"]).unwrap();
        assert!(run(&bad.command).unwrap_err().to_string().contains("--holdout"));
    }

    #[test]
    fn bad_model_files_and_mismatched_shapes_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.model");
        std::fs::write(&bad, b"not a model").unwrap();
        let err = read_path_model(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.model") && err.contains("bad magic"), "{err}");
        let missing = read_path_model(&dir.path().join("missing.model")).unwrap_err().to_string();
        assert!(missing.contains("missing.model"), "{missing}");
        assert!(check_holdout(1.0).is_err() && check_holdout(-0.1).is_err() && check_holdout(0.0).is_ok());

        let trace = |layers: usize| Trace {
            meta: TraceMeta {
                model: "tiny".into(),
                num_experts: 4,
                top_k: 1,
                layer_ids: (0..layers as u32).collect(),
            },
            tokens: (0..10)
                .map(|pos| TokenRouting {
                    ahead: Vec::new(),
                    horizon: None,
                    seq: 0,
                    pos,
                    step: None,
                    token_id: None,
                    phase: Phase::Prefill,
                    layers: vec![Some(LayerChoice { experts: vec![pos % 4], weights: vec![] }); layers],
                })
                .collect(),
        };
        let (two, three) = (trace(2), trace(3));
        let model = train_path_model(RoutingShape::from(&three.meta), &three.tokens, &TrainConfig::default())
            .unwrap();
        let Err(err) =
            evaluate_all(&two, Some((model, "m.bin".into())), 0.2, 1, &[1], &TrainConfig::default())
        else {
            panic!("a model for 3 layers evaluated on a 2-layer trace")
        };
        assert!(err.to_string().contains("m.bin: the model was trained for"), "{err}");
    }
}
