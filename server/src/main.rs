use algolink_server::cli::{Cli, Command};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tract=warn,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve { config, data, http } => algolink_server::cli::serve(config, data, http).await,
        Command::Push { path, name, server } => algolink_server::cli::push(path, name, server).await,
        Command::Models { server } => algolink_server::cli::models(server).await,
    }
}
