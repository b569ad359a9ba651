//! The `algolink` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::TryStreamExt;

#[derive(Parser, Debug)]
#[command(name = "algolink", version, about = "Push a model, serve it over Open Inference Protocol v2.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve {
        /// TOML config file (see configs/).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Registry directory; overrides the config's `server.data_dir`.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Listen address; overrides the config's `server.http`.
        #[arg(long)]
        http: Option<String>,
    },
    /// Push a model file (.onnx, .safetensors, or a tar of a model directory) as a new version.
    Push {
        path: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, env = "ALGOLINK_URL", default_value = "http://127.0.0.1:8000")]
        server: String,
    },
    /// List models and their versions.
    Models {
        #[arg(long, env = "ALGOLINK_URL", default_value = "http://127.0.0.1:8000")]
        server: String,
    },
}

pub async fn serve(config: Option<PathBuf>, data: Option<PathBuf>, http: Option<String>) -> anyhow::Result<()> {
    let mut config = match config {
        Some(path) => crate::Config::from_file(&path)?,
        None => crate::Config::default(),
    };
    if let Some(d) = data {
        config.server.data_dir = d;
    }
    if let Some(h) = http {
        config.server.http = h;
    }
    let running = crate::start(config).await?;
    println!("algolink listening on http://{}", running.addr);
    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    running.stop().await?;
    Ok(())
}

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

pub async fn push(path: PathBuf, name: String, server: String) -> anyhow::Result<()> {
    let file = tokio::fs::File::open(&path).await.with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().await?.len();
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")?
            .progress_chars("=> "),
    );
    bar.set_message(format!("pushing {}", path.display()));
    let progress = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 18)
        .inspect_ok(move |chunk| progress.inc(chunk.len() as u64));
    let url = format!("{}/v1/models/{name}/versions", server.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("sending to {url}"))?;
    bar.finish_and_clear();
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("push refused ({status}): {}", body["error"].as_str().unwrap_or("no message"));
    }
    println!(
        "{} version {} ({}), sha256 {}",
        body["name"].as_str().unwrap_or(&name),
        body["version"],
        body["state"].as_str().unwrap_or("?"),
        body["sha256"].as_str().unwrap_or("?")
    );
    Ok(())
}

pub async fn models(server: String) -> anyhow::Result<()> {
    let url = format!("{}/v1/models", server.trim_end_matches('/'));
    let response = reqwest::get(&url).await.with_context(|| format!("asking {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    if !status.is_success() {
        anyhow::bail!("{status}: {}", body["error"].as_str().unwrap_or("no message"));
    }
    println!("{:<24} {:>8} {:>8}  {:<10} {:>10}  SHA256", "MODEL", "VERSION", "SERVING", "STATE", "SIZE");
    for m in body.as_array().into_iter().flatten() {
        let serving = m["serving_version"].as_u64();
        for v in m["versions"].as_array().into_iter().flatten() {
            let version = v["version"].as_u64().unwrap_or(0);
            println!(
                "{:<24} {:>8} {:>8}  {:<10} {:>10}  {}",
                m["name"].as_str().unwrap_or("?"),
                version,
                if serving == Some(version) { "*" } else { "" },
                v["state"].as_str().unwrap_or("?"),
                v["size"].as_u64().unwrap_or(0),
                &v["sha256"].as_str().unwrap_or("?")[..12.min(v["sha256"].as_str().unwrap_or("?").len())]
            );
        }
    }
    Ok(())
}
