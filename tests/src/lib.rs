//! Helpers for the end-to-end tests: a real server on a free port with its own registry
//! directory, and a real HTTP client.

pub mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use algolink_server::{Config, Running};
use serde_json::Value;

pub struct TestServer {
    pub url: String,
    pub client: reqwest::Client,
    running: Option<Running>,
    config: Config,
    _dir: tempfile::TempDir,
}

/// Path of a file in `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The reference request and outputs stored beside a fixture model.
pub fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(&format!("{name}.json"))).expect("reference JSON");
    serde_json::from_str(&text).expect("valid reference JSON")
}

impl TestServer {
    /// Starts a server from a TOML config (its `[server]` http and data_dir are replaced, and
    /// its registry is on the suite's backends: see `algolink_registry::testing`).
    pub async fn start(config_toml: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::parse(config_toml).expect("test config");
        config.server.http = "127.0.0.1:0".into();
        config.server.data_dir = dir.path().join("data");
        config.registry.backends_for_tests().await;
        let running = algolink_server::start(config.clone()).await.expect("server starts");
        let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("client");
        TestServer { url: format!("http://{}", running.addr), client, running: Some(running), config, _dir: dir }
    }

    /// Stops the server gracefully and starts it again on the same registry (a new port).
    pub async fn restart(mut self) -> TestServer {
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(30), r.stop()).await.expect("graceful stop").expect("stop");
        }
        let running = algolink_server::start(self.config.clone()).await.expect("server restarts");
        self.url = format!("http://{}", running.addr);
        self.running = Some(running);
        self
    }

    pub async fn default() -> TestServer {
        TestServer::start("").await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Pushes a file; returns the status and the JSON answer.
    pub async fn push_bytes(&self, name: &str, body: Vec<u8>) -> (u16, Value) {
        let r =
            self.client.post(self.url(&format!("/v1/models/{name}/versions"))).body(body).send().await.expect("push");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn push(&self, name: &str, fixture_file: &str) -> Value {
        let (status, body) = self.push_bytes(name, std::fs::read(fixture(fixture_file)).expect("fixture")).await;
        assert_eq!(status, 201, "push of {fixture_file} failed: {body}");
        body
    }

    /// POSTs a JSON infer request; returns the status and the JSON answer.
    pub async fn infer(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).body(body.to_string()).send().await.expect("infer");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs an infer request with the binary tensor extension: the JSON header, then `raw`.
    pub async fn infer_binary(&self, path: &str, header: &Value, raw: &[u8]) -> reqwest::Response {
        let head = header.to_string();
        self.client
            .post(self.url(path))
            .header("Inference-Header-Content-Length", head.len())
            .header("Content-Type", "application/octet-stream")
            .body([head.as_bytes(), raw].concat())
            .send()
            .await
            .expect("binary infer")
    }

    /// A management API call: JSON in (when given), status and JSON out.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(None, method, path, body.map(|b| b.to_string().into_bytes())).await
    }

    /// A call with a bearer token (when given) and a raw body (when given); status and JSON out.
    pub async fn call_as(&self, token: Option<&str>, method: &str, path: &str, body: Option<Vec<u8>>) -> (u16, Value) {
        self.call_with(token, method, path, body, &[]).await
    }

    /// Like `call_as`, with extra request headers.
    pub async fn call_with(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut r = self.client.request(method, self.url(path));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.header("Content-Type", "application/json").body(b);
        }
        let r = r.send().await.expect("call");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The first owner's token, which a server with auth on writes when its registry has none.
    pub fn owner_token(&self) -> String {
        let path = self.config.owner_token_file();
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string()
    }

    /// Like `call`, asserting a 2xx answer.
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.call(method, path, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {answer}");
        answer
    }

    /// Polls `GET path` until `done` holds (or panics after `within`).
    pub async fn wait_for(&self, path: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let until = std::time::Instant::now() + within;
        loop {
            let (_, v) = self.call("GET", path, None).await;
            if done(&v) {
                return v;
            }
            assert!(std::time::Instant::now() < until, "{path} did not reach the state in {within:?}: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().await.expect("get");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(30), r.stop()).await.expect("graceful stop").expect("stop");
        }
    }
}

/// Asserts `got` matches `want` element-wise: |g - w| <= rtol * |w| + atol.
pub fn assert_close(got: &[f64], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rtol * w.abs() + atol, "{what}[{i}]: got {g}, want {w}");
    }
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

/// Asserts every status is 200, naming how many failed and the first few statuses otherwise.
pub fn assert_none_failed(statuses: impl IntoIterator<Item = u16>) {
    let all: Vec<u16> = statuses.into_iter().collect();
    let failed: Vec<u16> = all.iter().copied().filter(|&s| s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        all.len(),
        &failed[..failed.len().min(10)]
    );
}

/// The Python of the tests' virtual environment (`target/algolink-py`), with `packages`
/// installed from PyPI when `import {modules}` fails there (the test suite installs what it needs,
/// as the README promises; later runs reuse it).
pub fn python_venv(modules: &str, packages: &[&str]) -> PathBuf {
    use std::process::Command;
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("algolink-py");
    let python = venv.join("bin").join("python");
    let ready = |python: &PathBuf| {
        Command::new(python).args(["-c", &format!("import {modules}")]).status().is_ok_and(|s| s.success())
    };
    if !python.exists() {
        let status = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().expect("python3 is needed");
        assert!(status.success(), "creating {}", venv.display());
    }
    if !ready(&python) {
        let status =
            Command::new(&python).args(["-m", "pip", "install", "-q"]).args(packages).status().expect("running pip");
        assert!(status.success(), "installing {packages:?} into {}", venv.display());
        assert!(ready(&python), "import {modules} still fails after installing {packages:?}");
    }
    python
}

/// [`python_venv`] with this checkout's Python client installed in it, as a user would
/// (`pip install ./clients/python`; its dependencies come from `packages`).
pub fn python_venv_with_client(modules: &str, packages: &[&str]) -> PathBuf {
    let python = python_venv(modules, packages);
    let client = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("clients").join("python");
    let installed = std::process::Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall"])
        .arg(&client)
        .status()
        .expect("running pip");
    assert!(installed.success(), "pip install {}", client.display());
    python
}
