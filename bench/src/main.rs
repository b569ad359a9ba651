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
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderValue, RETRY_AFTER};
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// The client shares the host's cores with the server it measures: what it allocates is CPU taken
/// from the server (mimalloc, as the server uses).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Threads the client runs on (0: half the cores, at least one). The client shares the host
    /// with the server it measures: on two cores, a client on both took 20% of AlgoLink's iris
    /// req/s and 7% of FastAPI's (one thread makes ~100k requests/s, more than any server here).
    #[arg(long, default_value_t = 0)]
    threads: usize,
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

async fn open_loop(args: &Args, target: &Arc<Target>, rate: f64) -> OpenReport {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Idle kept-alive connections: a request takes one, or opens one when none is idle.
    let idle: Arc<std::sync::Mutex<Vec<Conn>>> = Arc::default();
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
        let (tx, in_flight, idle, target) = (tx.clone(), in_flight.clone(), idle.clone(), target.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let mut conn = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let outcome = match target.post(&mut conn, i).await {
                Ok((status, retry_after, _)) => (status.as_u16(), t.elapsed(), retry_after),
                Err(_) => (0, t.elapsed(), false),
            };
            if let Some(conn) = conn {
                idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            }
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

/// One request body; the clients share it (`Bytes` clones are reference counts).
struct Request {
    body: Bytes,
    /// `Inference-Header-Content-Length`, for binary bodies.
    header: Option<HeaderValue>,
}

/// A kept-alive HTTP/1.1 connection.
type Conn = SendRequest<Full<Bytes>>;

/// Where the requests go and what they carry. Requests are written with hyper's connection API
/// directly, one connection per client: reqwest's pool, URL handling and per-request copies cost
/// ~25 us of CPU per request, which on a small host is CPU taken from the server under test
/// (perf_analyzer, Triton's client, is C++ for the same reason).
struct Target {
    /// HOST:PORT to connect to.
    addr: String,
    host: HeaderValue,
    /// The infer endpoint's path.
    uri: hyper::Uri,
    requests: Vec<Request>,
}

impl Target {
    fn new(url: &str, model: &str, requests: Vec<Request>) -> anyhow::Result<Target> {
        let base: hyper::Uri = url.parse().with_context(|| format!("--url {url}"))?;
        anyhow::ensure!(base.scheme_str() == Some("http"), "--url must be http://HOST:PORT, not {url}");
        let authority = base.authority().with_context(|| format!("--url {url} names no host"))?;
        Ok(Target {
            addr: format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80)),
            host: HeaderValue::from_str(authority.as_str())?,
            uri: format!("{}/v2/models/{model}/infer", base.path().trim_end_matches('/')).parse()?,
            requests,
        })
    }

    async fn connect(&self) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(&self.addr).await?;
        stream.set_nodelay(true)?;
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(driver);
        Ok(conn)
    }

    /// Sends request `i` (modulo their number) on `conn`, opening a connection first when there
    /// is none or the server closed it; returns the status, whether `Retry-After` came, and the
    /// body once read. On an error the connection is dropped.
    async fn post(&self, conn: &mut Option<Conn>, i: usize) -> anyhow::Result<(StatusCode, bool, Bytes)> {
        let mut c = match conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect().await?,
        };
        let r = &self.requests[i % self.requests.len()];
        let mut request = hyper::Request::post(self.uri.clone()).header(HOST, self.host.clone());
        if let Some(n) = &r.header {
            request = request.header("inference-header-content-length", n.clone());
        }
        c.ready().await?;
        let response = c.send_request(request.body(Full::new(r.body.clone()))?).await?;
        let status = response.status();
        let retry_after = response.headers().contains_key(RETRY_AFTER);
        let body = response.into_body().collect().await?.to_bytes();
        *conn = Some(c);
        Ok((status, retry_after, body))
    }
}

/// One measurement window: `conns.len()` clients send back to back for `length`, each on its
/// own connection (kept for the next window).
async fn window(target: &Arc<Target>, conns: &mut Vec<Option<Conn>>, length: Duration) -> Window {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(conns.len());
    for (c, conn) in conns.drain(..).enumerate() {
        let (target, stop) = (target.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut conn = conn;
            let mut next = c;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match target.post(&mut conn, next).await {
                    Ok((status, _, _)) if status.is_success() => latencies.push(t.elapsed()),
                    _ => errors += 1,
                }
                next += 1;
            }
            (latencies, errors, conn)
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut w = Window { latencies: Vec::new(), errors: 0, elapsed };
    for t in tasks {
        let (l, e, conn) = t.await.expect("client task");
        w.latencies.extend(l);
        w.errors += e;
        conns.push(conn);
    }
    w
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() / 2).max(1),
        n => n,
    };
    let mut runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let json = std::fs::read(&args.request).with_context(|| format!("reading {}", args.request.display()))?;
    let requests = match serde_json::from_slice(&json)? {
        serde_json::Value::Array(items) => items.iter().map(serde_json::to_vec).collect::<Result<Vec<_>, _>>()?,
        _ => vec![json],
    };
    anyhow::ensure!(!requests.is_empty(), "{} holds an empty list", args.request.display());
    let requests = requests
        .into_iter()
        .map(|json| {
            Ok(if args.binary {
                let (body, header) = to_binary(&json)?;
                Request { body: body.into(), header: Some(header.into()) }
            } else {
                Request { body: json.into(), header: None }
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = Arc::new(Target::new(&args.url, &args.model, requests)?);
    // Every request once first: fail fast on a wrong URL or body.
    let url = format!("{}{}", args.url.trim_end_matches('/'), target.uri.path());
    let mut conn = None;
    for i in 0..target.requests.len() {
        let (status, _, body) = target.post(&mut conn, i).await.with_context(|| format!("POST {url}"))?;
        anyhow::ensure!(status.is_success(), "{url} answered {status}: {}", String::from_utf8_lossy(&body));
    }
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate > 0.0 && args.duration_s > 0.0, "--rate and --duration-s must be positive");
        let report = open_loop(&args, &target, rate).await;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for &c in &args.concurrency {
        let length = Duration::from_millis(args.window_ms);
        let mut conns: Vec<Option<Conn>> = (0..c).map(|_| None).collect();
        window(&target, &mut conns, length / 2).await; // warm-up, discarded
        let mut windows: Vec<Window> = Vec::new();
        let stable = loop {
            windows.push(window(&target, &mut conns, length).await);
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
