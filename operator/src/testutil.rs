//! Helpers shared by the unit tests: the sample manifests under deploy/samples.

use serde_json::Value;

use crate::crd::DeepSeekV3Deployment;

pub const SAMPLES: [&str; 3] = ["tiny-cpu.yaml", "h200-single-node.yaml", "wide-ep-multinode.yaml"];

pub fn deploy_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of a file, as JSON values.
pub fn documents(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value =
                serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
            serde_json::to_value(v).unwrap_or_else(|e| panic!("convert {}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The DeepSeekV3Deployment document of a sample, raw.
pub fn sample_value(file: &str) -> Value {
    documents(&deploy_dir().join("samples").join(file))
        .into_iter()
        .find(|d| d.get("kind").and_then(Value::as_str) == Some("DeepSeekV3Deployment"))
        .unwrap_or_else(|| panic!("{file} has no DeepSeekV3Deployment"))
}

/// A sample as the API server would hand it to the controller (uid and generation set).
pub fn sample(file: &str) -> DeepSeekV3Deployment {
    let mut cr: DeepSeekV3Deployment =
        serde_json::from_value(sample_value(file)).unwrap_or_else(|e| panic!("{file} does not deserialize: {e}"));
    cr.metadata.uid = Some(format!("uid-{file}"));
    cr.metadata.generation = Some(1);
    cr
}

/// A minimal manifest: only the model source.
pub fn minimal() -> DeepSeekV3Deployment {
    let v = serde_json::json!({
        "apiVersion": "dsv3.io/v1alpha1",
        "kind": "DeepSeekV3Deployment",
        "metadata": {"name": "min", "namespace": "default", "uid": "uid-min", "generation": 1},
        "spec": {"model": {"source": {"pvc": {"claimName": "weights"}}}}
    });
    match serde_json::from_value(v) {
        Ok(cr) => cr,
        Err(e) => panic!("minimal manifest does not deserialize: {e}"),
    }
}
