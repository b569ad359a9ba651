//! The web console in a real headless Chromium against a real server with auth on: log in, see
//! the pushed model, change its split and watch the traffic follow, push a version from the
//! browser, start and promote a canary, read the event log, and see a viewer's page without the
//! buttons it may not use. Screenshots go to `target/console-screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use algolink_tests::webdriver::{Browser, ensure_chromium};
use algolink_tests::{TestServer, fixture, reference};
use serde_json::{Value, json};

async fn token(server: &TestServer, owner: &str, user: &str) -> String {
    let body = json!({ "user": user, "description": "console test" }).to_string().into_bytes();
    let (status, t) = server.call_as(Some(owner), "POST", "/v1/tokens", Some(body)).await;
    assert_eq!(status, 201, "{t}");
    t["token"].as_str().unwrap().to_string()
}

async fn ok(server: &TestServer, token: &str, method: &str, path: &str, body: Value) -> Value {
    let (status, answer) = server.call_as(Some(token), method, path, Some(body.to_string().into_bytes())).await;
    assert!((200..300).contains(&status), "{method} {path}: {status} {answer}");
    answer
}

async fn login(browser: &Browser, server: &TestServer, token: &str) -> anyhow::Result<()> {
    browser.goto(&server.url("/ui#/login")).await?;
    browser.type_into("#token", token).await?;
    browser.click("#login-submit").await?;
    browser.wait_text("#who", "the user's name", |t| !t.is_empty()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_steers_a_model() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(ensure_chromium).await??;
    let server = TestServer::start("[auth]\nmode = \"on\"\n[server]\nlifecycle_interval_ms = 200\n").await;
    let owner = server.owner_token();
    ok(&server, &owner, "POST", "/v1/namespaces", json!({ "name": "team" })).await;
    for (user, role) in [("ann", "publisher"), ("vic", "viewer")] {
        ok(&server, &owner, "PUT", &format!("/v1/namespaces/team/members/{user}"), json!({ "role": role })).await;
    }
    let ann = token(&server, &owner, "ann").await;
    let vic = token(&server, &owner, "vic").await;
    for file in ["iris_logreg.onnx", "iris_forest.onnx"] {
        let r = server
            .client
            .post(server.url("/v1/models/team/iris/versions"))
            .bearer_auth(&ann)
            .body(std::fs::read(fixture(file))?)
            .send()
            .await?;
        assert_eq!(r.status(), 201);
    }

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    let browser = Browser::start(artifacts.clone()).await?;

    // Not logged in: the console asks for a token; then it lists the model.
    browser.goto(&server.url("/ui")).await?;
    browser.wait_text("main h1", "the login page", |t| t == "Log in").await?;
    login(&browser, &server, &ann).await?;
    assert_eq!(browser.text("#who").await?.unwrap(), "ann (publisher in team)");
    browser.wait_text("#models", "the pushed model", |t| t.contains("team/iris")).await?;
    browser.screenshot("1-models").await?;

    // Change the split to 50/50 between versions 1 and 2, confirming the dialog.
    browser.click("#models a[href='#/model/team/iris']").await?;
    browser.wait_text("#versions", "both versions", |t| t.contains("ann")).await?;
    for (row, version, weight) in [(1, "2", "50"), (2, "1", "50")] {
        let target = format!("#split-form .variant:nth-of-type({row}) .target");
        assert_eq!(browser.eval("return document.querySelector(arguments[0]).value", json!([target])).await?, version);
        browser.type_into(&format!("#split-form .variant:nth-of-type({row}) .weight"), weight).await?;
    }
    browser.click("#apply-split").await?;
    let question = browser.accept_dialog().await?;
    assert!(question.contains("Route the traffic of team/iris as 2: 50, 1: 50?"), "{question}");
    browser.wait_text("#split-now", "the new split", |t| t.matches("50.0%").count() == 2).await?;

    // Traffic takes the split: both versions answer, and the live table shows both at work.
    let request = reference("iris_logreg");
    let body = json!({ "inputs": request["inputs"] }).to_string();
    let mut served = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut rows = [String::new(), String::new()];
    while tokio::time::Instant::now() < deadline {
        for _ in 0..20 {
            let r = server
                .client
                .post(server.url("/v2/models/team/iris/infer"))
                .bearer_auth(&ann)
                .body(body.clone())
                .send()
                .await?;
            assert_eq!(r.status(), 200);
            served.insert(r.headers()["x-algolink-version"].to_str()?.to_string());
        }
        for (i, v) in ["1", "2"].iter().enumerate() {
            rows[i] = browser.text(&format!("#live tr[data-version='{v}'] .rps")).await?.unwrap_or_default();
        }
        if rows.iter().all(|r| r.parse::<f64>().is_ok_and(|x| x > 0.0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(served.into_iter().collect::<Vec<_>>(), ["1", "2"], "the split sends traffic to both versions");
    assert!(rows.iter().all(|r| r.parse::<f64>().is_ok_and(|x| x > 0.0)), "live req/s per version: {rows:?}");
    browser.eval("window.scrollTo(0, 0)", json!([])).await?;
    browser.screenshot("2-split-live").await?;

    // Push a third version from the browser, with the upload's progress shown.
    browser.goto(&server.url("/ui#/push")).await?;
    browser.type_into("#push-name", "team/iris").await?;
    browser.type_into("#push-file[type=file]", fixture("iris_scaled.onnx").to_str().unwrap()).await?;
    browser.click("#push-submit").await?;
    let pushed = browser.wait_text("#push-result", "the pushed version", |t| t.contains("version 3")).await?;
    assert!(pushed.contains("sha256"), "{pushed}");
    assert_eq!(browser.eval("return document.querySelector('#push-progress').value", json!([])).await?, 1);
    browser.screenshot("3-pushed").await?;

    // Start a canary of version 3, then promote it.
    browser.goto(&server.url("/ui#/model/team/iris")).await?;
    browser.wait_text("#rollout-status", "no canary yet", |t| t.contains("No canary")).await?;
    browser.eval("document.querySelector('#canary-version').value = '3'", json!([])).await?;
    browser.click("#start-canary").await?;
    assert!(browser.accept_dialog().await?.contains("canary rollout of v3"));
    browser.wait_text("#rollout-status", "the canary", |t| t.contains("Canary v3")).await?;
    assert!(!browser.exists("#split-form").await?, "the rollout, not a split, steers the traffic");
    browser.screenshot("4-canary").await?;
    browser.click("#promote").await?;
    assert!(browser.accept_dialog().await?.starts_with("Promote canary v3 of team/iris?"));
    browser.wait_text("#versions tr[data-version='3']", "the champion alias", |t| t.contains("champion")).await?;
    let model = ok(&server, &ann, "GET", "/v1/models/team/iris", json!({})).await;
    assert_eq!(model["aliases"]["champion"], 3, "{model}");
    browser.screenshot("5-promoted").await?;

    // The event log, filtered by model, names who did what.
    browser.goto(&server.url("/ui#/events?model=team/iris")).await?;
    let events = browser.wait_text("#event-list", "the promotion", |t| t.contains("promoted")).await?;
    // Columns: when, model, version, kind, what, by; the newest first.
    for kind in ["promoted", "rollout_started", "traffic", "pushed"] {
        let row =
            events.lines().map(|l| l.split('\t').map(str::trim).collect::<Vec<_>>()).find(|c| c.get(3) == Some(&kind));
        let by = row.as_ref().and_then(|c| c.last().copied());
        assert_eq!(by, Some("ann"), "the newest {kind} event names ann: {row:?}\n{events}");
    }
    browser.screenshot("6-events").await?;

    // A viewer sees the model, but none of the buttons that would change it.
    browser.click("#logout").await?;
    browser.wait_text("main h1", "the login page", |t| t == "Log in").await?;
    login(&browser, &server, &vic).await?;
    browser.goto(&server.url("/ui#/model/team/iris")).await?;
    browser.wait_text("#versions", "the versions", |t| t.contains("champion")).await?;
    for hidden in ["#split-form", "#promote", "#canary-form", "button.retire", "#experiment-form"] {
        assert!(!browser.exists(hidden).await?, "a viewer is shown {hidden}");
    }
    assert_eq!(browser.eval("return document.querySelector('#nav-push').hidden", json!([])).await?, true);
    browser.screenshot("7-viewer").await?;

    browser.close().await?;
    server.stop().await;
    println!("screenshots in {}", artifacts.display());
    Ok(())
}
