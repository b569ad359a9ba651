//! The Helm chart (`deploy/helm/algolink`): `deploy/helm/check` lints it and validates every
//! rendered manifest against the Kubernetes API schemas for several sets of values; this test
//! runs it, then checks what the schemas cannot know: probes on the OIP health endpoints, GPUs
//! requested only when asked for, the autoscaler on the queue-depth metric, secrets wired to the
//! environment variables the server reads, and a config file the server itself accepts.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn find<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

#[test]
fn the_chart_renders_valid_manifests_that_fit_the_server() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new(root.join("deploy/helm/check")).arg("--json").arg(out.path()).status().unwrap();
    assert!(status.success(), "deploy/helm/check failed (its output says why)");
    let rendered: Value = serde_json::from_slice(&std::fs::read(out.path()).unwrap()).unwrap();
    let scenarios = rendered.as_object().unwrap();
    assert_eq!(scenarios.len(), 3, "rendered scenarios: {:?}", scenarios.keys());

    for (name, docs) in scenarios {
        let docs = docs.as_array().unwrap();
        let deployment = find(docs, "Deployment").unwrap_or_else(|| panic!("{name}: no Deployment"));
        let pod = &deployment["spec"]["template"];
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/v2/health/ready", "{name}");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/v2/health/live", "{name}");
        assert_eq!(container["args"], serde_json::json!(["serve", "--config", "/etc/algolink/algolink.toml"]));

        // The Service selects the pods and reaches their named port.
        let service = find(docs, "Service").unwrap();
        for (k, v) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&pod["metadata"]["labels"][k], v, "{name}: service selector {k}");
        }
        assert_eq!(service["spec"]["ports"][0]["targetPort"], container["ports"][0]["name"]);

        // GPUs only when enabled, in requests and limits alike, with the CUDA image.
        let gpus = &container["resources"]["limits"]["nvidia.com/gpu"];
        if name == "gpu-autoscaled" {
            assert_eq!(gpus, 2, "{name}");
            assert_eq!(container["resources"]["requests"]["nvidia.com/gpu"], 2, "{name}");
            assert!(container["image"].as_str().unwrap().ends_with("-cuda"), "{name}");
        } else {
            assert!(gpus.is_null(), "{name}: {gpus}");
            assert!(!container["image"].as_str().unwrap().ends_with("-cuda"), "{name}");
        }

        // The autoscaler (when enabled) scales the Deployment on the queue depth we export, and
        // then the Deployment leaves the replica count to it.
        match find(docs, "HorizontalPodAutoscaler") {
            Some(hpa) => {
                assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
                assert_eq!(hpa["spec"]["metrics"][0]["pods"]["metric"]["name"], "algolink_queue_depth");
                assert!(include_str!("../../server/src/metrics.rs").contains("\"algolink_queue_depth\""));
                assert!(deployment["spec"]["replicas"].is_null(), "{name}");
            }
            None => assert_eq!(deployment["spec"]["replicas"], 3, "{name}"),
        }

        // The database URL comes from a Secret the release creates or names.
        let env = container["env"].as_array().unwrap();
        let database = env.iter().find(|e| e["name"] == "ALGOLINK_DATABASE_URL").expect("database env");
        let secret = database["valueFrom"]["secretKeyRef"]["name"].as_str().unwrap();
        match find(docs, "Secret") {
            Some(s) => assert_eq!(s["metadata"]["name"], secret, "{name}"),
            None => assert_eq!(secret, "algolink-db", "{name}: the existing secret"),
        }
        let has_keys = env.iter().any(|e| e["name"] == "AWS_SECRET_ACCESS_KEY");
        assert_eq!(has_keys, name == "gpu-autoscaled", "{name}: storage credentials only when a secret is named");

        // The config file is one the server accepts, with the shared storage it was given.
        let toml = find(docs, "ConfigMap").unwrap()["data"]["algolink.toml"].as_str().unwrap();
        let config = algolink_server::Config::parse(toml).unwrap_or_else(|e| panic!("{name}: {e:#}\n{toml}"));
        assert!(config.registry.storage.as_deref().unwrap().starts_with("s3://models"), "{name}");
        assert_eq!(config.server.http, "0.0.0.0:8000");
        let mounts = container["volumeMounts"].as_array().unwrap();
        assert!(
            mounts.iter().any(|m| m["mountPath"] == config.server.data_dir.to_str().unwrap()),
            "{name}: data_dir mounted"
        );
    }
}
