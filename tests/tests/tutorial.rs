//! The tutorial (docs/tutorial) as a newcomer runs it, against real servers: the script, then the
//! notebook through `jupyter nbconvert --execute`. Each ends with the better forecaster serving
//! all traffic and a retirement event naming the worse one (the script asserts both, and that the
//! winner has the lower held-out error). Plots and the executed notebook go to
//! target/tutorial-out/.

use std::path::{Path, PathBuf};
use std::process::Command;

use algolink_tests::{TestServer, python_venv_with_client};

const CONFIG: &str = "[server]\nlifecycle_interval_ms = 200\n";

fn run(python: &Path, args: &[&str], url: &str, out: &Path) -> (bool, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = python.parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut command = Command::new(python);
    // A script saves its plots (no display); a notebook shows them inline.
    if args[0].ends_with(".py") {
        command.env("MPLBACKEND", "Agg");
    } else {
        command.env_remove("MPLBACKEND");
    }
    let output = command
        .args(args)
        .current_dir(&root)
        .env("PATH", path)
        .env("ALGOLINK_URL", url)
        .env("TUTORIAL_OUT", out)
        .env_remove("ALGOLINK_TOKEN")
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_runs_as_a_script_and_as_a_notebook() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = tokio::task::spawn_blocking(|| {
        python_venv_with_client(
            "numpy, pandas, matplotlib, sklearn, skl2onnx, onnx, torch, pmdarima, nbconvert, ipykernel",
            &[
                "numpy",
                "pandas",
                "matplotlib",
                "scikit-learn",
                "skl2onnx",
                "onnx",
                "torch",
                "pmdarima",
                "nbconvert",
                "ipykernel",
            ],
        )
    })
    .await
    .unwrap();
    let (fresh, text) = run(&python, &["docs/tutorial/make_notebook.py", "--check"], "", Path::new("."));
    assert!(fresh, "the notebook is not the script's steps: {text}");

    // The artifacts of this run only: a plot left by an earlier run proves nothing.
    let out = root.join("target/tutorial-out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let server = TestServer::start(CONFIG).await;
    let (python2, url, dir) = (python.clone(), server.url.clone(), out.clone());
    let (ok, text) = tokio::task::spawn_blocking(move || run(&python2, &["docs/tutorial/electricity.py"], &url, &dir))
        .await
        .unwrap();
    assert!(ok, "the tutorial script failed:\n{text}");
    println!("{text}");
    for line in [
        "forecast error (held-out MAE) of the gradient boosting",
        "forecast error (held-out MAE) of the neural network",
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }
    let retired = server.ok("GET", "/v1/events?model=demand&kind=retired", None).await;
    assert_eq!(retired.as_array().unwrap().len(), 1, "{retired}");
    assert!(retired[0]["message"].as_str().unwrap().contains("sequential test"), "{retired}");
    for png in ["1-demand.png", "2-live.png"] {
        assert!(out.join(png).metadata().is_ok_and(|m| m.len() > 10_000), "{png} saved");
    }
    server.stop().await;

    // The notebook, executed end to end on a fresh server.
    let server = TestServer::start(CONFIG).await;
    let (url, dir) = (server.url.clone(), out.clone());
    let (ok, text) = tokio::task::spawn_blocking(move || {
        let args = [
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--ExecutePreprocessor.timeout=900",
            "--output-dir",
            dir.to_str().unwrap(),
            "docs/tutorial/electricity.ipynb",
        ];
        run(&python, &args, &url, &dir)
    })
    .await
    .unwrap();
    assert!(ok, "jupyter nbconvert --execute failed:\n{text}");
    let executed = std::fs::read_to_string(out.join("electricity.ipynb")).unwrap();
    assert!(
        executed.contains("winner: version") && executed.contains("image/png"),
        "outputs and plots are in the notebook"
    );
    server.stop().await;
}
