use super::*;
use crate::{evaluate, observe, LayerChoice, Phase, SequenceCursors, TokenRouting, TransitionPredictor};

fn token(pos: u32, token_id: Option<u32>, path: &[u32]) -> TokenRouting {
    TokenRouting {
        horizon: None,
        ahead: Vec::new(),
        seq: 0,
        pos,
        step: None,
        token_id,
        phase: Phase::Prefill,
        layers: path.iter().map(|&e| Some(LayerChoice { experts: vec![e], weights: vec![1.0] })).collect(),
    }
}

fn top1(p: &Prediction) -> u32 {
    p.experts[0].0
}

fn config() -> TrainConfig {
    TrainConfig { epochs: 30, ..TrainConfig::default() }
}

/// Layer 2's expert is a function of layers 0 and 1 together (2 * a + b) that neither layer
/// predicts alone; tokens cycle through the four combinations.
fn two_layer_tokens(n: u32) -> Vec<TokenRouting> {
    (0..n).map(|i| token(i, None, &[i % 2, (i / 2) % 2, 2 * (i % 2) + (i / 2) % 2])).collect()
}

#[test]
fn token_id_determines_the_whole_path() {
    let shape = RoutingShape { moe_layers: 3, num_experts: 4, top_k: 1 };
    let paths = [[0, 1, 2], [3, 3, 0], [1, 0, 3]];
    let tokens: Vec<_> = (0..60).map(|i| token(i, Some(100 + i % 3), &paths[(i % 3) as usize])).collect();
    let model = Arc::new(train_path_model(shape, &tokens, &config()).unwrap());
    assert_eq!(model.num_token_rows(), 3);
    let (mut p, mut c) = (PathPredictor::new(model), RouteCursor::new(shape));
    for (id, path) in [100, 101, 102].iter().zip(&paths) {
        c.begin_token(Some(*id));
        // From the token id alone, before any layer is routed.
        let preds = p.predict(&c, 3);
        assert_eq!(preds.iter().map(top1).collect::<Vec<_>>(), path.to_vec(), "token {id}");
        assert!(preds.iter().all(|p| !p.next_token && p.experts[0].1 > 0.5));
        for (l, &e) in path.iter().enumerate() {
            observe(&mut p, &mut c, l, &[e], &[1.0]);
        }
    }
}

#[test]
fn combines_several_layers_where_one_transition_cannot() {
    let shape = RoutingShape { moe_layers: 3, num_experts: 4, top_k: 1 };
    let train = two_layer_tokens(200);
    let model = Arc::new(train_path_model(shape, &train, &config()).unwrap());
    let test = two_layer_tokens(40);
    let path = evaluate(&mut PathPredictor::new(model), &mut SequenceCursors::new(shape), &test, 1, 1);
    let (mut transition, mut cursors) = (TransitionPredictor::new(shape), SequenceCursors::new(shape));
    crate::replay(&mut transition, &mut cursors, &train);
    let table = evaluate(&mut transition, &mut cursors, &test, 1, 1);
    // Distance 1 within the token: layer 1 from layer 0 (independent: 1/2 at best for both) and
    // layer 2 from layers 0 and 1 (exact for the path model, 1/2 for the table).
    let (path_r, table_r) = (path.distances[0].within.recall(), table.distances[0].within.recall());
    assert!(path_r >= 0.74, "path recall {path_r}");
    assert!(table_r <= 0.5 + 1e-9, "transition recall {table_r}");
}

#[test]
fn predicts_the_next_tokens_first_layers_from_this_token() {
    // Tokens alternate between two paths, so the end of one says how the next starts.
    let shape = RoutingShape { moe_layers: 2, num_experts: 4, top_k: 1 };
    let tokens: Vec<_> =
        (0..100).map(|i| token(i, None, if i % 2 == 0 { &[0, 1] } else { &[2, 3] })).collect();
    let model = Arc::new(train_path_model(shape, &tokens, &config()).unwrap());
    let (mut p, mut c) = (PathPredictor::new(model), RouteCursor::new(shape));
    c.begin_token(None);
    observe(&mut p, &mut c, 0, &[0], &[]);
    observe(&mut p, &mut c, 1, &[1], &[]);
    let preds = p.predict(&c, 2);
    assert_eq!(
        preds.iter().map(|p| (p.layer, p.next_token, top1(p))).collect::<Vec<_>>(),
        [(0, true, 2), (1, true, 3)]
    );
    // At the next token's start with an unknown id, the same evidence is used.
    c.begin_token(None);
    assert_eq!(p.predict(&c, 1)[0].experts[0].0, 2);
}

#[test]
fn training_is_deterministic_and_bytes_round_trip() {
    let shape = RoutingShape { moe_layers: 3, num_experts: 4, top_k: 1 };
    let tokens = two_layer_tokens(50);
    let a = train_path_model(shape, &tokens, &TrainConfig::default()).unwrap();
    let b = train_path_model(shape, &tokens, &TrainConfig::default()).unwrap();
    assert_eq!(a.to_bytes(), b.to_bytes());
    let other = train_path_model(shape, &tokens, &TrainConfig { seed: 9, ..TrainConfig::default() }).unwrap();
    assert_ne!(a.to_bytes(), other.to_bytes(), "the seed orders the tokens");
    assert_eq!(PathModel::from_bytes(&a.to_bytes()).unwrap(), a);
}

#[test]
fn corrupt_bytes_are_clear_errors() {
    let shape = RoutingShape { moe_layers: 2, num_experts: 3, top_k: 1 };
    let tokens: Vec<_> = (0..10).map(|i| token(i, Some(i % 2), &[i % 3, 0])).collect();
    let bytes = train_path_model(shape, &tokens, &TrainConfig::default()).unwrap().to_bytes();
    let header = 8 + 4 * 7;
    assert_eq!(PathModel::from_bytes(b"nonsense"), Err(ModelError::BadMagic));
    let mut v = bytes.clone();
    v[8] = 2;
    assert_eq!(PathModel::from_bytes(&v), Err(ModelError::UnsupportedVersion(2)));
    let mut v = bytes.clone();
    v[16] = 9; // num_experts = 9 > data present
    assert!(matches!(PathModel::from_bytes(&v), Err(ModelError::Truncated { .. })));
    let mut v = bytes.clone();
    v[20] = 0; // top_k = 0
    assert_eq!(PathModel::from_bytes(&v), Err(ModelError::BadDimension { field: "top_k", value: 0 }));
    assert!(matches!(PathModel::from_bytes(&bytes[..bytes.len() - 1]), Err(ModelError::Truncated { .. })));
    let mut v = bytes.clone();
    v.push(0);
    assert_eq!(PathModel::from_bytes(&v), Err(ModelError::TrailingBytes(1)));
    // Two token rows (ids 0 and 1): make them equal.
    let mut v = bytes.clone();
    v[header + 4..header + 8].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(PathModel::from_bytes(&v), Err(ModelError::UnsortedTokenIds(1)));
    let mut v = bytes.clone();
    let n = v.len();
    v[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_eq!(PathModel::from_bytes(&v), Err(ModelError::NonFinite("recent_w")));
}

#[test]
fn bad_training_input_is_an_error() {
    let shape = RoutingShape { moe_layers: 2, num_experts: 3, top_k: 1 };
    assert_eq!(train_path_model(shape, &[], &TrainConfig::default()), Err(ModelError::NoTrainingData));
    let tokens = [token(0, None, &[0, 1])];
    let zero_depth = TrainConfig { max_depth: 0, ..TrainConfig::default() };
    assert!(matches!(train_path_model(shape, &tokens, &zero_depth), Err(ModelError::BadConfig(_))));
    let nan_rate = TrainConfig { learning_rate: f32::NAN, ..TrainConfig::default() };
    assert!(matches!(train_path_model(shape, &tokens, &nan_rate), Err(ModelError::BadConfig(_))));
}
