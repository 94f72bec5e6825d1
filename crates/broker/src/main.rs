//! The `herald` command: `serve`, `check-config`, `sign`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald::Broker;
use herald::config::Config;
use tracing_subscriber::EnvFilter;

/// The default config path, used by `serve` when it exists.
const DEFAULT_CONFIG: &str = "config/herald.toml";

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: a self-hosted MQTT broker with built-in presence"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// Config file; default: config/herald.toml when present, else built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print every error with its key path.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the Signature-mode password: Base64(HMAC-SHA1(secret, client id)).
    Sign {
        #[arg(long)]
        secret: String,
        /// The client id to sign (in the legacy mode, give the Group ID here).
        #[arg(long)]
        client_id: String,
    },
}

/// jemalloc rather than the C library's allocator: size classes keep short-lived allocations
/// (a connection's task, buffers and handshake, a presence event) apart from long-lived ones,
/// and a background thread gives emptied pages back to the system 100 ms after they empty
/// (built-in options in `.cargo/config.toml`; `_RJEM_MALLOC_CONF` overrides them at start).
/// With the C library's allocator the memory of a reconnect storm stayed resident, in holes
/// between the connections that stayed (docs/benchmarks.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(&config),
        Command::Sign { secret, client_id } => {
            println!("{}", herald_auth::sign(&secret, &client_id));
            ExitCode::SUCCESS
        }
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{}: {} error(s)", path.display(), errors.0.len());
        for error in &errors.0 {
            eprintln!("  {error}");
        }
        ExitCode::from(2)
    })
}

fn check_config(path: &Path) -> ExitCode {
    match load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match path {
        Some(path) => match load(&path) {
            Ok(config) => config,
            Err(code) => return code,
        },
        None if Path::new(DEFAULT_CONFIG).exists() => match load(Path::new(DEFAULT_CONFIG)) {
            Ok(config) => config,
            Err(code) => return code,
        },
        None => {
            tracing::warn!(
                "no config file: using built-in defaults (local, anonymous, any client id)"
            );
            Config::builtin()
        }
    };
    // Before the runtime starts its threads (see the module).
    let files = herald::fds::prepare(config.server.max_connections as u64);
    herald::fds::log(&files);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let broker = Broker::start(config).await?;
    if let Some(addr) = broker.tcp_addr {
        // One line on stdout that scripts and tests can wait for.
        println!("herald: listening tcp {addr}");
    }
    for (transport, addr) in &broker.endpoints {
        println!("herald: listening {} {addr}", transport.as_str());
    }
    if let Some(addr) = broker.admin_addr {
        println!("herald: listening admin {addr}");
    }
    wait_for_signal().await?;
    tracing::info!("signal received: shutting down");
    broker.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
