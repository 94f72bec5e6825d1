//! `herald-bench-report`: turns the JSON lines of many `herald-bench` runs into the results
//! section of `docs/benchmarks.md` (medians, ratios Herald/Mosquitto, targets) and an SVG chart.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use herald_bench::report::{self, Meta};

#[derive(Parser)]
#[command(name = "herald-bench-report")]
struct Args {
    /// JSON lines written by herald-bench.
    #[arg(long)]
    input: PathBuf,
    /// The Markdown file: its results section is replaced (created from the template if absent).
    #[arg(long)]
    output: PathBuf,
    /// Template for a new Markdown file; `{{RESULTS}}` marks where the results go.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Where to write the SVG chart.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The chart's path as linked from the Markdown file.
    #[arg(long)]
    svg_link: Option<String>,
    #[arg(long, default_value = "")]
    machine: String,
    #[arg(long, default_value = "")]
    date: String,
    #[arg(long, default_value = "")]
    herald_version: String,
    #[arg(long, default_value = "")]
    mosquitto_version: String,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match write(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-bench-report: {e}");
            ExitCode::from(1)
        }
    }
}

fn write(args: &Args) -> std::io::Result<()> {
    let text = std::fs::read_to_string(&args.input)?;
    let (summaries, bad) = report::parse_lines(&text);
    for line in &bad {
        eprintln!("herald-bench-report: not a summary (skipped): {line}");
    }
    let meta = Meta {
        machine: args.machine.clone(),
        date: args.date.clone(),
        herald_version: args.herald_version.clone(),
        mosquitto_version: args.mosquitto_version.clone(),
        rounds: args.rounds,
        chart_link: args.svg.as_ref().and(args.svg_link.clone()),
    };
    let section = report::render(&summaries, &meta);
    let existing = std::fs::read_to_string(&args.output).ok();
    let template = match &args.template {
        Some(path) => std::fs::read_to_string(path)?,
        None => "# Benchmarks\n\n{{RESULTS}}\n".to_string(),
    };
    std::fs::write(
        &args.output,
        report::splice(existing.as_deref(), &template, &section),
    )?;
    if let Some(path) = &args.svg {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, report::chart(&summaries))?;
    }
    Ok(())
}
