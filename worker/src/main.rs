//! `dsv3-worker`: one binary for every role of a dsv3 fleet, plus `generate` and `bench`.

mod bench;
mod generate;
mod model_source;
mod progress;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dsv3-worker", version, about = "Serve DeepSeek-V3-architecture models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one prompt through the model and print the generated tokens.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode speed on the tiny model and on synthetic configs.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
