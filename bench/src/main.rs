//! `algolink-bench`: a closed-loop load generator for any Open Inference Protocol v2 server.
//!
//! For each concurrency level, C clients send requests back to back: the request file's one
//! request, or, when the file holds a JSON array of requests, each client the next one in turn. Measurement windows
//! repeat until three in a row agree on throughput within the stability threshold (as
//! perf_analyzer does), then the last three windows are reported together: req/s and latency
//! percentiles, as JSON lines on stdout.
//!
//!     algolink-bench --url http://127.0.0.1:8000 --model iris --request iris.json -c 1,16,32
//!
//! With `--rate`, an open loop instead: requests leave at that rate whatever the answers (as
//! real traffic does), for `--duration-s`; the report separates answers (200), refusals (429 or
//! 503, and whether they carried `Retry-After`) and errors, with their latencies: the overload
//! and soak runs in `tests/faults/` read it.
//!
//!     algolink-bench --model iris --request iris.json --rate 4000 --duration-s 20 --slo-ms 100

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Closed-loop load generator for Open Inference Protocol v2 servers")]
struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name (the request goes to /v2/models/{model}/infer).
    #[arg(long)]
    model: String,
    /// File holding the JSON inference request body to send, or a JSON array of them.
    #[arg(long)]
    request: PathBuf,
    /// Concurrency levels, comma-separated.
    #[arg(short, long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Length of one measurement window, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    window_ms: u64,
    /// Windows must agree within this fraction to count as stable.
    #[arg(long, default_value_t = 0.10)]
    stability: f64,
    /// Give up on stability after this many windows (the result is then marked unstable).
    #[arg(long, default_value_t = 10)]
    max_windows: usize,
    /// Label added to every output line (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Send the inputs and ask for the outputs with the binary tensor extension (as
    /// perf_analyzer does by default) instead of JSON data.
    #[arg(long)]
    binary: bool,
    /// Open loop: requests per second, sent on schedule whatever the answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: requests leave at random, exponentially distributed gaps (a Poisson process at
    /// `--rate`, as independent users send) instead of evenly spaced.
    #[arg(long)]
    poisson: bool,
    /// Open loop: how long to send, in seconds.
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// Open loop: answers slower than this count as late (reported as `ok_within_slo`).
    #[arg(long)]
    slo_ms: Option<f64>,
    /// Open loop: requests outstanding at most; a request due beyond it is counted as
    /// `not_sent` (the client, not the server, is saturated).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
}

#[derive(Serialize)]
struct OpenReport {
    label: String,
    model: String,
    rate: f64,
    duration_s: f64,
    sent: usize,
    not_sent: usize,
    ok: usize,
    ok_rps: f64,
    ok_p50_ms: f64,
    ok_p99_ms: f64,
    ok_within_slo: usize,
    refused: usize,
    refused_with_retry_after: usize,
    refusal_p50_ms: f64,
    refusal_p99_ms: f64,
    errors: usize,
    error_statuses: Vec<u16>,
}

/// What one open-loop request came to: status (0: no answer), latency, `Retry-After` present.
type Outcome = (u16, Duration, bool);

async fn open_loop(
    args: &Args,
    client: &reqwest::Client,
    url: &str,
    bodies: &Arc<Vec<Request>>,
    rate: f64,
) -> OpenReport {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = (rate * args.duration_s).round() as usize;
    let start = tokio::time::Instant::now();
    let mut not_sent = 0;
    let mut at = 0.0;
    for i in 0..total {
        // On schedule, however the earlier ones fared: request i leaves at i / rate, or after
        // the sum of i exponential gaps of mean 1 / rate.
        at = match args.poisson {
            true => at - (1.0 - rand::random::<f64>()).ln() / rate,
            false => i as f64 / rate,
        };
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        if in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
            not_sent += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let request = bodies[i % bodies.len()].send(client, url);
        let (tx, in_flight) = (tx.clone(), in_flight.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let outcome = match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry_after = r.headers().contains_key(reqwest::header::RETRY_AFTER);
                    let complete = r.bytes().await.is_ok();
                    (if complete { status } else { 0 }, t.elapsed(), retry_after)
                }
                Err(_) => (0, t.elapsed(), false),
            };
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(outcome);
        });
    }
    drop(tx);
    let mut outcomes = Vec::with_capacity(total);
    while let Some(o) = rx.recv().await {
        outcomes.push(o);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut ok: Vec<Duration> = outcomes.iter().filter(|o| o.0 == 200).map(|o| o.1).collect();
    let mut refusals: Vec<Duration> = outcomes.iter().filter(|o| o.0 == 429 || o.0 == 503).map(|o| o.1).collect();
    ok.sort_unstable();
    refusals.sort_unstable();
    let mut error_statuses: Vec<u16> = outcomes.iter().map(|o| o.0).filter(|s| !matches!(s, 200 | 429 | 503)).collect();
    error_statuses.sort_unstable();
    let errors = error_statuses.len();
    error_statuses.dedup();
    let slo = args.slo_ms.map(|ms| Duration::from_secs_f64(ms / 1e3));
    OpenReport {
        label: args.label.clone(),
        model: args.model.clone(),
        rate,
        duration_s: args.duration_s,
        sent: outcomes.len(),
        not_sent,
        ok_rps: ok.len() as f64 / elapsed,
        ok: ok.len(),
        ok_p50_ms: percentile(&ok, 0.50),
        ok_p99_ms: percentile(&ok, 0.99),
        ok_within_slo: slo.map_or(ok.len(), |slo| ok.iter().filter(|l| **l <= slo).count()),
        refused: refusals.len(),
        refused_with_retry_after: outcomes.iter().filter(|o| (o.0 == 429 || o.0 == 503) && o.2).count(),
        refusal_p50_ms: percentile(&refusals, 0.50),
        refusal_p99_ms: percentile(&refusals, 0.99),
        errors,
        error_statuses,
    }
}

/// Rewrites a JSON request into the binary tensor form: each input's data becomes raw
/// little-endian bytes after the JSON header. Returns the body and the header length.
fn to_binary(request: &[u8]) -> anyhow::Result<(Vec<u8>, usize)> {
    fn flatten(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        match v {
            serde_json::Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
            leaf => out.push(leaf.clone()),
        }
    }
    let mut req: serde_json::Value = serde_json::from_slice(request)?;
    let mut blobs = Vec::new();
    for input in req["inputs"].as_array_mut().context("request has no inputs")? {
        let mut leaves = Vec::new();
        flatten(&input["data"], &mut leaves);
        let mut raw = Vec::new();
        for leaf in &leaves {
            match input["datatype"].as_str().unwrap_or("") {
                "FP32" => raw.extend_from_slice(&(leaf.as_f64().context("number")? as f32).to_le_bytes()),
                "FP64" => raw.extend_from_slice(&leaf.as_f64().context("number")?.to_le_bytes()),
                "INT64" => raw.extend_from_slice(&leaf.as_i64().context("integer")?.to_le_bytes()),
                "INT32" => raw.extend_from_slice(&(leaf.as_i64().context("integer")? as i32).to_le_bytes()),
                other => anyhow::bail!("--binary does not convert {other} inputs"),
            }
        }
        let obj = input.as_object_mut().context("input is an object")?;
        obj.remove("data");
        obj.insert("parameters".into(), serde_json::json!({ "binary_data_size": raw.len() }));
        blobs.extend(raw);
    }
    req["parameters"] = serde_json::json!({ "binary_data_output": true });
    let mut body = serde_json::to_vec(&req)?;
    let header = body.len();
    body.extend(blobs);
    Ok((body, header))
}

#[derive(Serialize)]
struct Report {
    label: String,
    model: String,
    concurrency: usize,
    requests: usize,
    errors: usize,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    windows: usize,
    stable: bool,
}

struct Window {
    latencies: Vec<Duration>,
    errors: usize,
    elapsed: Duration,
}

impl Window {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// What every client sends.
struct Request {
    body: Vec<u8>,
    /// `Inference-Header-Content-Length`, for binary bodies.
    header: Option<usize>,
}

impl Request {
    fn send(&self, client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let b = client.post(url).body(self.body.clone());
        match self.header {
            Some(n) => b.header("Inference-Header-Content-Length", n),
            None => b,
        }
    }
}

async fn window(
    client: &reqwest::Client,
    url: &str,
    bodies: &Arc<Vec<Request>>,
    concurrency: usize,
    length: Duration,
) -> Window {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for c in 0..concurrency {
        let (client, url, bodies, stop) = (client.clone(), url.to_string(), bodies.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut next = c;
            while !stop.load(Ordering::Relaxed) {
                let body = &bodies[next % bodies.len()];
                next += 1;
                let t = Instant::now();
                let ok = match body.send(&client, &url).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    latencies.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut w = Window { latencies: Vec::new(), errors: 0, elapsed };
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        w.latencies.extend(l);
        w.errors += e;
    }
    w
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let json = std::fs::read(&args.request).with_context(|| format!("reading {}", args.request.display()))?;
    let requests = match serde_json::from_slice(&json)? {
        serde_json::Value::Array(items) => items.iter().map(serde_json::to_vec).collect::<Result<Vec<_>, _>>()?,
        _ => vec![json],
    };
    anyhow::ensure!(!requests.is_empty(), "{} holds an empty list", args.request.display());
    let body = Arc::new(
        requests
            .into_iter()
            .map(|json| {
                Ok(if args.binary {
                    let (body, header) = to_binary(&json)?;
                    Request { body, header: Some(header) }
                } else {
                    Request { body: json, header: None }
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let url = format!("{}/v2/models/{}/infer", args.url.trim_end_matches('/'), args.model);
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).tcp_nodelay(true).build()?;
    // Every request once first: fail fast on a wrong URL or body.
    for request in body.iter() {
        let r = request.send(&client, &url).send().await.with_context(|| format!("POST {url}"))?;
        anyhow::ensure!(
            r.status().is_success(),
            "{url} answered {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate > 0.0 && args.duration_s > 0.0, "--rate and --duration-s must be positive");
        let report = open_loop(&args, &client, &url, &body, rate).await;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for &c in &args.concurrency {
        let length = Duration::from_millis(args.window_ms);
        window(&client, &url, &body, c, length / 2).await; // warm-up, discarded
        let mut windows: Vec<Window> = Vec::new();
        let stable = loop {
            windows.push(window(&client, &url, &body, c, length).await);
            let n = windows.len();
            if n >= 3 {
                let last: Vec<f64> = windows[n - 3..].iter().map(Window::rps).collect();
                let (lo, hi) = last.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                if hi > 0.0 && (hi - lo) / hi <= args.stability {
                    break true;
                }
            }
            if n >= args.max_windows {
                break false;
            }
        };
        let n = windows.len();
        let last = &windows[n.saturating_sub(3)..];
        let mut latencies: Vec<Duration> = last.iter().flat_map(|w| w.latencies.iter().copied()).collect();
        latencies.sort_unstable();
        let elapsed: f64 = last.iter().map(|w| w.elapsed.as_secs_f64()).sum();
        let report = Report {
            label: args.label.clone(),
            model: args.model.clone(),
            concurrency: c,
            requests: latencies.len(),
            errors: last.iter().map(|w| w.errors).sum(),
            rps: latencies.len() as f64 / elapsed,
            p50_ms: percentile(&latencies, 0.50),
            p90_ms: percentile(&latencies, 0.90),
            p99_ms: percentile(&latencies, 0.99),
            windows: n,
            stable,
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
