//! The unmodified Python `tritonclient[http]` against a real server, JSON and binary.
//!
//! The client lives in a virtual environment under `target/algolink-py`, created on first run
//! from PyPI (the test installs what it needs, as the README promises).

use std::path::PathBuf;
use std::process::Command;

use algolink_tests::{TestServer, python_venv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_gets_correct_outputs() {
    let python =
        tokio::task::spawn_blocking(|| python_venv("tritonclient.http, numpy", &["tritonclient[http]", "numpy"]))
            .await
            .unwrap();
    let server = TestServer::default().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python").join("tritonclient_check.py");
    let url = server.url.clone();
    let output =
        tokio::task::spawn_blocking(move || Command::new(python).arg(script).arg(url).output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tritonclient check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("tritonclient: all checks passed"), "{stdout}");
    server.stop().await;
}
