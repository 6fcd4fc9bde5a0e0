//! Developer tasks: `cargo xtask <task>`.
//!
//! Every task installs or builds what it depends on, so that a fresh machine needs nothing
//! but the repository and `cargo`.

mod bench;
mod ebpf;
mod fuzz;
mod leftovers;
mod run;
mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "interceptor's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: Debian packages, rust-src, bpf-linker, test peers.
    Setup {
        /// Only what building needs (rust-src, bpf-linker): for container image builds.
        #[arg(long)]
        build_only: bool,
    },
    /// Build the eBPF object (`interceptor-ebpf`) for bpfel-unknown-none.
    BuildEbpf(ebpf::BuildOptions),
    /// Demonstrate interceptor on a simulated node on this machine (as root).
    Demo,
    /// Run every check and test: setup, build, fmt, clippy, unit and privileged tests.
    Test(test::TestOptions),
    /// Run each `cargo fuzz` target (interceptor/fuzz) for a bounded time.
    Fuzz(fuzz::FuzzOptions),
    /// Benchmark the agent on a simulated node (as root): ratios against baselines.
    Bench(bench::BenchOptions),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { build_only } => setup::run(build_only),
        Task::BuildEbpf(options) => ebpf::build(&options).map(|_| ()),
        Task::Demo => test::demo(),
        Task::Test(options) => test::run(&options),
        Task::Fuzz(options) => fuzz::run(&options),
        Task::Bench(options) => bench::run(&options),
    }
}
