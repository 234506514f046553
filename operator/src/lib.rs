//! dsv3-operator: turns a `DeepSeekV3Deployment` into a fleet of router, attention and expert pods.

pub mod crd;

use kube::CustomResourceExt;
use serde_json::Value;

/// Embedded Kubernetes types whose (long, upstream) field descriptions are dropped from the CRD.
/// Without this the CRD is over 220 KB, close to the 256 KB annotation limit of client-side
/// `kubectl apply`; with it, well under.
const EMBEDDED_K8S_FIELDS: [&str; 4] = ["affinity", "tolerations", "env", "resources"];

fn strip_descriptions(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("description");
            m.values_mut().for_each(strip_descriptions);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_descriptions),
        _ => {}
    }
}

fn trim_embedded(v: &mut Value) {
    let Value::Object(m) = v else { return };
    if let Some(Value::Object(props)) = m.get_mut("properties") {
        for (k, child) in props.iter_mut() {
            if EMBEDDED_K8S_FIELDS.contains(&k.as_str()) {
                let top = child.get("description").cloned();
                strip_descriptions(child);
                if let (Some(top), Value::Object(c)) = (top, child) {
                    c.insert("description".into(), top);
                }
            } else {
                trim_embedded(child);
            }
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = m.get_mut(key) {
            trim_embedded(child);
        }
    }
}

/// The CustomResourceDefinition as JSON, with the embedded Kubernetes types' descriptions trimmed.
pub fn crd_value() -> Result<Value, serde_json::Error> {
    let mut crd = serde_json::to_value(crd::DeepSeekV3Deployment::crd())?;
    if let Some(versions) = crd.pointer_mut("/spec/versions").and_then(Value::as_array_mut) {
        for v in versions {
            if let Some(schema) = v.pointer_mut("/schema/openAPIV3Schema") {
                trim_embedded(schema);
            }
        }
    }
    Ok(crd)
}

#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Yaml(#[from] serde_yaml::Error),
}

/// The CustomResourceDefinition as YAML, exactly as `dsv3-operator crd` prints it.
pub fn crd_yaml() -> Result<String, CrdError> {
    Ok(format!("---\n{}", serde_yaml::to_string(&crd_value()?)?))
}
pub mod controller;
pub mod dry_run;
pub mod leader;
pub mod metrics;
pub mod model_readiness;
pub mod placement;
pub mod planner;

#[cfg(test)]
mod controller_tests;
#[cfg(test)]
mod crd_tests;
#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod planner_tests;
#[cfg(test)]
pub(crate) mod testutil;
