//! The Python client (`clients/python`, installed with pip as a user would) against a real server
//! with auth on: its pytest suite pushes a file, a scikit-learn pipeline and a PyTorch module
//! exported on the fly, predicts into numpy, splits traffic, sends feedback and concludes an
//! experiment.

use std::path::PathBuf;
use std::process::Command;

use algolink_tests::{TestServer, fixture, python_venv_with_client};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_passes_its_tests_against_a_real_server() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let client_dir = root.join("clients").join("python");
    let python = tokio::task::spawn_blocking(|| {
        python_venv_with_client(
            "numpy, sklearn, skl2onnx, onnx, torch, pytest",
            &["numpy", "scikit-learn", "skl2onnx", "onnx", "torch", "pytest"],
        )
    })
    .await
    .unwrap();

    let server = TestServer::start("[auth]\nmode = \"on\"\n").await;
    let owner = server.owner_token();
    let call = |method: &'static str, path: &'static str, body: serde_json::Value| {
        let server = &server;
        let owner = owner.clone();
        async move {
            let (status, answer) =
                server.call_as(Some(&owner), method, path, Some(body.to_string().into_bytes())).await;
            assert!((200..300).contains(&status), "{method} {path}: {status} {answer}");
            answer
        }
    };
    call("POST", "/v1/namespaces", json!({ "name": "lab" })).await;
    call("PUT", "/v1/namespaces/lab/members/ada", json!({ "role": "publisher" })).await;
    let token = call("POST", "/v1/tokens", json!({ "user": "ada" })).await["token"].as_str().unwrap().to_string();

    let url = server.url.clone();
    let fixtures = fixture("");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
            .current_dir(client_dir)
            .env("ALGOLINK_TEST_URL", url)
            .env("ALGOLINK_TEST_TOKEN", token)
            .env("ALGOLINK_FIXTURES", fixtures)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the client's tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("7 passed"), "{stdout}");
    server.stop().await;
}
