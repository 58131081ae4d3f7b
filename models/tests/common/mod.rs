//! Helpers shared by the model tests.

use std::path::PathBuf;

/// A committed fixture directory (`tests/fixtures/NAME`).
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// Index of the largest logit (the lowest index on ties), as greedy decoding picks.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
