//! The `upgate` binary: parse arguments, set up logging, load the config, run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use upgate::{demo, Config, Gateway};

mod memory;

/// A WebSocket gateway: TLS at the edge, host/path routing from routes.yaml,
/// backends spliced with failover.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The configuration file (see the README's routes.yaml reference).
    #[arg(long, short, default_value = "routes.yaml", global = true)]
    config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Runtime worker threads (default: one per core). 1 runs everything on one thread.
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate a config file and print the compiled route table.
    Check {
        /// The file to check (defaults to --config).
        file: Option<PathBuf>,
    },
    /// Start the built-in demo backends and the gateway with the repository's
    /// routes.yaml (or an embedded copy), generating a dev certificate if needed.
    Demo,
    /// Run one demo echo backend on its own (for trying failover: kill it).
    DemoBackend {
        /// Address to listen on.
        #[arg(long)]
        listen: String,
        /// Name it reports in `/whoami` answers.
        #[arg(long, default_value = "echo")]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let mut builder = match cli.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = builder.enable_all().on_thread_park(memory::on_park).build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("upgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Pays the collections that runtime threads skip while parking.
    rt.spawn(memory::keeper());
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => Config::load(&cli.config)
            .map_err(|e| e.to_string())
            .and_then(|c| rt.block_on(run(c, false))),
        Command::Check { file } => check(file.as_deref().unwrap_or(&cli.config)),
        Command::Demo => demo::config(&cli.config).and_then(|c| rt.block_on(run(c, true))),
        Command::DemoBackend { listen, name } => rt.block_on(demo_backend(&listen, name)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn check(file: &Path) -> Result<(), String> {
    let c = Config::load(file).map_err(|e| e.to_string())?;
    println!("{}: OK", file.display());
    print!("{}", c.summary());
    Ok(())
}

async fn run(config: Config, with_demo: bool) -> Result<(), String> {
    let stop_demo = CancellationToken::new();
    if with_demo {
        demo::start_all(&stop_demo).await?;
    }
    let gw = Gateway::bind(&config).await.map_err(|e| e.to_string())?;
    for (l, addr) in config.listeners.iter().zip(gw.local_addrs()) {
        let scheme = if l.tls.is_some() { "https" } else { "http" };
        let ws = if l.tls.is_some() { "wss" } else { "ws" };
        tracing::info!("listening on {scheme}://{addr}");
        if l.proxy_protocol {
            tracing::info!(%addr, "connections must start with a PROXY protocol header");
        }
        if with_demo {
            println!("demo page:  {scheme}://{addr}/        chat: {ws}://{addr}/chat   ticker: {ws}://{addr}/ticker?pair=EURUSD   live (resumes): {ws}://{addr}/live");
        }
    }
    if with_demo {
        if let (Some(token), Some(addr)) = (demo::demo_token(&config), gw.local_addrs().first()) {
            println!("private:    ws://{addr}/private?access_token={token}");
            println!(
                "            (or: curl -H 'Authorization: Bearer {token}' http://{addr}/private/x)"
            );
        }
        if let Some(a) = gw.admin_addr() {
            println!("status:     http://{a}/        (metrics: http://{a}/metrics)");
        }
        println!("Ctrl-C to stop.");
    }
    #[cfg(unix)]
    {
        // SIGHUP reloads the config file; the answer is logged by the reload.
        let reload = gw.reload_handle();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the config");
                    let _ = reload.reload().await;
                }
            });
        }
    }
    let drained = gw.run(shutdown_signal()).await;
    stop_demo.cancel();
    tracing::info!(cut = drained.cut, "bye");
    Ok(())
}

async fn demo_backend(listen: &str, name: String) -> Result<(), String> {
    let stop = CancellationToken::new();
    let b = demo::Backend {
        name,
        kind: demo::Kind::Echo,
    };
    let addr = demo::spawn(listen, b, stop.clone())
        .await
        .map_err(|e| format!("demo backend on {listen}: {e}"))?;
    println!("demo echo backend on ws://{addr}");
    shutdown_signal().await;
    stop.cancel();
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
