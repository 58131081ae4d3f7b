//! `stevedore` built inside the end-to-end test package; see Cargo.toml.

fn main() -> std::process::ExitCode {
    stevedore_engine::cli::main()
}
