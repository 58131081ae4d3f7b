//! Benchmarks; see the binaries and benches.
