//! `dsv3-operator plan`: every object the operator would apply for the `DeepSeekV3Deployment`s
//! of a YAML file, as a YAML stream — a dry run, as `helm template` is for a chart.

use crate::crd::DeepSeekV3Deployment;
use crate::planner::{plan, PlanInput};

/// The planned objects of every `DeepSeekV3Deployment` document in `text` (other kinds are
/// skipped), each a YAML document. A CR without a namespace is planned in `default`, as `kubectl
/// apply` would place it; the owner references carry a placeholder uid.
pub fn plan_yaml(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut found = 0;
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: serde_yaml::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| format!("document {}: not YAML: {e}", i + 1))?;
        if value.is_null() || value["kind"].as_str() != Some("DeepSeekV3Deployment") {
            continue;
        }
        let mut cr: DeepSeekV3Deployment = serde_yaml::from_value(value)
            .map_err(|e| format!("document {}: not a valid DeepSeekV3Deployment: {e}", i + 1))?;
        let name = cr.metadata.name.clone().unwrap_or_default();
        cr.metadata.namespace.get_or_insert_with(|| "default".into());
        cr.metadata.uid.get_or_insert_with(|| "dry-run".into());
        cr.metadata.generation.get_or_insert(1);
        let planned = plan(&cr, &PlanInput::model_downloaded(&cr)).map_err(|e| format!("{name}: {e}"))?;
        let objects = planned.objects().map_err(|e| format!("{name}: {e}"))?;
        for object in objects {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&object.value).map_err(|e| format!("{name}: {e}"))?);
        }
        found += 1;
    }
    if found == 0 {
        return Err("no DeepSeekV3Deployment in the input".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_plans_into_named_objects_of_known_kinds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/samples");
        for entry in std::fs::read_dir(&dir).expect("samples") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            if !text.contains("kind: DeepSeekV3Deployment") {
                continue;
            }
            let yaml = plan_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut kinds = Vec::new();
            for doc in serde_yaml::Deserializer::from_str(&yaml) {
                let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("the output is YAML");
                assert!(v["apiVersion"].as_str().is_some(), "{}: {v:?}", path.display());
                assert!(v["metadata"]["name"].as_str().is_some_and(|n| !n.is_empty()));
                kinds.push(v["kind"].as_str().expect("kind").to_string());
            }
            for want in ["StatefulSet", "Service", "ConfigMap"] {
                assert!(
                    kinds.iter().any(|k| k == want),
                    "{}: no {want} in {kinds:?}",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn input_without_a_deployment_or_with_a_bad_one_is_an_error() {
        assert!(plan_yaml("kind: ConfigMap\nmetadata: {name: x}\n")
            .unwrap_err()
            .contains("no DeepSeekV3Deployment"));
        let bad =
            "apiVersion: dsv3.io/v1alpha1\nkind: DeepSeekV3Deployment\nmetadata: {name: x}\nspec: {attention: {replicas: many}}\n";
        let err = plan_yaml(bad).unwrap_err();
        assert!(err.contains("document 1"), "{err}");
    }
}
