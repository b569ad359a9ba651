//! The README's walk with the real `algolink` binary: serve with a config that preloads models,
//! infer, `algolink push` a new version, `algolink models`, then stop gracefully with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `algolink serve --config` with `extra` appended to a config on a free port; waits for the
/// line that says it listens. Returns the process, its URL and its directory.
async fn serve(extra: &str) -> (std::process::Child, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("algolink.toml");
    std::fs::write(&config, format!("[server]\nhttp = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n{extra}")).unwrap();
    let backends = algolink_registry::testing::scratch_backends().await.unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_algolink"));
    for (variable, value) in
        [("ALGOLINK_DATABASE_URL", &backends.database), ("ALGOLINK_STORAGE_URL", &backends.storage)]
    {
        match value {
            Some(url) => server.env(variable, url),
            None => server.env_remove(variable),
        };
    }
    let mut server =
        server.args(["serve", "--config"]).arg(&config).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut first_line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
    assert!(first_line.contains(&format!("127.0.0.1:{port}")), "{first_line}");
    let metadata = if backends.database.is_some() { "data/blobs" } else { "data/registry.db" };
    assert!(dir.path().join(metadata).exists(), "data_dir is relative to the config file");
    (server, format!("http://127.0.0.1:{port}"), dir)
}

/// Runs `algolink ARGS --server URL`: success, stdout, stderr.
fn cli(url: &str, args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_algolink"));
    command.args(args).args(["--server", url]).env_remove("ALGOLINK_TOKEN");
    if let Some(t) = token {
        command.env("ALGOLINK_TOKEN", t);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn serve_push_models_and_stop() {
    let preload =
        format!("[[preload]]\nname = \"iris\"\npath = \"{}\"\n", fixtures().join("iris_logreg.onnx").display());
    let (mut server, url, _dir) = serve(&preload).await;
    let client = reqwest::Client::new();
    let body =
        r#"{"inputs":[{"name":"input","shape":[2,4],"datatype":"FP32","data":[[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]}]}"#;
    let answer: serde_json::Value =
        client.post(format!("{url}/v2/models/iris/infer")).body(body).send().await.unwrap().json().await.unwrap();
    assert_eq!(answer["outputs"][0]["data"], serde_json::json!([0, 2]), "{answer}");

    let push = Command::new(env!("CARGO_BIN_EXE_algolink"))
        .args(["push", "--name", "iris", "--server", &url])
        .arg(fixtures().join("iris_forest.onnx"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&push.stdout);
    assert!(push.status.success(), "{out}{}", String::from_utf8_lossy(&push.stderr));
    assert!(out.contains("iris version 2 (ready)"), "{out}");

    let models = Command::new(env!("CARGO_BIN_EXE_algolink")).args(["models", "--server", &url]).output().unwrap();
    let table = String::from_utf8_lossy(&models.stdout);
    assert!(models.status.success());
    let serving: Vec<&str> = table.lines().filter(|l| l.contains(" * ")).collect();
    assert_eq!(serving.len(), 1, "{table}");
    assert!(serving[0].starts_with("iris") && serving[0].contains(" 2 "), "{table}");
    assert!(table.lines().all(|l| l.len() <= 80), "fits 80 columns:\n{table}");

    let refused = Command::new(env!("CARGO_BIN_EXE_algolink"))
        .args(["push", "--name", "iris", "--server", &url])
        .arg(fixtures().join("iris_logreg.json"))
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a JSON file is not a model");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("push refused (400 Bad Request)"));

    // The lifecycle commands, against the same server.
    let cli = |args: &[&str]| cli(&url, args, None);
    let (ok, out, err) = cli(&["alias", "set", "iris", "champion", "1"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli(&["route", "set", "iris", "champion=60"]);
    assert!(!ok && err.contains("sum to 100"), "{err}");
    let (ok, out, err) = cli(&["route", "set", "iris", "champion=80", "2=20"]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = cli(&["route", "show", "iris"]);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok);
    assert_eq!(shown["traffic"]["variants"][0]["percent"], 80.0, "{out}");

    // `algolink status` while traffic flows: the split, the rate, the health, in 80 columns.
    let status = tokio::task::spawn_blocking({
        let url = url.clone();
        move || crate::cli(&url, &["status", "--interval", "1"], None)
    });
    let mut sent = 0;
    while !status.is_finished() {
        let r = client.post(format!("{url}/v2/models/iris/infer")).body(body).send().await.unwrap();
        assert!(r.status().is_success());
        sent += 1;
    }
    let (ok, out, err) = status.await.unwrap();
    assert!(ok && sent > 0, "{out}{err}");
    assert!(out.lines().next().unwrap().contains(" · ready · 1 model · auth off"), "{out}");
    assert!(out.lines().all(|l| l.chars().count() <= 80), "fits 80 columns:\n{out}");
    let row: Vec<&str> = out.lines().find(|l| l.starts_with("iris ")).unwrap().split_whitespace().collect();
    assert_eq!(row[3..7], ["v1", "80%", "v2", "20%"], "{out}");
    assert!(row[7].parse::<f64>().unwrap() > 0.0, "requests per second while traffic flows:\n{out}");
    assert!(out.contains("RECENT EVENTS") && out.contains("route set"), "{out}");
    let (ok, out, err) = cli(&["experiment", "start", "iris", "--goal", "conversion", "--max-samples", "8000"]);
    assert!(ok, "{out}{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_u64().unwrap();
    let (ok, out, _) = cli(&["experiment", "show", &id.to_string()]);
    assert!(ok && out.contains("\"verdict\""), "{out}");
    let (ok, out, err) = cli(&["experiment", "conclude", &id.to_string()]);
    assert!(!ok && err.contains("no variant"), "nothing is better yet: {out}{err}");
    let (ok, _, _) = cli(&["experiment", "stop", &id.to_string()]);
    assert!(ok);
    let (ok, out, _) = cli(&["rollout", "show", "iris"]);
    assert!(ok && out.contains("\"rollout\": null"), "{out}");
    let (ok, out, _) = cli(&["events", "--model", "iris"]);
    assert!(ok);
    for kind in ["pushed", "alias", "traffic", "experiment"] {
        assert!(out.lines().any(|l| l.contains(kind)), "events lack {kind}:\n{out}");
    }
    let (ok, _, _) = cli(&["route", "clear", "iris"]);
    assert!(ok);

    // SIGTERM: in-flight requests finish, then the process exits cleanly.
    let status = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_auth_on_the_owner_makes_a_team_and_its_publisher_pushes() {
    let (mut server, url, dir) = serve("[auth]\nmode = \"on\"\n").await;
    let owner = std::fs::read_to_string(dir.path().join("data/owner-token")).unwrap().trim().to_string();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("data/owner-token")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the server's user reads the owner's token");
    }
    let (ok, _, err) = cli(&url, &["models"], None);
    assert!(!ok && err.contains("401") && err.contains("Authorization: Bearer"), "{err}");

    let (ok, out, err) = cli(&url, &["namespace", "create", "team"], Some(&owner));
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&url, &["member", "set", "team", "ann", "publisher"], Some(&owner));
    assert!(ok, "{out}{err}");
    let (ok, token, err) = cli(&url, &["token", "create", "--user", "ann", "--expires", "1d"], Some(&owner));
    assert!(ok && err.contains("shown once"), "{token}{err}");
    let ann = token.trim();
    assert!(ann.starts_with("alk_") && !token.contains(' '), "stdout holds the token alone: {token:?}");

    let iris = fixtures().join("iris_logreg.onnx");
    let (ok, out, err) = cli(&url, &["push", "--name", "team/iris", iris.to_str().unwrap()], Some(ann));
    assert!(ok && out.contains("team/iris version 1 (ready)"), "{out}{err}");
    let (ok, _, err) = cli(&url, &["push", "--name", "default-team-less", iris.to_str().unwrap()], Some(ann));
    assert!(!ok && err.contains("403") && err.contains("publisher"), "ann is no publisher in `default`: {err}");
    let (ok, out, _) = cli(&url, &["models"], Some(ann));
    assert!(ok && out.lines().any(|l| l.starts_with("team/iris")), "{out}");
    let (ok, out, _) = cli(&url, &["whoami"], Some(ann));
    assert!(ok && out.contains("\"publisher\""), "{out}");
    let (ok, out, err) = cli(&url, &["token", "create", "--expires", "soon"], Some(ann));
    assert!(!ok && err.contains("expected a duration"), "{out}{err}");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn serve_refuses_zero_http_threads() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_algolink")).arg("serve").args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, err) = run(&["--http-threads", "0", "--data", dir.path().to_str().unwrap()]);
    assert!(!ok && err.contains("--http-threads must be at least 1"), "{err}");
    let config = dir.path().join("zero.toml");
    std::fs::write(&config, "[server]\nhttp_threads = 0\n").unwrap();
    let (ok, err) = run(&["--config", config.to_str().unwrap()]);
    assert!(!ok && err.contains("http_threads must be at least 1"), "{err}");
}
