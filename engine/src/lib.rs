//! Orchestration: the expert I/O pipeline, generation, sampling and the CLI.
