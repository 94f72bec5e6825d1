//! The `herald-bench` command: parse the options, run one scenario, print one JSON line.

use std::process::ExitCode;

use clap::Parser;
use herald_bench::{Options, run};

fn main() -> ExitCode {
    let options = Options::parse();
    // One thread: a current-thread runtime (no cross-thread wake-ups); more: a pool.
    let built = if options.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.threads)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("herald-bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(&options)) {
        Ok(summary) => {
            println!("{}", summary.to_json_line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let line = serde_json::json!({
                "scenario": options.scenario,
                "label": options.label,
                "case": options.case,
                "error": e.to_string(),
            });
            println!("{line}");
            eprintln!("herald-bench: {e}");
            ExitCode::from(1)
        }
    }
}
