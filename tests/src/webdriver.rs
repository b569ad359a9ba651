//! A headless Chromium driven over the W3C WebDriver protocol (Debian's `chromium` and
//! `chromium-driver`, installed on first use when missing).
//!
//! The protocol is a handful of JSON calls over HTTP, so this speaks it with the reqwest client
//! the tests already use, rather than a WebDriver crate that would bring a TLS stack for a
//! connection to localhost.

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Installs Debian's Chromium and ChromeDriver when they are missing (as the README promises:
/// the test suite fetches what it needs from the package registries).
pub fn ensure_chromium() -> Result<()> {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return Ok(());
    }
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    let apt = |args: &[&str]| -> Result<bool> {
        let mut cmd = if root { Command::new("apt-get") } else { Command::new("sudo") };
        if !root {
            cmd.args(["-n", "apt-get"]);
        }
        Ok(cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive").status().context("running apt-get")?.success())
    };
    let install = ["install", "-y", "-q", "chromium", "chromium-driver"];
    let installed = apt(&install)? || (apt(&["update", "-q"])? && apt(&install)?);
    if !installed {
        bail!("could not install chromium and chromium-driver with apt-get (root or passwordless sudo needed)");
    }
    Ok(())
}

/// Runs `attempt` every `every` until it succeeds or `limit` has passed (then its last error).
async fn retry<T, F, Fut>(limit: Duration, every: Duration, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// A browser session; the browser and its driver end when it is dropped.
pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
    /// Where [`Browser::screenshot`] writes.
    pub artifacts: PathBuf,
}

impl Browser {
    /// Starts ChromeDriver on a free port and opens a headless Chromium window of 1280×1000.
    pub async fn start(artifacts: PathBuf) -> Result<Browser> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // A process group of its own: the browsers it starts end with it (see `Drop`).
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting chromedriver")?;
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let status = format!("{base}/status");
        let (h, status) = (&http, status.as_str());
        retry(Duration::from_secs(30), Duration::from_millis(100), || async move {
            let v: Value = h.get(status).send().await?.json().await?;
            if v["value"]["ready"] != true {
                bail!("chromedriver did not become ready on port {port}: {v}");
            }
            Ok(())
        })
        .await?;
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", "--no-first-run"],
            },
        }}});
        let created: Value = http.post(format!("{base}/session")).json(&capabilities).send().await?.json().await?;
        let session = created["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no WebDriver session: {created}"))?
            .to_string();
        std::fs::create_dir_all(&artifacts)?;
        Ok(Browser { http, session: format!("{base}/session/{session}"), driver, artifacts })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let answer: Value = req.send().await?.json().await?;
        if let Some(error) = answer["value"]["error"].as_str() {
            bail!("WebDriver {method} {path}: {error}: {}", answer["value"]["message"]);
        }
        Ok(answer["value"].clone())
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await.map(drop)
    }

    /// Runs a script in the page and returns what it returns.
    pub async fn eval(&self, script: &str, args: Value) -> Result<Value> {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": args }))).await
    }

    /// The visible text of the first element matching `css`, if there is one.
    pub async fn text(&self, css: &str) -> Result<Option<String>> {
        let v = self
            .eval("const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", json!([css]))
            .await?;
        Ok(v.as_str().map(String::from))
    }

    /// Waits (up to 20 s) until `css` matches an element whose text satisfies `want`.
    pub async fn wait_text(&self, css: &str, what: &str, want: impl Fn(&str) -> bool) -> Result<String> {
        let want = &want;
        retry(Duration::from_secs(20), Duration::from_millis(150), || async move {
            match self.text(css).await? {
                Some(t) if want(&t) => Ok(t),
                text => bail!("waited 20 s for {css} to show {what}; it shows {text:?}"),
            }
        })
        .await
    }

    async fn element(&self, css: &str) -> Result<String> {
        let query = json!({ "using": "css selector", "value": css });
        let found = retry(Duration::from_secs(20), Duration::from_millis(150), || {
            self.call(reqwest::Method::POST, "/element", Some(query.clone()))
        })
        .await
        .with_context(|| format!("finding {css}"))?;
        // The reference is the only value of the object, whatever its key.
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| anyhow!("no element reference for {css}: {found}"))
    }

    pub async fn exists(&self, css: &str) -> Result<bool> {
        Ok(self.eval("return document.querySelector(arguments[0]) !== null;", json!([css])).await? == true)
    }

    pub async fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await.map(drop)
    }

    /// Clears a field and types into it (for a file input: the path of the file to upload).
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let id = self.element(css).await?;
        if !css.contains("type=file") {
            self.call(reqwest::Method::POST, &format!("/element/{id}/clear"), Some(json!({}))).await?;
        }
        self.call(reqwest::Method::POST, &format!("/element/{id}/value"), Some(json!({ "text": text }))).await.map(drop)
    }

    /// Accepts the confirmation dialog that is open (waiting for it), returning its question.
    pub async fn accept_dialog(&self) -> Result<String> {
        let question = retry(Duration::from_secs(10), Duration::from_millis(100), || {
            self.call(reqwest::Method::GET, "/alert/text", None)
        })
        .await
        .context("no dialog opened")?;
        let question = question.as_str().unwrap_or_default().to_string();
        self.call(reqwest::Method::POST, "/alert/accept", Some(json!({}))).await?;
        Ok(question)
    }

    /// Saves a PNG of the window as `<artifacts>/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let data = self.call(reqwest::Method::GET, "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap_or_default())?;
        let path = self.artifacts.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }

    pub async fn close(self) -> Result<()> {
        let _ = self.http.delete(&self.session).send().await;
        Ok(()) // `Drop` ends the processes
    }
}

impl Drop for Browser {
    /// Ends ChromeDriver and the browsers it started (its process group), also when a test
    /// fails half-way.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.driver.id())]).status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
