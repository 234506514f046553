//! CRD generation, schema, and client-side evaluation of the CEL rules on good and bad specs.

use kube::CustomResourceExt;
use serde_json::{json, Value};

use crate::crd::{DataPlane, DeepSeekV3Deployment, PlacementStrategy, DEFAULT_IMAGE};
use crate::testutil::{deploy_dir, minimal, sample, sample_value, SAMPLES};

/// The CRD exactly as shipped (descriptions of embedded Kubernetes types trimmed).
fn crd_json() -> Value {
    crate::crd_value().expect("CRD serializes")
}

#[test]
fn trimming_keeps_the_schema_and_only_drops_descriptions() {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("description");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut full = serde_json::to_value(DeepSeekV3Deployment::crd()).expect("CRD serializes");
    let mut trimmed = crd_json();
    let (full_len, trimmed_len) = (full.to_string().len(), trimmed.to_string().len());
    assert!(
        trimmed_len * 3 < full_len * 2,
        "trimmed {trimmed_len} vs full {full_len}"
    );
    assert!(
        trimmed_len < 200_000,
        "the CRD must stay well below the 256 KiB annotation limit"
    );
    strip(&mut full);
    strip(&mut trimmed);
    assert_eq!(full, trimmed);
}

#[test]
fn checked_in_crd_is_in_sync() {
    let generated = crate::crd_yaml().expect("CRD renders");
    let path = deploy_dir().join("crd.yaml");
    if std::env::var_os("DSV3_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write deploy/crd.yaml");
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "deploy/crd.yaml is stale: run `cargo run -p dsv3-operator -- crd > deploy/crd.yaml` \
         (or DSV3_BLESS=1 cargo test -p dsv3-operator)"
    );
}

#[test]
fn crd_has_subresources_columns_and_names() {
    let crd = crd_json();
    assert_eq!(crd["spec"]["group"], "dsv3.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "DeepSeekV3Deployment");
    assert_eq!(crd["spec"]["names"]["plural"], "deepseekv3deployments");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["dsv3"]));
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!(v["subresources"]["status"], json!({}));
    assert_eq!(
        v["subresources"]["scale"]["specReplicasPath"],
        ".spec.attention.replicas"
    );
    assert_eq!(v["subresources"]["scale"]["statusReplicasPath"], ".status.replicas");
    assert_eq!(v["subresources"]["scale"]["labelSelectorPath"], ".status.selector");
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in ["Ready", "Phase", "Attention", "Experts", "Age"] {
        assert!(columns.contains(&want), "missing column {want}: {columns:?}");
    }
}

#[test]
fn schema_is_structural_with_defaults_and_rules() {
    let crd = crd_json();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let spec = &schema["properties"]["spec"];
    assert_eq!(spec["required"], json!(["model"]));
    assert_eq!(spec["properties"]["image"]["default"], DEFAULT_IMAGE);
    assert_eq!(spec["properties"]["dataPlane"]["default"], "grpc");
    assert_eq!(spec["properties"]["dataPlane"]["enum"], json!(["grpc", "nccl"]));
    assert_eq!(
        spec["properties"]["model"]["properties"]["numRoutedExperts"]["default"],
        256
    );
    let rules = spec["x-kubernetes-validations"]
        .as_array()
        .expect("spec-level CEL rules");
    assert!(rules.len() >= 6, "{rules:?}");
    assert!(
        rules.iter().all(|r| r["message"].is_string()),
        "every rule says what is wrong"
    );
    // Flattened pod settings land as plain properties (no allOf/anyOf: a structural schema).
    let attention = &spec["properties"]["attention"]["properties"];
    for k in [
        "replicas",
        "gpusPerPod",
        "resources",
        "nodeSelector",
        "tolerations",
        "affinity",
        "env",
    ] {
        assert!(attention.get(k).is_some(), "attention.{k} missing from the schema");
    }
    let text = serde_json::to_string(schema).expect("schema serializes");
    for forbidden in ["\"allOf\"", "\"$ref\"", "\"definitions\""] {
        assert!(
            !text.contains(forbidden),
            "schema is not structural: contains {forbidden}"
        );
    }
}

#[test]
fn minimal_manifest_gets_defaults_and_is_valid() {
    let cr = minimal();
    assert_eq!(cr.spec.image, DEFAULT_IMAGE);
    assert_eq!(cr.spec.data_plane, DataPlane::Grpc);
    assert_eq!(cr.spec.model.num_routed_experts, 256);
    assert_eq!(cr.spec.model.num_moe_layers, 58);
    assert_eq!(cr.spec.router.replicas, 1);
    assert_eq!(cr.spec.attention.replicas, 1);
    assert_eq!(cr.spec.experts.replicas, 1);
    assert_eq!(cr.spec.experts.placement, PlacementStrategy::RoundRobin);
    assert_eq!(cr.spec.batching.max_num_seqs, 256);
    assert!(!cr.spec.mtp.enabled);
    if let Err(e) = cr.validate_cel() {
        panic!("minimal manifest must pass the CEL rules: {e:?}");
    }
}

#[test]
fn samples_pass_cel_rules() {
    for file in SAMPLES {
        let cr = sample(file);
        if let Err(e) = cr.validate_cel() {
            panic!("{file} fails the CEL rules: {e:?}");
        }
    }
}

/// Every field a sample sets is known to the schema (nothing would be pruned or rejected).
#[test]
fn samples_have_no_unknown_fields() {
    fn leaves(v: &Value, path: String, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| {
                let k = k.replace('~', "~0").replace('/', "~1");
                leaves(v, format!("{path}/{k}"), out)
            }),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, v)| leaves(v, format!("{path}/{i}"), out)),
            other => out.push((path, other.clone())),
        }
    }
    for file in SAMPLES {
        let raw = sample_value(file);
        let cr = sample(file);
        let back = serde_json::to_value(&cr).expect("serializes");
        let mut l = Vec::new();
        leaves(&raw["spec"], String::new(), &mut l);
        assert!(!l.is_empty());
        for (path, value) in l {
            let got = back["spec"].pointer(&path);
            assert_eq!(
                got,
                Some(&value),
                "{file}: spec{path} is unknown or changed by the schema"
            );
        }
    }
}

fn with(patch: Value) -> DeepSeekV3Deployment {
    let mut v = serde_json::to_value(minimal()).expect("serializes");
    json_patch::merge(&mut v, &json!({ "spec": patch }));
    serde_json::from_value(v).expect("patched manifest deserializes")
}

fn rejected(cr: &DeepSeekV3Deployment, needle: &str) {
    match cr.validate_cel() {
        Ok(()) => panic!("expected a rejection mentioning {needle:?}"),
        Err(errors) => {
            let messages: Vec<String> = errors.as_slice().iter().map(|e| e.message.clone()).collect();
            assert!(
                messages.iter().any(|m| m.contains(needle)),
                "rejection should say {needle:?}, got {messages:?}"
            );
        }
    }
}

#[test]
fn cel_rejects_expert_pods_that_cannot_host_the_slots_evenly() {
    rejected(
        &with(json!({"experts": {"replicas": 3}})),
        "evenly host the expert slots",
    );
    rejected(
        &with(json!({"model": {"numRoutedExperts": 16}, "experts": {"replicas": 4, "redundantExperts": 2}})),
        "evenly host the expert slots",
    );
    // 256 + 32 = 288 = 96 x 3: fine.
    assert!(with(json!({"experts": {"replicas": 96, "redundantExperts": 32}}))
        .validate_cel()
        .is_ok());
}

#[test]
fn cel_rejects_redundant_experts_without_expert_pods_to_spread_over() {
    rejected(
        &with(json!({"model": {"numRoutedExperts": 16}, "experts": {"replicas": 1, "redundantExperts": 4}})),
        "at least 2 expert pods",
    );
    rejected(
        &with(json!({"model": {"numRoutedExperts": 4}, "experts": {"replicas": 2, "redundantExperts": 6}})),
        "must not exceed model.numRoutedExperts",
    );
}

#[test]
fn cel_rejects_a_partitioned_rollout_without_a_serving_half() {
    let partitioned = |experts: Value| {
        with(json!({"model": {"numRoutedExperts": 16}, "experts": experts, "rollout": {"strategy": "Partitioned"}}))
    };
    rejected(
        &partitioned(json!({"replicas": 4, "redundantExperts": 4})),
        "Partitioned runs each generation on half its expert pods",
    );
    rejected(
        &partitioned(json!({"replicas": 1, "redundantExperts": 16})),
        "Partitioned runs each generation on half its expert pods",
    );
    assert!(partitioned(json!({"replicas": 4, "redundantExperts": 16}))
        .validate_cel()
        .is_ok());
}

#[test]
fn cel_rejects_gpus_per_pod_out_of_range() {
    rejected(
        &with(json!({"attention": {"gpusPerPod": 9}})),
        "attention.gpusPerPod must be between 0 and 8",
    );
    rejected(
        &with(json!({"experts": {"gpusPerPod": -1}})),
        "experts.gpusPerPod must be between 0 and 8",
    );
    rejected(
        &with(json!({"router": {"gpusPerPod": 16}})),
        "router.gpusPerPod must be between 0 and 8",
    );
    assert!(with(json!({"attention": {"gpusPerPod": 8}})).validate_cel().is_ok());
}

#[test]
fn cel_rejects_masking_unavailable_experts_over_nccl() {
    let gpus = json!({"gpusPerPod": 1});
    rejected(
        &with(json!({"dataPlane": "nccl", "attention": gpus, "experts": {"gpusPerPod": 1, "unavailable": "mask"}})),
        "experts.unavailable mask is not available with dataPlane nccl",
    );
    assert!(with(json!({"experts": {"unavailable": "mask"}})).validate_cel().is_ok());
}

#[test]
fn cel_rejects_nccl_without_one_gpu_per_rank() {
    rejected(
        &with(json!({"dataPlane": "nccl"})),
        "dataPlane nccl needs one GPU per rank",
    );
    rejected(
        &with(json!({"dataPlane": "nccl", "attention": {"gpusPerPod": 1}, "experts": {"gpusPerPod": 2}})),
        "dataPlane nccl needs one GPU per rank",
    );
    rejected(
        &with(json!({"dataPlane": "nccl", "attention": {"gpusPerPod": 8}, "experts": {"gpusPerPod": 1}})),
        "dataPlane nccl needs one GPU per rank",
    );
    assert!(
        with(json!({"dataPlane": "nccl", "attention": {"gpusPerPod": 1}, "experts": {"gpusPerPod": 1}}))
            .validate_cel()
            .is_ok()
    );
}

#[test]
fn cel_rejects_model_source_ambiguity() {
    rejected(
        &with(json!({"model": {"source": {"hostPath": {"path": "/models/v3"}}}})),
        "exactly one of pvc, hostPath, hub",
    );
    let mut none = minimal();
    none.spec.model.source.pvc = None;
    rejected(&none, "exactly one of pvc, hostPath, hub");
    let mut relative = minimal();
    relative.spec.model.source.pvc = None;
    relative.spec.model.source.host_path = Some(crate::crd::HostPathSource {
        path: "models/v3".into(),
    });
    rejected(&relative, "hostPath.path must be absolute");
}

#[test]
fn cel_rejects_bad_autoscaling_mtp_hot_experts_and_long_names() {
    rejected(
        &with(json!({"autoscaling": {"attention": {"minReplicas": 5, "maxReplicas": 2}}})),
        "minReplicas must not exceed maxReplicas",
    );
    rejected(
        &with(json!({"mtp": {"enabled": true, "numSpeculativeTokens": 9}})),
        "numSpeculativeTokens",
    );
    rejected(
        &with(json!({"experts": {"replicas": 2, "redundantExperts": 2, "hotExperts": [300]}})),
        "hotExperts must be expert ids below",
    );
    rejected(
        &with(json!({"experts": {"replicas": 2, "redundantExperts": 2, "hotExperts": [1, 2, 3]}})),
        "lists more experts than",
    );
    let mut long = minimal();
    long.metadata.name = Some("x".repeat(41));
    rejected(&long, "at most 40 characters");
}
