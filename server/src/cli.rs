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
        /// Threads for HTTP and the control plane; overrides the config's `server.http_threads`
        /// (default: one fewer than the cores, at least one).
        #[arg(long, env = "ALGOLINK_HTTP_THREADS")]
        http_threads: Option<usize>,
    },
    /// Push a model file (.onnx, .safetensors, or a tar of a model directory) as a new version.
    Push {
        path: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// List models and their versions.
    Models,
    /// Models, versions, traffic and health at a glance (80 columns): rates over `--interval`.
    Status {
        /// Seconds between the two readings the rates come from (0.1 to 60).
        #[arg(long, default_value_t = 1.0, value_parser = status_interval)]
        interval: f64,
    },
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

/// Runs a command: the server on `server.http_threads` tokio workers, a client command on this
/// thread.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    if let Command::Serve { config, data, http, http_threads } = cli.command {
        let config = serve_config(config, data, http, http_threads)?;
        let threads = config.server.http_threads();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
        tracing::info!(threads, "HTTP runtime");
        return runtime.block_on(serve(config));
    }
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run(cli))
}

/// Runs a command on the current runtime (`serve` included, whatever its size).
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let pretty = |v: serde_json::Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    let api = Api::new(&cli.server, cli.token);
    match cli.command {
        Command::Serve { config, data, http, http_threads } => {
            serve(serve_config(config, data, http, http_threads)?).await
        }
        Command::Push { path, name } => push(&api, path, name).await,
        Command::Models => models(&api).await,
        Command::Status { interval } => {
            print!("{}", status(&api, interval).await?);
            Ok(())
        }
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

/// The config `serve` runs with: the file's (or the defaults), then the command line's and the
/// environment's overrides.
fn serve_config(
    config: Option<PathBuf>,
    data: Option<PathBuf>,
    http: Option<String>,
    http_threads: Option<usize>,
) -> anyhow::Result<crate::Config> {
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
    if let Some(n) = http_threads {
        anyhow::ensure!(n >= 1, "--http-threads must be at least 1");
        config.server.http_threads = Some(n);
    }
    if let Ok(url) = std::env::var("ALGOLINK_DATABASE_URL") {
        config.registry.database = Some(url);
    }
    if let Ok(url) = std::env::var("ALGOLINK_STORAGE_URL") {
        config.registry.storage = Some(url);
    }
    Ok(config)
}

/// Runs the server with `config` until SIGINT or SIGTERM, then drains in-flight requests.
pub async fn serve(config: crate::Config) -> anyhow::Result<()> {
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

/// What `algolink status` shows of one model.
#[derive(Debug, Default)]
pub struct ModelStatus {
    pub name: String,
    pub ready: usize,
    pub versions: usize,
    pub serving: Option<u64>,
    /// (version, percent) of unversioned requests.
    pub traffic: Vec<(u64, f64)>,
    pub rps: f64,
    pub p99_ms: Option<f64>,
    pub error_percent: Option<f64>,
    /// A canary or an experiment under way.
    pub note: Option<String>,
}

/// The status screen: every line at most 80 characters, whatever the names.
pub fn render_status(header: &str, models: &[ModelStatus], events: &[String]) -> String {
    use std::fmt::Write;
    let fit = |s: &str, width: usize| -> String {
        if s.chars().count() <= width {
            s.to_string()
        } else {
            s.chars().take(width.saturating_sub(1)).chain(['…']).collect()
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", fit(header, 80));
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<22} {:>5} {:>5}  {:<18} {:>7} {:>7} {:>6}",
        "MODEL", "READY", "SERVE", "TRAFFIC", "REQ/S", "P99 MS", "ERR %"
    );
    if models.is_empty() {
        let _ = writeln!(out, "(no model: algolink push FILE --name NAME)");
    }
    for m in models {
        let traffic: Vec<String> = m.traffic.iter().map(|(v, p)| format!("v{v} {p:.0}%")).collect();
        let _ = writeln!(
            out,
            "{:<22} {:>5} {:>5}  {:<18} {:>7} {:>7} {:>6}",
            fit(&m.name, 22),
            fit(&format!("{}/{}", m.ready, m.versions), 5),
            m.serving.map(|v| fit(&format!("v{v}"), 5)).unwrap_or_else(|| "-".into()),
            fit(&traffic.join(" "), 18),
            fit(&if m.rps >= 1000.0 { format!("{:.0}", m.rps) } else { format!("{:.1}", m.rps) }, 7),
            m.p99_ms.map(|p| fit(&format!("{p:.2}"), 7)).unwrap_or_else(|| "-".into()),
            m.error_percent.map(|e| fit(&format!("{e:.1}"), 6)).unwrap_or_else(|| "-".into()),
        );
        if let Some(note) = &m.note {
            let _ = writeln!(out, "{}", fit(&format!("  └ {note}"), 80));
        }
    }
    if !events.is_empty() {
        let _ = writeln!(out, "\nRECENT EVENTS");
        for e in events {
            let _ = writeln!(out, "{}", fit(e, 80));
        }
    }
    out
}

fn status_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 60")),
    }
}

/// A latency histogram as `/v1/models/{name}/live` reports it: `{le, cumulative, count}`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Histogram {
    le: Vec<f64>,
    cumulative: Vec<u64>,
    count: u64,
}

impl Histogram {
    /// Missing or malformed parts read as empty (a version that did not exist yet).
    fn from_json(h: &serde_json::Value) -> Histogram {
        let list = |k: &str| h[k].as_array().cloned().unwrap_or_default();
        Histogram {
            le: list("le").iter().filter_map(serde_json::Value::as_f64).collect(),
            cumulative: list("cumulative").iter().filter_map(serde_json::Value::as_u64).collect(),
            count: h["count"].as_u64().unwrap_or(0),
        }
    }

    /// Adds `other` bucket by bucket (the versions of a model share their bounds): a model's
    /// p99 comes from all its requests, not from the worst version's.
    fn add(&mut self, other: &Histogram) {
        if self.le.is_empty() {
            self.le.clone_from(&other.le);
        }
        self.cumulative.resize(self.cumulative.len().max(other.cumulative.len()), 0);
        for (t, a) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *t += a;
        }
        self.count += other.count;
    }

    /// The q-quantile (seconds) of what was observed between `before` and this reading.
    fn quantile_since(&self, before: &Histogram, q: f64) -> Option<f64> {
        let count = self.count.checked_sub(before.count).filter(|&c| c > 0)?;
        let target = q * count as f64;
        let mut below = 0u64;
        for (i, bound) in self.le.iter().enumerate() {
            let c = self
                .cumulative
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.cumulative.get(i).copied().unwrap_or(0));
            if c as f64 >= target {
                let lower = if i == 0 { 0.0 } else { self.le[i - 1] };
                let share = if c > below { (target - below as f64) / (c - below) as f64 } else { 1.0 };
                return Some(lower + (bound - lower) * share);
            }
            below = c;
        }
        self.le.last().copied()
    }
}

async fn status(api: &Api, interval_s: f64) -> anyhow::Result<String> {
    use serde_json::Value;
    let meta = api.call("GET", "/v2", None).await?;
    let ready =
        api.request(reqwest::Method::GET, "/v2/health/ready").send().await.is_ok_and(|r| r.status().is_success());
    let who = api.call("GET", "/v1/whoami", None).await?;
    let models = api.call("GET", "/v1/models", None).await?;
    let models = models.as_array().cloned().unwrap_or_default();
    let names: Vec<String> = models.iter().filter_map(|m| m["name"].as_str().map(String::from)).collect();
    let read = |names: Vec<String>| async move {
        let mut out = std::collections::HashMap::new();
        for n in names {
            out.insert(n.clone(), api.call("GET", &format!("/v1/models/{n}/live"), None).await?);
        }
        anyhow::Ok(out)
    };
    let first = read(names.clone()).await?;
    tokio::time::sleep(std::time::Duration::from_secs_f64(interval_s)).await;
    let second = read(names).await?;
    let experiments = api.call("GET", "/v1/experiments", None).await?;
    let mut rows = Vec::new();
    for m in &models {
        let name = m["name"].as_str().unwrap_or("?").to_string();
        let versions = m["versions"].as_array().cloned().unwrap_or_default();
        let (a, b) = (&first[&name], &second[&name]);
        let dt = (b["at_ms"].as_f64().unwrap_or(0.0) - a["at_ms"].as_f64().unwrap_or(0.0)).max(1.0) / 1000.0;
        let (mut done, mut failed) = (0u64, 0u64);
        let (mut latency_before, mut latency_now) = (Histogram::default(), Histogram::default());
        for v in b["versions"].as_array().into_iter().flatten() {
            let before = a["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["version"] == v["version"])
                .cloned()
                .unwrap_or(Value::Null);
            let n = |x: &Value, k: &str| x[k].as_u64().unwrap_or(0);
            done += (n(v, "success") + n(v, "failure")).saturating_sub(n(&before, "success") + n(&before, "failure"));
            failed += n(v, "failure").saturating_sub(n(&before, "failure"));
            // A version loaded between the readings counts from zero.
            latency_before.add(&Histogram::from_json(&before["request_seconds"]));
            latency_now.add(&Histogram::from_json(&v["request_seconds"]));
        }
        let p99 = latency_now.quantile_since(&latency_before, 0.99);
        let traffic = m["traffic"]["variants"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (v["version"].as_u64().unwrap_or(0), v["percent"].as_f64().unwrap_or(0.0)))
            .collect();
        let experiment = experiments
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["model"] == name.as_str() && e["state"] == "running")
            .map(|e| format!("experiment {} ({}) running", e["id"], e["goal"].as_str().unwrap_or("?")));
        let rollout = api.call("GET", &format!("/v1/models/{name}/rollout"), None).await?;
        let canary = rollout["rollout"]
            .as_object()
            .map(|r| format!("canary v{} at {}% against v{}", r["canary"], r["weight"], r["control"]));
        let note = match (canary, experiment) {
            (Some(c), Some(e)) => Some(format!("{c}; {e}")),
            (c, e) => c.or(e),
        };
        rows.push(ModelStatus {
            name,
            ready: versions.iter().filter(|v| v["state"] == "ready").count(),
            versions: versions.len(),
            serving: m["serving_version"].as_u64(),
            traffic,
            rps: done as f64 / dt,
            p99_ms: p99.map(|s| s * 1000.0),
            error_percent: (done > 0).then(|| 100.0 * failed as f64 / done as f64),
            note,
        });
    }
    let events = api.call("GET", "/v1/events?order=newest&limit=5", None).await?;
    let now = crate::lifecycle::now_ms();
    let events: Vec<String> = events
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let age_s = now.saturating_sub(e["at_ms"].as_u64().unwrap_or(now)) / 1000;
            let by = e["detail"]["by"].as_str().map(|b| format!(" ({b})")).unwrap_or_default();
            format!(
                "{:>6} {} {}{by}",
                format_age(age_s),
                e["model"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    let user = match who["user"].as_str() {
        Some(u) => format!("as {u}"),
        None => "auth off".into(),
    };
    let header = format!(
        "algolink {} at {} · {} · {} model{} · {user}",
        meta["version"].as_str().unwrap_or("?"),
        api.base,
        if ready { "ready" } else { "NOT READY" },
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    Ok(render_status(&header, &rows, &events))
}

fn format_age(s: u64) -> String {
    match s {
        0..90 => format!("{s}s"),
        90..5400 => format!("{}m", s / 60),
        5400..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn the_status_screen_fits_80_columns() {
        let long = "a-very-long-namespace/an-even-longer-model-name-for-fraud";
        let models = vec![
            ModelStatus {
                name: long.into(),
                ready: 2,
                versions: 12,
                serving: Some(12),
                traffic: vec![(10, 33.3), (11, 33.3), (12, 33.4)],
                rps: 123456.7,
                p99_ms: Some(1234.5),
                error_percent: Some(100.0),
                note: Some(format!("canary v12 at 10% against v11; experiment 7 (conversion) running {long}")),
            },
            ModelStatus { name: "iris".into(), ready: 1, versions: 1, serving: Some(1), ..Default::default() },
        ];
        let events = vec![format!("   12s {long} version 12 promoted over version 11: promoted by request (ann)")];
        let out = render_status(&format!("algolink 0.1.0 at http://{long}:8000 · ready · 2 models"), &models, &events);
        for line in out.lines() {
            assert!(line.chars().count() <= 80, "{} columns: {line}", line.chars().count());
        }
        assert!(out.contains("a-very-long-namespace… "), "{out}");
        assert!(out.contains("v10 33% v11 33% v…") && out.contains(" 123457 "), "{out}");
        assert!(out.contains("iris") && out.contains("RECENT EVENTS"), "{out}");
    }

    #[test]
    fn a_model_p99_merges_its_versions() {
        let h = |c: [u64; 3], n: u64| {
            Histogram::from_json(&json!({ "le": [0.001, 0.01, 0.1], "cumulative": c, "count": n }))
        };
        let mut sum = Histogram::default();
        // 99 fast requests on one version, one slow on the other: p99 is fast, not the slow one's.
        sum.add(&h([99, 99, 99], 99));
        sum.add(&h([0, 0, 1], 1));
        assert_eq!(sum, h([99, 99, 100], 100));
        assert!(sum.quantile_since(&Histogram::from_json(&serde_json::Value::Null), 0.99).unwrap() <= 0.001);
        assert!(status_interval("NaN").is_err() && status_interval("inf").is_err() && status_interval("0").is_err());
        assert_eq!(status_interval("2.5"), Ok(2.5));
    }

    #[test]
    fn p99_comes_from_what_the_histogram_gained() {
        let h = |cum: [u64; 3], count: u64| {
            Histogram::from_json(&json!({ "le": [0.001, 0.01, 0.1], "cumulative": cum, "count": count }))
        };
        // 100 new requests: 90 under 1 ms, 10 in (1 ms, 10 ms].
        let p99 = h([95, 105, 105], 105).quantile_since(&h([5, 5, 5], 5), 0.99).unwrap();
        assert!((p99 - 0.0091).abs() < 1e-9, "{p99}");
        assert_eq!(h([5, 5, 5], 5).quantile_since(&h([5, 5, 5], 5), 0.99), None);
    }
}
