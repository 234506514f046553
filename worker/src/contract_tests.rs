//! The operator → pod boundary: every `dsv3-worker` container the operator plans for the sample
//! fleets in `deploy/samples/` (each also from a hub repository — the download Job —, with
//! the attention ranks' options off their defaults, GPU fleets also over the NCCL data plane,
//! and as a new generation in the green slot)
//! runs
//! with arguments this binary's CLI accepts, every `DSV3_*`/`HF_*`
//! variable in its environment is read by an argument of its role (with a value that argument
//! accepts), and the options checked before loading (the data plane) pass.

use super::{Cli, Command};
use clap::{CommandFactory, Parser};
use dsv3_operator::crd::{
    DataPlane, DeepSeekV3Deployment, HubSource, ModelSource, SecretKeyRef, Slot, UnavailableExperts,
};
use dsv3_operator::planner::{plan, PlanInput};
use serde_json::Value;

/// Kubernetes expands `$(VAR)` in container args from the container's env; the pod index is the
/// only one the operator uses, and any rank number stands for it.
fn expand(arg: &str) -> String {
    arg.replace("$(DSV3_RANK)", "1")
}

/// A container running the worker: its name, its args after `dsv3-worker`, and its `DSV3_*`
/// environment (name, value; a value from a secret or a field reads as `from-elsewhere`).
struct WorkerContainer {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The long flag of `role`'s argument whose clap `env` fallback is `name`.
fn flag_reading(role: &str, name: &str) -> Option<String> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(role)?;
    let arg = sub
        .get_arguments()
        .find(|a| a.get_env() == Some(std::ffi::OsStr::new(name)))?;
    arg.get_long().map(|l| format!("--{l}"))
}

/// A JSON array of strings (a container's args or command).
fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect()
}

fn worker_containers(object: &Value) -> Vec<WorkerContainer> {
    let spec = &object["spec"]["template"]["spec"];
    let mut out = Vec::new();
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            if c["command"] != serde_json::json!(["dsv3-worker"]) {
                continue;
            }
            let args = strings(&c["args"]);
            let env = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let name = e["name"].as_str()?;
                    let value = e["value"].as_str().unwrap_or("from-elsewhere");
                    let ours = name.starts_with("DSV3_") || name.starts_with("HF_");
                    ours.then(|| (name.to_string(), value.to_string()))
                })
                .collect();
            out.push(WorkerContainer {
                name: c["name"].as_str().unwrap_or_default().to_string(),
                args,
                env,
            });
        }
    }
    out
}

fn repo_path(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Every object the operator plans for each sample fleet in `deploy/samples/`, with the sample.
fn sample_plans() -> Vec<(std::path::PathBuf, dsv3_operator::planner::PlannedObject)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_path("deploy/samples")).expect("samples") {
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
            // Each fleet also as it runs from a hub repository (download Job, router view).
            let mut from_hub = cr.clone();
            from_hub.spec.model.source = ModelSource {
                hub: Some(HubSource {
                    repo: "deepseek-ai/DeepSeek-V3-0324".into(),
                    revision: "main".into(),
                    token_secret: Some(SecretKeyRef {
                        name: "hf".into(),
                        key: "token".into(),
                    }),
                    cache_claim_name: "hub-cache".into(),
                }),
                ..Default::default()
            };
            // And with every option the attention ranks take from the CR off its default.
            let mut options = cr.clone();
            options.spec.experts.unavailable = UnavailableExperts::Mask;
            // And GPU fleets over the NCCL data plane (one GPU per rank, as admission demands).
            let over_nccl = (cr.spec.attention.gpus_per_pod == 1 && cr.spec.experts.gpus_per_pod == 1).then(|| {
                let mut nccl = cr.clone();
                nccl.spec.data_plane = DataPlane::Nccl;
                nccl
            });
            for cr in [cr, from_hub, options].into_iter().chain(over_nccl) {
                let running = PlanInput::model_downloaded(&cr);
                let planned = plan(&cr, &running).expect("plan");
                // And a new generation starting in the green slot beside it, the routers still
                // on the serving one.
                let beside = PlanInput {
                    slot: Slot::Green,
                    serving: Some(planned.generation.clone()),
                    ..running.clone()
                };
                let green = plan(&cr, &beside).expect("plan");
                out.extend(
                    [planned, green]
                        .iter()
                        .flat_map(|p| p.objects().expect("objects"))
                        .map(|o| (path.clone(), o)),
                );
            }
        }
    }
    out
}

#[test]
fn planned_worker_containers_are_accepted_by_the_worker_cli() {
    let mut checked = 0;
    let mut roles = std::collections::BTreeSet::new();
    for (path, object) in sample_plans() {
        for WorkerContainer {
            name: container,
            args,
            env,
        } in worker_containers(&object.value)
        {
            let what = format!(
                "{}: {} {} container `{container}`",
                path.display(),
                object.kind,
                object.name
            );
            // Each DSV3_* variable as the flag that reads it: a variable no argument of
            // the role reads would be a setting that silently does nothing.
            let role = args.first().cloned().unwrap_or_default();
            let expands_rank = args.iter().any(|a| a.contains("$(DSV3_RANK)"));
            let mut args: Vec<String> = args.iter().map(|a| expand(a)).collect();
            for (name, value) in &env {
                if name == "DSV3_RANK" {
                    assert!(expands_rank, "{what}: sets DSV3_RANK but no argument expands it");
                    continue;
                }
                let flag = flag_reading(&role, name)
                    .unwrap_or_else(|| panic!("{what}: sets {name}, which `dsv3-worker {role}` does not read"));
                args.extend([flag, value.clone()]);
            }
            let cli = Cli::try_parse_from(std::iter::once("dsv3-worker".to_string()).chain(args.clone()))
                .unwrap_or_else(|e| panic!("{what}: the worker rejects {args:?}:\n{e}"));
            let checked_options = match &cli.command {
                Command::Router(a) => a.check(),
                Command::Attention(a) => a.check(),
                Command::Expert(a) => a.check(),
                Command::Download(_) => Ok(()),
                _ => panic!("{what}: plans `{}`, not a fleet role", args[0]),
            };
            checked_options.unwrap_or_else(|e| panic!("{what}: {e:#}"));
            roles.insert(args[0].clone());
            checked += 1;
        }
    }
    assert_eq!(
        roles.into_iter().collect::<Vec<_>>(),
        ["attention", "download", "expert", "router"],
        "every role is planned by some sample"
    );
    assert!(checked >= 9, "only {checked} containers checked");
}

/// Every exec probe the operator plans (the ranks' health check under mutual TLS) is a
/// `dsv3-worker probe` the CLI accepts, aimed at the container's own gRPC port, reading the TLS
/// files the container's own arguments read.
#[test]
fn planned_exec_probes_are_accepted_by_the_worker_cli() {
    let mut checked = 0;
    for (path, object) in sample_plans() {
        let spec = &object.value["spec"]["template"]["spec"];
        for c in spec["containers"].as_array().into_iter().flatten() {
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let command = strings(&c[probe]["exec"]["command"]);
                if command.is_empty() {
                    continue;
                }
                let what = format!("{}: {} {} {probe}", path.display(), object.kind, object.name);
                assert_eq!(command.first().map(String::as_str), Some("dsv3-worker"), "{what}");
                let cli = Cli::try_parse_from(&command)
                    .unwrap_or_else(|e| panic!("{what}: the worker rejects {command:?}:\n{e}"));
                assert!(matches!(cli.command, Command::Probe(_)), "{what}: {command:?}");
                let after =
                    |list: &[String], flag: &str| list.iter().position(|a| a == flag).map(|i| list[i + 1].clone());
                let port = c["ports"][0]["containerPort"].as_i64().expect("container port");
                assert_eq!(
                    after(&command, "--address"),
                    Some(format!("127.0.0.1:{port}")),
                    "{what}"
                );
                let args = strings(&c["args"]);
                for flag in ["--tls-cert", "--tls-key", "--tls-ca"] {
                    assert!(after(&command, flag).is_some(), "{what}: no {flag}");
                    assert_eq!(after(&command, flag), after(&args, flag), "{what}: {flag}");
                }
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 6,
        "only {checked} exec probes checked: no sample runs a fleet over mutual TLS"
    );
}

/// The router's mount of a downloaded directory is the view `download` links.
#[test]
fn the_router_view_the_operator_mounts_is_the_one_download_links() {
    assert_eq!(dsv3_operator::planner::ROUTER_VIEW, crate::download::ROUTER_VIEW);
}

/// An attention rank with nothing to report, for the names its metrics carry.
struct IdleRank;

impl dsv3_fleet::AttentionRank for IdleRank {
    fn step(&self, _: dsv3_proto::StepRequest) -> anyhow::Result<dsv3_proto::StepReply> {
        anyhow::bail!("an idle rank takes no steps")
    }
    fn release(&self, _: &[u64]) -> anyhow::Result<()> {
        Ok(())
    }
    fn info(&self) -> anyhow::Result<dsv3_proto::AttentionInfo> {
        Ok(dsv3_proto::AttentionInfo::default())
    }
    fn figures(&self) -> anyhow::Result<dsv3_proto::AttentionInfo> {
        self.info()
    }
}

fn yaml_file(relative: &str) -> Value {
    let text = std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The monitoring boundary: the PodMonitor in deploy/monitoring selects every pod the operator
/// plans to serve (not the download Jobs' pods) and names a port each of them has; every
/// per-pod metric a planned HPA scales the attention ranks on is one the adapter rules serve
/// and the attention ranks export.
#[test]
fn monitoring_selects_the_planned_pods_and_autoscaling_reads_metrics_that_exist() {
    let monitor = yaml_file("deploy/monitoring/fleet-podmonitor.yaml");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let scraped: Vec<&str> = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["port"].as_str())
        .collect();
    let adapter = yaml_file("deploy/monitoring/prometheus-adapter-values.yaml");
    let adapted: Vec<&str> = adapter["rules"]["custom"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"]["as"].as_str())
        .collect();
    let mut exported = String::new();
    prometheus_client::encoding::prometheus_text::encode(
        &mut exported,
        &dsv3_fleet::rank_metrics::attention_registry(0, std::sync::Arc::new(IdleRank)),
    )
    .expect("encode");
    let exports = |name: &str| exported.lines().any(|l| l.starts_with(&format!("# TYPE {name} ")));
    for name in &adapted {
        assert!(
            exports(name),
            "the adapter serves {name}, which no attention rank exports"
        );
    }
    let (mut pods, mut scaled) = (0, 0);
    for (path, object) in sample_plans() {
        let what = format!("{}: {} {}", path.display(), object.kind, object.name);
        let template = &object.value["spec"]["template"];
        if object.kind == "Job" {
            // A download pod serves nothing: the monitor must not select it.
            let labels = template["metadata"]["labels"].as_object().cloned().unwrap_or_default();
            assert!(
                selector.iter().any(|(k, v)| labels.get(k) != Some(v)),
                "{what}: the PodMonitor selects a download pod"
            );
            continue;
        }
        if let Some(labels) = template["metadata"]["labels"].as_object() {
            for (k, v) in &selector {
                assert_eq!(labels.get(k), Some(v), "{what}: the PodMonitor selects {k}={v}");
            }
            let ports: Vec<&str> = template["spec"]["containers"][0]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .collect();
            assert!(
                ports.iter().any(|p| scraped.contains(p)),
                "{what}: ports {ports:?}, the PodMonitor scrapes {scraped:?}"
            );
            pods += 1;
        }
        if object.kind == "HorizontalPodAutoscaler"
            && object.value["spec"]["scaleTargetRef"]["kind"] == "DeepSeekV3Deployment"
        {
            for m in object.value["spec"]["metrics"].as_array().into_iter().flatten() {
                if let Some(name) = m["pods"]["metric"]["name"].as_str() {
                    assert!(
                        adapted.contains(&name),
                        "{what}: scales on {name}, which the adapter rules do not serve"
                    );
                    assert!(
                        exports(name),
                        "{what}: scales on {name}, which the attention ranks do not export"
                    );
                    scaled += 1;
                }
            }
        }
    }
    assert!(pods >= 9, "only {pods} pod templates checked");
    assert!(scaled >= 1, "no sample scales its attention ranks on a per-pod metric");
}
