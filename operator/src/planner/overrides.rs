//! `<role>.podOverrides`: a strategic-merge patch on a role's planned pod template, for what the
//! CRD does not model (a sidecar, a volume, a pod-spec field). As the API server merges: objects
//! merge field by field, `null` removes a field, lists of containers, volumes, env, ports and
//! volume mounts merge item by item on their key (an item with `"$patch": "delete"` removes the
//! one it names), and every other list is replaced whole.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::{Map, Value};

/// The key items of a list field merge on (the API server's patchMergeKey).
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env" | "imagePullSecrets" => {
            Some("name")
        }
        "volumeMounts" | "volumeDevices" => Some("mountPath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

/// Applies `patch` to `template`; the result must still be a pod template.
pub fn apply(template: &mut PodTemplateSpec, patch: &Value) -> Result<(), String> {
    let Value::Object(patch) = patch else {
        return Err("must be an object (a pod template: metadata, spec)".into());
    };
    if let Some(unknown) = patch.keys().find(|k| *k != "metadata" && *k != "spec") {
        return Err(format!("`{unknown}` is not a field of a pod template (metadata, spec)"));
    }
    let mut value = serde_json::to_value(&*template).map_err(|e| e.to_string())?;
    merge_object(&mut value, patch)?;
    *template = serde_json::from_value(value).map_err(|e| format!("the patched pod template is not valid: {e}"))?;
    Ok(())
}

fn merge_object(target: &mut Value, patch: &Map<String, Value>) -> Result<(), String> {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(map) = target.as_object_mut() else {
        return Ok(());
    };
    for (field, change) in patch {
        match change {
            Value::Null => {
                map.remove(field);
            }
            Value::Object(inner) => merge_object(map.entry(field.clone()).or_insert(Value::Null), inner)?,
            Value::Array(items) => match merge_key(field) {
                Some(key) => merge_list(
                    map.entry(field.clone()).or_insert(Value::Array(Vec::new())),
                    items,
                    key,
                    field,
                )?,
                None => {
                    map.insert(field.clone(), change.clone());
                }
            },
            scalar => {
                map.insert(field.clone(), scalar.clone());
            }
        }
    }
    Ok(())
}

fn merge_list(target: &mut Value, items: &[Value], key: &str, field: &str) -> Result<(), String> {
    if !target.is_array() {
        *target = Value::Array(Vec::new());
    }
    let Some(list) = target.as_array_mut() else {
        return Ok(());
    };
    for item in items {
        let Some(Value::Object(fields)) = Some(item) else {
            return Err(format!("`{field}` items must be objects"));
        };
        let id = fields
            .get(key)
            .ok_or_else(|| format!("every `{field}` item needs its `{key}`"))?;
        let delete = match fields.get("$patch") {
            None => false,
            Some(v) if v == "delete" => true,
            Some(other) => return Err(format!("`{field}`: `$patch: {other}` is not supported (only delete)")),
        };
        let position = list.iter().position(|existing| existing.get(key) == Some(id));
        match (position, delete) {
            (Some(i), true) => {
                list.remove(i);
            }
            (None, true) => return Err(format!("`{field}`: no item with {key} {id} to delete")),
            (Some(i), false) => merge_object(&mut list[i], fields)?,
            (None, false) => list.push(item.clone()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template() -> PodTemplateSpec {
        serde_json::from_value(json!({
            "metadata": {"labels": {"app": "x"}},
            "spec": {
                "containers": [{"name": "expert", "image": "w:1", "args": ["expert"],
                                "env": [{"name": "A", "value": "1"}],
                                "volumeMounts": [{"name": "model", "mountPath": "/model"}]}],
                "volumes": [{"name": "model", "emptyDir": {}}],
                "tolerations": [{"key": "gpu", "operator": "Exists"}]
            }
        }))
        .expect("template")
    }

    #[test]
    fn keyed_lists_merge_item_by_item_and_other_lists_are_replaced() {
        let mut t = template();
        apply(
            &mut t,
            &json!({
                "metadata": {"annotations": {"a": "b"}},
                "spec": {
                    "containers": [
                        {"name": "expert", "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "3"}]},
                        {"name": "sidecar", "image": "s:1"}
                    ],
                    "volumes": [{"name": "model", "$patch": "delete"}, {"name": "scratch", "emptyDir": {}}],
                    "tolerations": [{"key": "other", "operator": "Exists"}],
                    "hostIPC": true
                }
            }),
        )
        .expect("patched");
        let v = serde_json::to_value(&t).expect("json");
        let containers = v["spec"]["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 2);
        assert_eq!(containers[0]["args"], json!(["expert"]), "untouched fields stay");
        assert_eq!(
            containers[0]["env"],
            json!([{"name": "A", "value": "3"}, {"name": "B", "value": "2"}])
        );
        assert_eq!(v["spec"]["volumes"], json!([{"name": "scratch", "emptyDir": {}}]));
        assert_eq!(
            v["spec"]["tolerations"],
            json!([{"key": "other", "operator": "Exists"}])
        );
        assert_eq!(v["spec"]["hostIPC"], true);
        assert_eq!(v["metadata"]["labels"]["app"], "x");
        assert_eq!(v["metadata"]["annotations"]["a"], "b");
    }

    #[test]
    fn null_removes_a_field_and_bad_patches_are_named() {
        let mut t = template();
        apply(&mut t, &json!({"spec": {"tolerations": null}})).expect("patched");
        assert!(t.spec.as_ref().is_some_and(|s| s.tolerations.is_none()));
        let err = |p: Value| apply(&mut template(), &p).unwrap_err();
        assert!(err(json!({"replicas": 3})).contains("`replicas`"));
        assert!(err(json!({"spec": {"containers": [{"image": "x"}]}})).contains("needs its `name`"));
        assert!(err(json!({"spec": {"volumes": [{"name": "nope", "$patch": "delete"}]}})).contains("nope"));
        assert!(err(json!({"spec": {"containers": "x"}})).contains("not valid"));
        assert!(err(json!([1])).contains("must be an object"));
        assert!(err(json!({"spec": {"volumes": [{"name": "model", "$patch": "replace"}]}})).contains("only delete"));
    }
}
