//! The unmodified Python `tritonclient[http]` against a real server, JSON and binary.
//!
//! The client lives in a virtual environment under `target/algolink-py`, created on first run
//! from PyPI (the test installs what it needs, as the README promises).

use std::path::PathBuf;
use std::process::Command;

use algolink_tests::TestServer;

fn python_with_tritonclient() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join("target").join("algolink-py");
    let python = venv.join("bin").join("python");
    let ready = python.exists()
        && Command::new(&python).args(["-c", "import tritonclient.http, numpy"]).status().is_ok_and(|s| s.success());
    if !ready {
        let status = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().expect("python3 is needed");
        assert!(status.success(), "creating {}", venv.display());
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "-q", "tritonclient[http]", "numpy"])
            .status()
            .expect("pip");
        assert!(status.success(), "installing tritonclient[http] into {}", venv.display());
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_gets_correct_outputs() {
    let python = tokio::task::spawn_blocking(python_with_tritonclient).await.unwrap();
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
