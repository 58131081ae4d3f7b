//! The `stevedore` binary; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    stevedore_engine::cli::main()
}
