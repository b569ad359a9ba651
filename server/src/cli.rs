//! The `algolink` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::TryStreamExt;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "algolink", version, about = "Push a model, serve it over Open Inference Protocol v2.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// The server client commands talk to.
    #[arg(long, env = "ALGOLINK_URL", default_value = "http://127.0.0.1:8000", global = true)]
    pub server: String,
    /// Bearer token for a server with auth on (`algolink token create` makes one).
    #[arg(long, env = "ALGOLINK_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
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
    },
    /// List models and their versions.
    Models,
    /// Point aliases (`champion`, `challenger`, any name) at versions.
    Alias {
        #[command(subcommand)]
        action: AliasAction,
    },
    /// Split a model's traffic between versions or aliases, and mirror some to a shadow.
    Route {
        #[command(subcommand)]
        action: RouteAction,
    },
    /// Roll a canary out by steps behind health gates, or stop it.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Compare a route's variants on a business outcome with an always-valid sequential test.
    Experiment {
        #[command(subcommand)]
        action: ExperimentAction,
    },
    /// The lifecycle event log.
    Events {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Who the token is: user, owner or not, roles per namespace.
    Whoami,
    /// Bearer tokens: create (prints only the token, for `export ALGOLINK_TOKEN=$(...)`), list, revoke.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Namespaces (one per team) own models named `team/model`.
    Namespace {
        #[command(subcommand)]
        action: NamespaceAction,
    },
    /// Who holds which role in a namespace: viewer, predictor, publisher, admin.
    Member {
        #[command(subcommand)]
        action: MemberAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// `token create --user ann --namespace team --expires 30d`
    Create {
        /// Default: yourself.
        #[arg(long)]
        user: Option<String>,
        /// Confine the token to one namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Lifetime: 90s, 30m, 12h, 30d (default: until revoked).
        #[arg(long)]
        expires: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Your tokens; a namespace's (its admins); everyone's (`--all`, the owner).
    List {
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        all: bool,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum NamespaceAction {
    /// (owner) `namespace create team`
    Create {
        name: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum MemberAction {
    /// `member set team ann publisher` (creates the user if new)
    Set {
        namespace: String,
        user: String,
        role: String,
    },
    /// Removes the user and revokes its tokens confined to the namespace.
    Rm {
        namespace: String,
        user: String,
    },
    List {
        namespace: String,
    },
}

/// `90`, `90s`, `30m`, `12h`, `30d` → seconds.
fn parse_duration_s(text: &str) -> anyhow::Result<f64> {
    let (number, unit) = text.find(|c: char| c.is_ascii_alphabetic()).map_or((text, "s"), |i| text.split_at(i));
    let n: f64 =
        number.trim().parse().with_context(|| format!("{text:?}: expected a duration like 30m, 12h or 30d"))?;
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => anyhow::bail!("{text:?}: unknown unit {other:?} (use s, m, h or d)"),
    };
    Ok(n * scale)
}

#[derive(Subcommand, Debug)]
pub enum AliasAction {
    /// `alias set fraud champion 3`
    Set { model: String, alias: String, version: u64 },
    /// `alias rm fraud challenger`
    Rm { model: String, alias: String },
}

#[derive(Subcommand, Debug)]
pub enum RouteAction {
    Show {
        model: String,
    },
    /// `route set fraud champion=90 challenger=10 --shadow 4=20`
    Set {
        model: String,
        /// TARGET=PERCENT, TARGET a version or an alias (weights only matter for fixed routes).
        #[arg(required = true)]
        variants: Vec<String>,
        /// Shares follow Thompson sampling on the running experiment's outcomes.
        #[arg(long)]
        thompson: bool,
        /// Least share per variant under --thompson, percent.
        #[arg(long, default_value_t = 5.0)]
        floor: f64,
        /// TARGET=PERCENT of requests mirrored to a shadow version.
        #[arg(long)]
        shadow: Option<String>,
    },
    /// Requests go to the newest version again.
    Clear {
        model: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum RolloutAction {
    /// `rollout start fraud 4 --step 10 --interval 60 --max-weight 50`
    Start {
        model: String,
        canary: String,
        #[arg(long)]
        control: Option<String>,
        #[arg(long)]
        step: Option<u32>,
        #[arg(long)]
        interval: Option<f64>,
        #[arg(long)]
        max_weight: Option<u32>,
        #[arg(long)]
        deadline: Option<f64>,
    },
    Show {
        model: String,
    },
    /// Roll back now.
    Abort {
        model: String,
    },
    /// Promote now.
    Promote {
        model: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ExperimentAction {
    /// Start on the model's current route.
    Start {
        model: String,
        /// conversion (0/1) or reward (any number).
        #[arg(long, default_value = "conversion")]
        goal: String,
        #[arg(long)]
        control: Option<String>,
        #[arg(long)]
        alpha: Option<f64>,
        /// The difference the test is tuned to find, in the outcome's unit.
        #[arg(long)]
        min_effect: Option<f64>,
        #[arg(long)]
        max_samples: Option<u64>,
    },
    List {
        #[arg(long)]
        model: Option<String>,
    },
    Show {
        id: u64,
    },
    Stop {
        id: u64,
    },
    /// Stop and promote the winner by moving an alias.
    Conclude {
        id: u64,
        #[arg(long)]
        winner: Option<u64>,
        #[arg(long)]
        alias: Option<String>,
    },
}

/// Runs a client command against a server.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let pretty = |v: serde_json::Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    let api = Api::new(&cli.server, cli.token);
    match cli.command {
        Command::Serve { config, data, http } => serve(config, data, http).await,
        Command::Push { path, name } => push(&api, path, name).await,
        Command::Models => models(&api).await,
        Command::Whoami => {
            pretty(api.call("GET", "/v1/whoami", None).await?);
            Ok(())
        }
        Command::Token { action } => {
            match action {
                TokenAction::Create { user, namespace, expires, description } => {
                    let expires_in_s = expires.as_deref().map(parse_duration_s).transpose()?;
                    let body = json!({ "user": user, "namespace": namespace, "expires_in_s": expires_in_s, "description": description });
                    let made = api.call("POST", "/v1/tokens", Some(body)).await?;
                    eprintln!(
                        "token {} for {}{} (shown once; keep it secret)",
                        made["id"].as_str().unwrap_or("?"),
                        made["user"].as_str().unwrap_or("?"),
                        made["namespace"].as_str().map(|n| format!(", confined to {n}")).unwrap_or_default()
                    );
                    println!("{}", made["token"].as_str().unwrap_or_default());
                }
                TokenAction::List { namespace, all } => {
                    let mut q = format!("?all={all}");
                    if let Some(ns) = namespace {
                        q.push_str(&format!("&namespace={ns}"));
                    }
                    pretty(api.call("GET", &format!("/v1/tokens{q}"), None).await?);
                }
                TokenAction::Revoke { id } => pretty(api.call("DELETE", &format!("/v1/tokens/{id}"), None).await?),
            }
            Ok(())
        }
        Command::Namespace { action } => {
            pretty(match action {
                NamespaceAction::Create { name } => {
                    api.call("POST", "/v1/namespaces", Some(json!({ "name": name }))).await?
                }
                NamespaceAction::List => api.call("GET", "/v1/namespaces", None).await?,
            });
            Ok(())
        }
        Command::Member { action } => {
            pretty(match action {
                MemberAction::Set { namespace, user, role } => {
                    let path = format!("/v1/namespaces/{namespace}/members/{user}");
                    api.call("PUT", &path, Some(json!({ "role": role }))).await?
                }
                MemberAction::Rm { namespace, user } => {
                    api.call("DELETE", &format!("/v1/namespaces/{namespace}/members/{user}"), None).await?
                }
                MemberAction::List { namespace } => {
                    api.call("GET", &format!("/v1/namespaces/{namespace}/members"), None).await?
                }
            });
            Ok(())
        }
        Command::Alias { action } => {
            pretty(match action {
                AliasAction::Set { model, alias, version } => {
                    api.call("PUT", &format!("/v1/models/{model}/aliases/{alias}"), Some(json!({ "version": version })))
                        .await?
                }
                AliasAction::Rm { model, alias } => {
                    api.call("DELETE", &format!("/v1/models/{model}/aliases/{alias}"), None).await?
                }
            });
            Ok(())
        }
        Command::Route { action } => {
            pretty(match action {
                RouteAction::Show { model } => api.call("GET", &format!("/v1/models/{model}/route"), None).await?,
                RouteAction::Clear { model } => api.call("DELETE", &format!("/v1/models/{model}/route"), None).await?,
                RouteAction::Set { model, variants, thompson, floor, shadow } => {
                    let pair = |s: &str| -> anyhow::Result<(String, f64)> {
                        let (t, w) = s.split_once('=').unwrap_or((s, "0"));
                        Ok((t.to_string(), w.parse().with_context(|| format!("{s}: expected TARGET=PERCENT"))?))
                    };
                    let variants = variants
                        .iter()
                        .map(|v| pair(v).map(|(t, w)| json!({ "target": t, "weight": w as u32 })))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let mut route = json!({ "variants": variants, "strategy": if thompson { "thompson" } else { "fixed" }, "floor": floor });
                    if let Some(s) = shadow {
                        let (t, p) = pair(&s)?;
                        route["shadow"] = json!({ "target": t, "percent": p });
                    }
                    api.call("PUT", &format!("/v1/models/{model}/route"), Some(route)).await?
                }
            });
            Ok(())
        }
        Command::Rollout { action } => {
            pretty(match action {
                RolloutAction::Start { model, canary, control, step, interval, max_weight, deadline } => {
                    let mut body = json!({ "canary": canary });
                    if let Some(c) = control {
                        body["control"] = json!(c);
                    }
                    let mut policy = serde_json::Map::new();
                    for (k, v) in [
                        ("step", step.map(f64::from)),
                        ("interval_s", interval),
                        ("max_weight", max_weight.map(f64::from)),
                        ("deadline_s", deadline),
                    ] {
                        if let Some(v) = v {
                            policy.insert(
                                k.into(),
                                if k == "step" || k == "max_weight" { json!(v as u32) } else { json!(v) },
                            );
                        }
                    }
                    if !policy.is_empty() {
                        body["policy"] = serde_json::Value::Object(policy);
                    }
                    api.call("POST", &format!("/v1/models/{model}/rollout"), Some(body)).await?
                }
                RolloutAction::Show { model } => api.call("GET", &format!("/v1/models/{model}/rollout"), None).await?,
                RolloutAction::Abort { model } => {
                    api.call("DELETE", &format!("/v1/models/{model}/rollout"), None).await?
                }
                RolloutAction::Promote { model } => {
                    api.call("POST", &format!("/v1/models/{model}/rollout/promote"), None).await?
                }
            });
            Ok(())
        }
        Command::Experiment { action } => {
            pretty(match action {
                ExperimentAction::Start { model, goal, control, alpha, min_effect, max_samples } => {
                    let mut body = json!({ "goal": goal });
                    for (k, v) in [
                        ("control", control.map(|c| json!(c))),
                        ("alpha", alpha.map(|v| json!(v))),
                        ("min_effect", min_effect.map(|v| json!(v))),
                        ("max_samples", max_samples.map(|v| json!(v))),
                    ] {
                        if let Some(v) = v {
                            body[k] = v;
                        }
                    }
                    api.call("POST", &format!("/v1/models/{model}/experiments"), Some(body)).await?
                }
                ExperimentAction::List { model } => {
                    let q = model.map(|m| format!("?model={m}")).unwrap_or_default();
                    api.call("GET", &format!("/v1/experiments{q}"), None).await?
                }
                ExperimentAction::Show { id } => api.call("GET", &format!("/v1/experiments/{id}"), None).await?,
                ExperimentAction::Stop { id } => api.call("POST", &format!("/v1/experiments/{id}/stop"), None).await?,
                ExperimentAction::Conclude { id, winner, alias } => {
                    let body = json!({ "winner": winner, "alias": alias });
                    api.call("POST", &format!("/v1/experiments/{id}/conclude"), Some(body)).await?
                }
            });
            Ok(())
        }
        Command::Events { model, kind, limit } => {
            let mut q = format!("?limit={limit}");
            for (k, v) in [("model", model), ("kind", kind)] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={v}"));
                }
            }
            let events = api.call("GET", &format!("/v1/events{q}"), None).await?;
            for e in events.as_array().into_iter().flatten() {
                println!(
                    "{:>6}  {:<14} {:<16} {:>4}  {}",
                    e["id"],
                    e["kind"].as_str().unwrap_or("?"),
                    e["model"].as_str().unwrap_or("?"),
                    e["version"].as_u64().map(|v| v.to_string()).unwrap_or_default(),
                    e["message"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

/// A thin client of the management API: JSON in, JSON out, the server's error message on failure.
struct Api {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Api {
    fn new(server: &str, token: Option<String>) -> Api {
        Api { base: server.trim_end_matches('/').to_string(), client: reqwest::Client::new(), token }
    }

    /// A request to `path`, with the bearer token when there is one.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.request(reqwest::Method::from_bytes(method.as_bytes())?, path);
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = request.send().await.with_context(|| format!("asking {url}"))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!("{status}: {}", body["error"].as_str().unwrap_or("no message"));
        }
        Ok(body)
    }
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

async fn push(api: &Api, path: PathBuf, name: String) -> anyhow::Result<()> {
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
    let url = format!("{}/v1/models/{name}/versions", api.base);
    let response = api
        .request(reqwest::Method::POST, &format!("/v1/models/{name}/versions"))
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

async fn models(api: &Api) -> anyhow::Result<()> {
    let body = api.call("GET", "/v1/models", None).await?;
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
