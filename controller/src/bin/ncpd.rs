//! `ncpd`: the NCP controller daemon (OpenFlow listener, reconcile loops, REST API).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use ncp_controller::service::{Service, ServiceConfig};
use ncp_controller::switch::ServerConfig;

#[derive(Parser, Debug)]
#[command(about = "NCP OpenFlow 1.3 controller")]
struct Args {
    /// Where switches connect.
    #[arg(long, default_value = "127.0.0.1:6653")]
    listen: SocketAddr,
    /// Where the REST API listens.
    #[arg(long, default_value = "127.0.0.1:8653")]
    api: SocketAddr,
    /// File holding the API bearer token (else the NCP_TOKEN environment variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Desired-state file (created on first change).
    #[arg(long, default_value = "/var/lib/ncp/controller.json")]
    state: PathBuf,
    #[arg(long, default_value_t = 5)]
    probe_secs: u64,
    #[arg(long, default_value_t = 30)]
    reconcile_secs: u64,
    /// Do not install the lowest-priority NORMAL forwarding rule.
    #[arg(long)]
    no_normal_fallback: bool,
}

fn token(args: &Args) -> anyhow::Result<String> {
    let t = match &args.token_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => std::env::var("NCP_TOKEN").unwrap_or_default(),
    };
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("an API token is required: --token-file or NCP_TOKEN");
    }
    Ok(t)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let token = token(&args)?;
    let cfg = ServiceConfig {
        server: ServerConfig {
            listen: args.listen,
            ..ServerConfig::default()
        },
        state_file: args.state.clone(),
        probe_interval: Duration::from_secs(args.probe_secs.max(1)),
        link_ttl: Duration::from_secs(args.probe_secs.max(1) * 3 + 1),
        reconcile_interval: Duration::from_secs(args.reconcile_secs.max(1)),
        normal_fallback: !args.no_normal_fallback,
    };
    let svc = Service::start(cfg).await?;
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("binding API on {}", args.api))?;
    tracing::info!(api = %args.api, "REST API up");
    axum::serve(listener, ncp_controller::api::router(svc, &token)).await?;
    Ok(())
}
