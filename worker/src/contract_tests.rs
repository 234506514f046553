//! The operator → pod boundary: every `dsv3-worker` container the operator plans for the sample
//! fleets in `deploy/samples/` runs with arguments this binary's CLI accepts, and the options
//! checked before loading (the data plane) pass.

use super::{Cli, Command};
use clap::Parser;
use dsv3_operator::crd::DeepSeekV3Deployment;
use dsv3_operator::planner::{plan, PlanInput};
use serde_json::Value;

/// Kubernetes expands `$(VAR)` in container args from the container's env; the pod index is the
/// only one the operator uses, and any rank number stands for it.
fn expand(arg: &str) -> String {
    arg.replace("$(DSV3_RANK)", "1")
}

/// (container name, its args after `dsv3-worker`) for every container running the worker.
fn worker_containers(object: &Value) -> Vec<(String, Vec<String>)> {
    let spec = &object["spec"]["template"]["spec"];
    let mut out = Vec::new();
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            if c["command"] != serde_json::json!(["dsv3-worker"]) {
                continue;
            }
            let args = c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(expand)
                .collect();
            out.push((c["name"].as_str().unwrap_or_default().to_string(), args));
        }
    }
    out
}

#[test]
fn planned_worker_containers_are_accepted_by_the_worker_cli() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/samples");
    let mut checked = 0;
    let mut roles = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("samples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read sample");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            if value["kind"].as_str() != Some("DeepSeekV3Deployment") {
                continue;
            }
            let mut cr: DeepSeekV3Deployment = serde_yaml::from_value(value).expect("sample CR");
            // As the API server hands it to the controller.
            cr.metadata.uid = Some("uid".into());
            cr.metadata.generation = Some(1);
            let planned = plan(&cr, &PlanInput::default()).expect("plan");
            for object in planned.objects().expect("objects") {
                for (container, args) in worker_containers(&object.value) {
                    let what = format!(
                        "{}: {} {} container `{container}`",
                        path.display(),
                        object.kind,
                        object.name
                    );
                    if args.first().map(String::as_str) == Some("download") {
                        // The hub download init container waits for `dsv3-worker download`
                        // (not in this binary yet); the samples here mount a volume instead.
                        panic!("{what}: plans `dsv3-worker download`, which this binary lacks");
                    }
                    let cli = Cli::try_parse_from(std::iter::once("dsv3-worker".to_string()).chain(args.clone()))
                        .unwrap_or_else(|e| panic!("{what}: the worker rejects {args:?}:\n{e}"));
                    let checked_options = match &cli.command {
                        Command::Router(a) => a.check(),
                        Command::Attention(a) => a.check(),
                        Command::Expert(a) => a.check(),
                        _ => panic!("{what}: plans `{}`, not a fleet role", args[0]),
                    };
                    checked_options.unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    roles.insert(args[0].clone());
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(
        roles.into_iter().collect::<Vec<_>>(),
        ["attention", "expert", "router"],
        "every role is planned by some sample"
    );
    assert!(checked >= 9, "only {checked} containers checked");
}
