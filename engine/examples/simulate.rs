//! `stevedore simulate` as a standalone example, for running the simulator on its own:
//! `cargo run --release -p stevedore-engine --example simulate -- --trace FILE --capacity 10%,25%,50%`.

use clap::Parser;
use stevedore_engine::sim::{self, SimulateArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = sim::run(&cli.args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
