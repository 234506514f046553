//! Planner tests over every sample: objects, labels, owner references, probes, security, ranks,
//! peers, placement, and which objects a spec change touches.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::crd::{DeepSeekV3Deployment, FleetGeneration, Slot};
use crate::placement::PlacementPlan;
use crate::planner::{
    self, ChildKind, Plan, PlanInput, Role, GPU_RESOURCE, LABEL_PLACEMENT_VERSION, LABEL_REVISION, LABEL_SLOT,
    WORKER_PORT,
};
use crate::testutil::{minimal, sample, SAMPLES};

/// The fleet as it runs (a hub model downloaded).
fn plan_of(cr: &DeepSeekV3Deployment) -> Plan {
    planner::plan(cr, &PlanInput::model_downloaded(cr)).unwrap_or_else(|e| panic!("plan failed: {e}"))
}

fn pod_spec_sts(s: &k8s_openapi::api::apps::v1::StatefulSet) -> PodSpec {
    s.spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("statefulset has a pod spec")
}

fn pod_spec_deploy(d: &k8s_openapi::api::apps::v1::Deployment) -> PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("deployment has a pod spec")
}

fn main_container(p: &PodSpec) -> &Container {
    p.containers.first().expect("one container")
}

fn arg_after(c: &Container, flag: &str) -> Option<String> {
    let args = c.args.clone().unwrap_or_default();
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

fn check_pod_hardening(what: &str, p: &PodSpec) {
    let psc = p.security_context.as_ref().expect("pod security context");
    assert_eq!(psc.run_as_non_root, Some(true), "{what}: runAsNonRoot");
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "{what}"
    );
    assert_eq!(
        p.automount_service_account_token,
        Some(false),
        "{what}: no API token in fleet pods"
    );
    for c in p.containers.iter().chain(p.init_containers.iter().flatten()) {
        let sc = c.security_context.as_ref().expect("container security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}/{}", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}/{}", c.name);
        assert_eq!(sc.run_as_non_root, Some(true), "{what}/{}", c.name);
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()]),
            "{what}/{}: drops all capabilities",
            c.name
        );
        let mounts: Vec<String> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.clone()).collect();
        assert!(
            mounts.contains(&"/tmp".to_string()),
            "{what}: writable /tmp with a read-only root"
        );
    }
}

fn gpu_limit(c: &Container) -> Option<String> {
    c.resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get(GPU_RESOURCE))
        .map(|q| q.0.clone())
}

#[test]
fn every_sample_plans_a_complete_fleet() {
    for file in SAMPLES {
        let cr = sample(file);
        let plan = plan_of(&cr);
        let name = cr.metadata.name.clone().expect("name");
        let ns = cr.metadata.namespace.clone().expect("namespace");
        let objects = plan.objects().expect("objects serialize");
        let kinds: BTreeSet<(&str, String)> = objects.iter().map(|o| (o.kind, o.name.clone())).collect();
        for (kind, suffix) in [
            ("ServiceAccount", "fleet"),
            ("ConfigMap", "fleet"),
            ("Service", "router"),
            ("Service", "attention"),
            ("Service", "expert"),
            ("NetworkPolicy", "workers"),
            ("StatefulSet", "attention"),
            ("StatefulSet", "expert"),
            ("Deployment", "router"),
            ("PodDisruptionBudget", "router"),
            ("PodDisruptionBudget", "attention"),
            ("PodDisruptionBudget", "expert"),
        ] {
            assert!(
                kinds.contains(&(kind, format!("{name}-{suffix}"))),
                "{file}: missing {kind} {name}-{suffix}"
            );
        }
        assert!(kinds.contains(&("ConfigMap", format!("{name}-placement-{}", plan.placement.version))));

        // Owner references, namespace and labels on everything.
        let uid = cr.metadata.uid.clone().expect("uid");
        for o in &objects {
            let what = format!("{file}: {} {}", o.kind, o.name);
            assert_eq!(o.value["metadata"]["namespace"], ns.as_str(), "{what}");
            let owners = o.value["metadata"]["ownerReferences"].as_array().expect("owner refs");
            assert_eq!(owners.len(), 1, "{what}");
            assert_eq!(owners[0]["uid"], uid.as_str(), "{what}");
            assert_eq!(owners[0]["kind"], "DeepSeekV3Deployment", "{what}");
            assert_eq!(owners[0]["controller"], true, "{what}");
            let labels = &o.value["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/instance"], name.as_str(), "{what}");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "dsv3-operator", "{what}");
            assert!(
                o.value["apiVersion"].is_string() && o.value["kind"].is_string(),
                "{what}"
            );
        }

        // HPAs exactly where autoscaling is set.
        let autoscaled: Vec<String> = plan
            .hpas
            .iter()
            .map(|h| h.metadata.name.clone().unwrap_or_default())
            .collect();
        let a = cr.spec.autoscaling.clone().unwrap_or_default();
        assert_eq!(
            autoscaled.contains(&format!("{name}-router")),
            a.router.is_some(),
            "{file}"
        );
        assert_eq!(
            autoscaled.contains(&format!("{name}-attention")),
            a.attention.is_some(),
            "{file}"
        );
        let absent_hpas = plan
            .absent
            .iter()
            .filter(|(kind, _)| *kind == ChildKind::HorizontalPodAutoscaler)
            .count();
        assert_eq!(plan.hpas.len() + absent_hpas, 2, "{file}");
        // Without a gang, no PodGroup of any kind may be left behind; with one, none of another.
        let absent_groups = plan
            .absent
            .iter()
            .filter(|(kind, _)| matches!(kind, ChildKind::PodGroup(_)))
            .count();
        assert_eq!(
            absent_groups,
            crate::crd::GangScheduler::ALL.len() - usize::from(cr.spec.scheduling.gang.is_some()),
            "{file}"
        );
    }
}

#[test]
fn pods_are_hardened_and_have_gpus_probes_ranks_and_peers() {
    for file in SAMPLES {
        let cr = sample(file);
        let plan = plan_of(&cr);
        let spec = &cr.spec;
        let ns = cr.metadata.namespace.clone().expect("namespace");
        let name = cr.metadata.name.clone().expect("name");

        let router = pod_spec_deploy(&plan.router_deployment);
        let attention = pod_spec_sts(&plan.attention_statefulset);
        let experts = pod_spec_sts(&plan.expert_statefulset);
        check_pod_hardening(&format!("{file} router"), &router);
        check_pod_hardening(&format!("{file} attention"), &attention);
        check_pod_hardening(&format!("{file} experts"), &experts);

        // GPUs.
        let want = |g: i32| (g > 0).then(|| g.to_string());
        assert_eq!(
            gpu_limit(main_container(&attention)),
            want(spec.attention.gpus_per_pod),
            "{file}"
        );
        assert_eq!(
            gpu_limit(main_container(&experts)),
            want(spec.experts.gpus_per_pod),
            "{file}"
        );
        assert_eq!(
            gpu_limit(main_container(&router)),
            want(spec.router.gpus_per_pod),
            "{file}"
        );
        if spec.experts.gpus_per_pod > 0 {
            assert!(
                experts
                    .tolerations
                    .iter()
                    .flatten()
                    .any(|t| t.key.as_deref() == Some(GPU_RESOURCE)),
                "{file}: GPU pods tolerate the GPU taint"
            );
        }

        // Probes: native gRPC on the workers (`dsv3-worker probe` over mutual TLS), HTTP on the
        // router; startup covers the load time.
        for (what, p) in [("attention", &attention), ("experts", &experts)] {
            let c = main_container(p);
            for probe in [&c.startup_probe, &c.readiness_probe, &c.liveness_probe] {
                let probe = probe.as_ref().expect("probe");
                if spec.tls.is_some() {
                    let command = probe.exec.as_ref().and_then(|e| e.command.clone()).unwrap_or_default();
                    assert!(command.contains(&format!("127.0.0.1:{WORKER_PORT}")), "{file} {what}");
                } else {
                    assert_eq!(probe.grpc.as_ref().map(|g| g.port), Some(WORKER_PORT), "{file} {what}");
                }
            }
            let s = c.startup_probe.as_ref().expect("startup probe");
            let budget = s.period_seconds.unwrap_or(10) * s.failure_threshold.unwrap_or(3);
            assert!(
                budget >= spec.model.load_timeout_seconds,
                "{file} {what}: startup budget {budget}s"
            );
        }
        let rc = main_container(&router);
        let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
                .unwrap_or_default()
        };
        assert_eq!(path(&rc.readiness_probe), "/ready", "{file}");
        assert_eq!(path(&rc.liveness_probe), "/health", "{file}");
        assert_eq!(path(&rc.startup_probe), "/health", "{file}");

        // Ranks from the StatefulSet ordinal.
        for (role, p) in [(Role::Attention, &attention), (Role::Expert, &experts)] {
            let c = main_container(p);
            assert_eq!(
                c.args.as_ref().and_then(|a| a.first()).map(String::as_str),
                Some(role.as_str())
            );
            assert_eq!(arg_after(c, "--rank").as_deref(), Some("$(DSV3_RANK)"), "{file}");
            let rank_env = c
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "DSV3_RANK")
                .expect("DSV3_RANK env");
            let field = rank_env
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.clone());
            assert_eq!(
                field.as_deref(),
                Some("metadata.labels['apps.kubernetes.io/pod-index']")
            );
            assert_eq!(
                arg_after(c, "--data-plane").as_deref(),
                Some(spec.data_plane.as_str()),
                "{file}"
            );
            assert_eq!(
                arg_after(c, "--placement").as_deref(),
                Some("/etc/dsv3/placement/placement.json")
            );
            // Pods with GPUs run on them; CPU pods on the CPU.
            let gpus = match role {
                Role::Attention => spec.attention.gpus_per_pod,
                _ => spec.experts.gpus_per_pod,
            };
            let device = if gpus > 0 { "cuda" } else { "cpu" };
            assert_eq!(arg_after(c, "--device").as_deref(), Some(device), "{file} {role:?}");
        }

        // Peers: DNS names of the headless Services, one per rank.
        let expert_peers = arg_after(main_container(&attention), "--expert-peers").expect("expert peers");
        let list: Vec<&str> = expert_peers.split(',').collect();
        assert_eq!(list.len() as i32, spec.experts.replicas, "{file}");
        assert_eq!(list[0], format!("{name}-expert-0.{name}-expert.{ns}.svc:{WORKER_PORT}"));
        let attention_peers = arg_after(main_container(&router), "--attention-peers").expect("attention peers");
        let want_ranks = spec
            .autoscaling
            .as_ref()
            .and_then(|a| a.attention.as_ref())
            .map_or(spec.attention.replicas, |a| a.max_replicas);
        assert_eq!(attention_peers.split(',').count() as i32, want_ranks, "{file}");
        assert!(
            arg_after(main_container(&experts), "--attention-peers").is_none(),
            "expert pods do not depend on the attention width"
        );

        // Headless services publish not-ready ranks so peers can bootstrap.
        for svc in [&plan.attention_service, &plan.expert_service] {
            let s = svc.spec.as_ref().expect("service spec");
            assert_eq!(s.cluster_ip.as_deref(), Some("None"));
            assert_eq!(s.publish_not_ready_addresses, Some(true));
        }
        // StatefulSets start all ranks at once and use the headless services.
        for sts in [&plan.attention_statefulset, &plan.expert_statefulset] {
            let s = sts.spec.as_ref().expect("sts spec");
            assert_eq!(s.pod_management_policy.as_deref(), Some("Parallel"));
            assert_eq!(s.service_name.as_deref(), sts.metadata.name.as_deref());
        }
    }
}

#[test]
fn placement_plan_is_mounted_and_versioned_identically_on_both_worker_sets() {
    for file in SAMPLES {
        let cr = sample(file);
        let plan = plan_of(&cr);
        let cm = &plan.placement_config;
        assert_eq!(cm.immutable, Some(true), "{file}: placement ConfigMaps are immutable");
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get("placement.json"))
            .expect("placement.json");
        let parsed: PlacementPlan = serde_json::from_str(text).expect("placement JSON parses");
        assert_eq!(parsed, plan.placement);
        assert_eq!(parsed.shards.len() as i32, cr.spec.experts.replicas);
        assert_eq!(parsed.num_experts as i32, cr.spec.model.num_routed_experts);
        let slots: usize = parsed.shards.iter().map(Vec::len).sum();
        assert_eq!(
            slots as i32,
            cr.spec.model.num_routed_experts + cr.spec.experts.redundant_experts
        );
        for sts in [&plan.attention_statefulset, &plan.expert_statefulset] {
            let t = &sts.spec.as_ref().expect("spec").template;
            let label = t
                .metadata
                .as_ref()
                .and_then(|m| m.labels.as_ref())
                .and_then(|l| l.get(LABEL_PLACEMENT_VERSION))
                .cloned();
            assert_eq!(label.as_deref(), Some(plan.placement.version.as_str()), "{file}");
            let vol = t
                .spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .and_then(|v| v.iter().find(|v| v.name == "placement"))
                .and_then(|v| v.config_map.as_ref())
                .map(|c| c.name.clone());
            assert_eq!(vol, cm.metadata.name, "{file}: both sets mount the same plan");
        }
        let fleet: Value = serde_json::from_str(
            plan.fleet_config
                .data
                .as_ref()
                .and_then(|d| d.get("fleet.json"))
                .expect("fleet.json"),
        )
        .expect("fleet.json parses");
        assert_eq!(fleet["placementVersion"], plan.placement.version.as_str());
    }
}

#[test]
fn network_policy_opens_worker_ports_only_to_the_fleet() {
    let grpc = plan_of(&sample("tiny-cpu.yaml"));
    let np = serde_json::to_value(&grpc.network_policy).expect("serializes");
    let rule = &np["spec"]["ingress"][0];
    assert_eq!(
        rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "tiny"
    );
    assert_eq!(rule["ports"][0]["port"], WORKER_PORT);
    assert_eq!(
        np["spec"]["podSelector"]["matchExpressions"][0]["values"],
        serde_json::json!(["attention", "expert"])
    );
    let mut cr = sample("h200-single-node.yaml");
    cr.spec.data_plane = crate::crd::DataPlane::Nccl;
    let nccl = plan_of(&cr);
    let np = serde_json::to_value(&nccl.network_policy).expect("serializes");
    assert!(
        np["spec"]["ingress"][0].get("ports").is_none(),
        "NCCL needs every port within the fleet"
    );
    assert!(np["spec"]["ingress"][0]["from"][0]["podSelector"].is_object());
    assert_eq!(
        np["spec"]["ingress"].as_array().map(Vec::len),
        Some(1),
        "no scraper named"
    );
}

#[test]
fn the_named_scraper_namespace_reaches_the_worker_port_and_nothing_else() {
    let cr = sample("wide-ep-multinode.yaml");
    assert_eq!(cr.spec.metrics.scraper_namespace.as_deref(), Some("monitoring"));
    let np = serde_json::to_value(&plan_of(&cr).network_policy).expect("serializes");
    let rules = np["spec"]["ingress"].as_array().cloned().unwrap_or_default();
    assert_eq!(rules.len(), 2);
    let scrape = &rules[1];
    assert_eq!(
        scrape["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert!(scrape["from"][0].get("podSelector").is_none());
    assert_eq!(
        scrape["ports"],
        serde_json::json!([{"port": WORKER_PORT, "protocol": "TCP"}])
    );
}

#[test]
fn plans_are_deterministic() {
    for file in SAMPLES {
        assert_eq!(plan_of(&sample(file)), plan_of(&sample(file)), "{file}");
    }
}

/// Names of the objects that differ between two plans.
fn changed(a: &Plan, b: &Plan) -> BTreeSet<String> {
    let oa = a.objects().expect("objects");
    let ob = b.objects().expect("objects");
    let mut out = BTreeSet::new();
    for o in &ob {
        match oa.iter().find(|x| x.kind == o.kind && x.name == o.name) {
            Some(x) if x.value == o.value => {}
            _ => {
                out.insert(format!("{}/{}", o.kind, o.name));
            }
        }
    }
    for o in &oa {
        if !ob.iter().any(|x| x.kind == o.kind && x.name == o.name) {
            out.insert(format!("-{}/{}", o.kind, o.name));
        }
    }
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn spec_changes_touch_only_the_objects_that_depend_on_them() {
    let base = sample("tiny-cpu.yaml");
    let p0 = plan_of(&base);

    let mut routers = base.clone();
    routers.spec.router.replicas = 3;
    assert_eq!(changed(&p0, &plan_of(&routers)), set(&["Deployment/tiny-router"]));

    let mut wider = base.clone();
    wider.spec.attention.replicas = 4;
    assert_eq!(
        changed(&p0, &plan_of(&wider)),
        set(&[
            "ConfigMap/tiny-fleet",
            "Deployment/tiny-router",
            "StatefulSet/tiny-attention"
        ]),
        "the expert pods must not restart when attention scales"
    );

    // Batching is the router's to read: no rank restarts for it.
    let mut batching = base.clone();
    batching.spec.batching.max_num_seqs = 32;
    assert_eq!(
        changed(&p0, &plan_of(&batching)),
        set(&["ConfigMap/tiny-fleet", "Deployment/tiny-router"])
    );

    // Speculation is the attention ranks': the expert pods stay.
    let mut speculating = base.clone();
    speculating.spec.mtp.enabled = !base.spec.mtp.enabled;
    speculating.spec.mtp.num_speculative_tokens = 2;
    assert_eq!(
        changed(&p0, &plan_of(&speculating)),
        set(&["ConfigMap/tiny-fleet", "StatefulSet/tiny-attention"])
    );

    let mut replan = base.clone();
    replan.spec.experts.redundant_experts = 0;
    let p1 = plan_of(&replan);
    assert_ne!(p0.placement.version, p1.placement.version);
    let c = changed(&p0, &p1);
    assert!(
        c.contains("StatefulSet/tiny-attention") && c.contains("StatefulSet/tiny-expert"),
        "{c:?}"
    );
    assert!(c.contains(&format!("ConfigMap/tiny-placement-{}", p1.placement.version)));
    // The routers' pods do not depend on the placement (only the record on their Deployment of
    // the generation they send to does): no router restarts for it.
    let template = |p: &Plan| p.router_deployment.spec.as_ref().map(|s| s.template.clone());
    assert_eq!(
        template(&p0),
        template(&p1),
        "router pods do not depend on the placement"
    );
}

#[test]
fn placement_cutover_stops_both_worker_sets_at_the_new_version() {
    let cr = sample("h200-single-node.yaml");
    let cut = planner::plan(
        &cr,
        &PlanInput {
            placement_cutover: true,
            ..Default::default()
        },
    )
    .expect("plan");
    let normal = plan_of(&cr);
    for (c, n) in [
        (&cut.attention_statefulset, &normal.attention_statefulset),
        (&cut.expert_statefulset, &normal.expert_statefulset),
    ] {
        assert_eq!(c.spec.as_ref().and_then(|s| s.replicas), Some(0));
        assert!(n.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) > 0);
        assert_eq!(
            c.spec.as_ref().map(|s| &s.template),
            n.spec.as_ref().map(|s| &s.template),
            "same pod template, only the replica count differs"
        );
    }
    assert_eq!(cut.router_deployment, normal.router_deployment);
}

#[test]
fn the_attention_hpa_scales_the_resource_and_the_router_hpa_its_deployment() {
    let cr = sample("wide-ep-multinode.yaml");
    let plan = plan_of(&cr);
    // The attention replica count has one owner: spec.attention.replicas, which the HPA writes
    // through the scale subresource.
    assert_eq!(
        plan.attention_statefulset.spec.as_ref().and_then(|s| s.replicas),
        Some(cr.spec.attention.replicas)
    );
    assert_eq!(plan.router_deployment.spec.as_ref().and_then(|s| s.replicas), None);
    assert_eq!(plan.expert_statefulset.spec.as_ref().and_then(|s| s.replicas), Some(96));
    let hpa = plan
        .hpas
        .iter()
        .find(|h| h.metadata.name.as_deref() == Some("deepseek-v3-wide-attention"))
        .expect("attention HPA");
    let s = hpa.spec.as_ref().expect("hpa spec");
    assert_eq!((s.min_replicas, s.max_replicas), (Some(32), 48));
    assert_eq!(
        (
            s.scale_target_ref.api_version.as_deref(),
            s.scale_target_ref.kind.as_str(),
            s.scale_target_ref.name.as_str()
        ),
        (Some("dsv3.io/v1alpha1"), "DeepSeekV3Deployment", "deepseek-v3-wide")
    );
    let metrics = s.metrics.clone().unwrap_or_default();
    assert_eq!(metrics[0].type_, "Pods");
    // A metric the attention ranks serve (`dsv3_rank_*` on their /metrics).
    let served = metrics[0].pods.as_ref().map(|p| p.metric.name.clone());
    assert_eq!(served.as_deref(), Some("dsv3_rank_sequences"));
    let router = plan
        .hpas
        .iter()
        .find(|h| h.metadata.name.as_deref() == Some("deepseek-v3-wide-router"))
        .expect("router HPA");
    let r = router.spec.as_ref().expect("hpa spec");
    assert_eq!(
        (r.scale_target_ref.kind.as_str(), r.scale_target_ref.name.as_str()),
        ("Deployment", "deepseek-v3-wide-router")
    );

    let mut off = cr.clone();
    off.spec.autoscaling = None;
    let plan = plan_of(&off);
    assert!(plan.hpas.is_empty());
    assert_eq!(
        plan.absent
            .into_iter()
            .filter(|(kind, _)| *kind == ChildKind::HorizontalPodAutoscaler)
            .collect::<Vec<_>>(),
        vec![
            (
                ChildKind::HorizontalPodAutoscaler,
                "deepseek-v3-wide-router".to_string()
            ),
            (
                ChildKind::HorizontalPodAutoscaler,
                "deepseek-v3-wide-attention".to_string()
            )
        ]
    );
}

fn hub_cr(revision: &str) -> DeepSeekV3Deployment {
    let mut cr = minimal();
    cr.spec.model.source.pvc = None;
    cr.spec.model.source.hub = Some(crate::crd::HubSource {
        repo: "deepseek-ai/DeepSeek-V3-0324".into(),
        revision: revision.into(),
        token_secret: Some(crate::crd::SecretKeyRef {
            name: "hf".into(),
            key: "token".into(),
        }),
        cache_claim_name: "hub-cache".into(),
    });
    cr
}

fn served(cr: &DeepSeekV3Deployment) -> PlanInput {
    PlanInput::model_downloaded(cr)
}

fn replicas_of(plan: &Plan) -> [Option<i32>; 3] {
    [
        plan.router_deployment.spec.as_ref().and_then(|s| s.replicas),
        plan.attention_statefulset.spec.as_ref().and_then(|s| s.replicas),
        plan.expert_statefulset.spec.as_ref().and_then(|s| s.replicas),
    ]
}

#[test]
fn a_hub_model_is_downloaded_once_by_a_job_with_the_token_secret() {
    let cr = hub_cr("main");
    let plan = planner::plan(&cr, &served(&cr)).expect("plan");
    let job = plan.model_download.as_ref().expect("a download Job");
    let pod = job.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod");
    check_pod_hardening("download job", &pod);
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let c = main_container(&pod);
    assert_eq!(
        c.args.as_ref().and_then(|a| a.first()).map(String::as_str),
        Some("download")
    );
    assert_eq!(arg_after(c, "--repo").as_deref(), Some("deepseek-ai/DeepSeek-V3-0324"));
    assert_eq!(arg_after(c, "--revision").as_deref(), Some("main"));
    assert_eq!(
        arg_after(c, "--dir").as_deref(),
        Some("/cache/hub/deepseek-ai/DeepSeek-V3-0324/main")
    );
    let token = c.env.iter().flatten().find(|e| e.name == "HF_TOKEN").expect("HF_TOKEN");
    let sel = token
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("secret ref");
    assert_eq!((sel.name.as_str(), sel.key.as_str()), ("hf", "token"));
    let cache = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "cache")
        .expect("cache volume");
    let claim = cache.persistent_volume_claim.as_ref().expect("claim");
    assert_eq!((claim.claim_name.as_str(), claim.read_only), ("hub-cache", Some(false)));

    // No worker pod downloads anything; the ranks read the revision's directory read-only.
    for (what, pod) in [
        ("attention", pod_spec_sts(&plan.attention_statefulset)),
        ("expert", pod_spec_sts(&plan.expert_statefulset)),
    ] {
        assert!(pod.init_containers.is_none(), "{what}");
        let mount = main_container(&pod)
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "model")
            .expect("model mount");
        assert_eq!(
            mount.sub_path.as_deref(),
            Some("hub/deepseek-ai/DeepSeek-V3-0324/main"),
            "{what}"
        );
        assert_eq!(mount.read_only, Some(true), "{what}");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "model")
            .expect("volume");
        let claim = volume.persistent_volume_claim.as_ref().expect("claim");
        assert_eq!((claim.claim_name.as_str(), claim.read_only), ("hub-cache", Some(true)));
    }
}

#[test]
fn the_router_mounts_only_the_files_it_reads() {
    let cr = hub_cr("v1.0");
    let plan = planner::plan(&cr, &served(&cr)).expect("plan");
    let pod = pod_spec_deploy(&plan.router_deployment);
    let mount = main_container(&pod)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "model")
        .expect("model mount");
    assert_eq!(
        mount.sub_path.as_deref(),
        Some(format!("hub/deepseek-ai/DeepSeek-V3-0324/v1.0/{}", planner::ROUTER_VIEW).as_str())
    );
}

#[test]
fn nothing_starts_before_the_first_download_and_a_new_revision_keeps_the_old_one_serving() {
    let cr = hub_cr("v2");
    let pending = planner::plan(&cr, &PlanInput::default()).expect("plan");
    assert_eq!(replicas_of(&pending), [Some(0); 3]);
    assert!(pending.model_download.is_some());

    // v1 serves while v2 downloads: the pods keep v1's directory, the Job fetches v2.
    let v1 = crate::crd::ServedModel::of(
        cr.spec
            .model
            .source
            .hub
            .as_ref()
            .map(|h| crate::crd::HubSource {
                revision: "v1".into(),
                ..h.clone()
            })
            .as_ref()
            .expect("hub"),
    );
    let input = PlanInput {
        served_model: Some(v1),
        ..Default::default()
    };
    let serving = planner::plan(&cr, &input).expect("plan");
    assert!(replicas_of(&serving).iter().all(|r| r.unwrap_or(1) > 0));
    let mount = main_container(&pod_spec_sts(&serving.expert_statefulset))
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "model")
        .and_then(|m| m.sub_path.clone());
    assert_eq!(mount.as_deref(), Some("hub/deepseek-ai/DeepSeek-V3-0324/v1"));
    let job = serving.model_download.as_ref().expect("job");
    assert_eq!(
        arg_after(
            main_container(&job.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod")),
            "--revision"
        )
        .as_deref(),
        Some("v2")
    );
}

#[test]
fn the_download_job_is_named_by_what_it_downloads() {
    let name = |cr: &DeepSeekV3Deployment| {
        planner::plan(cr, &served(cr))
            .expect("plan")
            .model_download
            .and_then(|j| j.metadata.name)
            .expect("job name")
    };
    let main = hub_cr("main");
    assert_eq!(name(&main), name(&hub_cr("main")), "stable");
    assert_ne!(name(&main), name(&hub_cr("v2")), "a new revision is a new download");
    let mut other_claim = hub_cr("main");
    if let Some(h) = other_claim.spec.model.source.hub.as_mut() {
        h.cache_claim_name = "other".into();
    }
    assert_ne!(name(&main), name(&other_claim));
    let mut new_image = hub_cr("main");
    new_image.spec.image = "registry.example/dsv3-worker:next".into();
    assert_eq!(name(&main), name(&new_image), "an image change does not download again");
    assert!(name(&main).len() <= 63);
    assert!(
        plan_of(&minimal()).model_download.is_none(),
        "a PVC source needs no download"
    );
}

#[test]
fn router_api_key_comes_from_the_secret() {
    let plan = plan_of(&sample("h200-single-node.yaml"));
    let pod = pod_spec_deploy(&plan.router_deployment);
    let key = main_container(&pod)
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "DSV3_API_KEY")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .map(|s| (s.name.clone(), s.key.clone()));
    assert_eq!(key, Some(("deepseek-v3-api-key".into(), "api-key".into())));
}

#[test]
fn invalid_topology_is_a_plan_error_not_a_panic() {
    let mut cr = minimal();
    cr.spec.experts.replicas = 3;
    assert!(matches!(
        planner::plan(&cr, &PlanInput::default()),
        Err(planner::PlanError::Placement(_))
    ));
    let mut no_uid = minimal();
    no_uid.metadata.uid = None;
    assert_eq!(
        planner::plan(&no_uid, &PlanInput::default()),
        Err(planner::PlanError::MissingMetadata("uid"))
    );
}

/// Writes every planned object of every sample to $DSV3_PLANNED_DIR (used by
/// operator/ci/check-manifests.sh to run kubernetes-validate --strict over the planner output).
#[test]
fn dump_planned_objects_for_offline_validation() {
    let Some(dir) = std::env::var_os("DSV3_PLANNED_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create dump dir");
    for file in SAMPLES {
        let plan = plan_of(&sample(file));
        for o in plan.objects().expect("objects") {
            let path = dir.join(format!("{}-{}-{}.yaml", file.trim_end_matches(".yaml"), o.kind, o.name));
            let yaml = serde_yaml::to_string(&o.value).expect("yaml");
            std::fs::write(&path, yaml).expect("write");
        }
    }
}

fn max_unavailable(pdb: &k8s_openapi::api::policy::v1::PodDisruptionBudget) -> Option<i32> {
    match pdb.spec.as_ref()?.max_unavailable.as_ref()? {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(_) => None,
    }
}

#[test]
fn the_expert_pdb_never_lets_an_expert_lose_its_last_live_copy() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.rollout.max_unavailable = 3;
    let expert_pdb = |cr: &DeepSeekV3Deployment| {
        let plan = plan_of(cr);
        let pdb = plan
            .pdbs
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("tiny-expert"))
            .cloned()
            .expect("expert PDB");
        (plan.placement.fewest_copies(), max_unavailable(&pdb))
    };
    // 16 experts + 4 redundant copies over 4 shards: some expert lives on one shard only.
    assert_eq!(expert_pdb(&cr), (1, Some(0)));
    // Every expert twice: one shard at a time may go.
    cr.spec.experts.redundant_experts = cr.spec.model.num_routed_experts;
    assert_eq!(expert_pdb(&cr), (2, Some(1)));
    // The other roles keep the rollout's limit.
    let plan = plan_of(&cr);
    for p in plan
        .pdbs
        .iter()
        .filter(|p| p.metadata.name.as_deref() != Some("tiny-expert"))
    {
        assert_eq!(max_unavailable(p), Some(3), "{:?}", p.metadata.name);
    }
}

#[test]
fn pods_spread_over_nodes_unless_the_role_says_otherwise() {
    let mut cr = sample("tiny-cpu.yaml");
    let plan = plan_of(&cr);
    for (role, template) in [
        ("router", plan.router_deployment.spec.as_ref().map(|s| &s.template)),
        (
            "attention",
            plan.attention_statefulset.spec.as_ref().map(|s| &s.template),
        ),
        ("expert", plan.expert_statefulset.spec.as_ref().map(|s| &s.template)),
    ] {
        let spread = template
            .and_then(|t| t.spec.as_ref())
            .and_then(|s| s.topology_spread_constraints.clone())
            .unwrap_or_default();
        assert_eq!(spread.len(), 1, "{role}");
        let c = &spread[0];
        assert_eq!(
            (c.topology_key.as_str(), c.max_skew, c.when_unsatisfiable.as_str()),
            ("kubernetes.io/hostname", 1, "ScheduleAnyway"),
            "{role}"
        );
        let selects = c
            .label_selector
            .as_ref()
            .and_then(|l| l.match_labels.clone())
            .unwrap_or_default();
        assert_eq!(
            selects.get("app.kubernetes.io/component").map(String::as_str),
            Some(role)
        );
        assert_eq!(
            selects.get("app.kubernetes.io/instance").map(String::as_str),
            Some("tiny")
        );
    }
    let zones = k8s_openapi::api::core::v1::TopologySpreadConstraint {
        max_skew: 2,
        topology_key: "topology.kubernetes.io/zone".into(),
        when_unsatisfiable: "DoNotSchedule".into(),
        ..Default::default()
    };
    cr.spec.experts.pod.topology_spread_constraints = vec![zones.clone()];
    let plan = plan_of(&cr);
    let expert = plan
        .expert_statefulset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref());
    assert_eq!(
        expert.and_then(|s| s.topology_spread_constraints.clone()),
        Some(vec![zones])
    );
}

#[test]
fn stopping_pods_drain_within_their_grace_period() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.rollout.drain_seconds = 200;
    let plan = plan_of(&cr);
    let pod =
        |t: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>| t.and_then(|t| t.spec.clone()).expect("pod spec");
    let attention = pod(plan.attention_statefulset.spec.as_ref().map(|s| &s.template));
    assert_eq!(
        arg_after(&attention.containers[0], "--drain-seconds").as_deref(),
        Some("200")
    );
    assert!(attention.termination_grace_period_seconds.unwrap_or(0) > 200);
    let router = pod(plan.router_deployment.spec.as_ref().map(|s| &s.template));
    let pre_stop = router.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .map(|s| s.seconds)
        .expect("the router leaves its endpoints before SIGTERM");
    assert!(router.termination_grace_period_seconds.unwrap_or(0) > 200 + pre_stop);
    let experts = pod(plan.expert_statefulset.spec.as_ref().map(|s| &s.template));
    assert_eq!(
        arg_after(&experts.containers[0], "--drain-seconds"),
        None,
        "expert shards hold no sequences"
    );
}

#[test]
fn the_network_section_reaches_the_attention_and_expert_pods_only() {
    let cr = sample("wide-ep-multinode.yaml");
    let plan = plan_of(&cr);
    let container = |t: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>| {
        t.and_then(|t| t.spec.clone()).expect("pod spec").containers[0].clone()
    };
    for (role, c) in [
        (
            "attention",
            container(plan.attention_statefulset.spec.as_ref().map(|s| &s.template)),
        ),
        (
            "expert",
            container(plan.expert_statefulset.spec.as_ref().map(|s| &s.template)),
        ),
    ] {
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone()).unwrap_or_default();
        assert_eq!(limits.get("rdma/ib").map(|q| q.0.as_str()), Some("1"), "{role}");
        let env: Vec<(String, Option<String>)> = c
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value))
            .collect();
        assert!(env.contains(&("NCCL_IB_HCA".into(), Some("mlx5".into()))), "{role}");
        assert!(
            env.contains(&("NCCL_SOCKET_IFNAME".into(), Some("eth0".into()))),
            "{role}"
        );
        let caps = c.security_context.and_then(|s| s.capabilities).expect("capabilities");
        assert_eq!(caps.add, Some(vec!["IPC_LOCK".to_string()]), "{role}");
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{role}");
    }
    let router = container(plan.router_deployment.spec.as_ref().map(|s| &s.template));
    let limits = router
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert!(!limits.contains_key("rdma/ib"));
    assert!(!router
        .env
        .unwrap_or_default()
        .iter()
        .any(|e| e.name.starts_with("NCCL_")));
    let caps = router
        .security_context
        .and_then(|s| s.capabilities)
        .expect("capabilities");
    assert_eq!(caps.add, None, "the router needs no capability");
}

fn with_gang(scheduler: crate::crd::GangScheduler, queue: Option<&str>) -> DeepSeekV3Deployment {
    let mut cr = sample("h200-single-node.yaml");
    cr.spec.scheduling.gang = Some(crate::crd::GangSpec {
        scheduler,
        queue: queue.map(String::from),
        schedule_timeout_seconds: None,
    });
    cr
}

#[test]
fn a_gang_is_every_attention_and_expert_pod_in_one_pod_group() {
    use crate::crd::GangScheduler;
    let cr = with_gang(GangScheduler::Volcano, Some("inference"));
    let plan = plan_of(&cr);
    let (scheduler, group) = plan.pod_group.as_ref().expect("a PodGroup");
    assert_eq!(*scheduler, GangScheduler::Volcano);
    let value = serde_json::to_value(group).expect("json");
    assert_eq!(value["apiVersion"], "scheduling.volcano.sh/v1beta1");
    assert_eq!(value["kind"], "PodGroup");
    let members = cr.spec.attention.replicas + cr.spec.experts.replicas;
    assert_eq!(value["spec"]["minMember"], members);
    assert_eq!(value["spec"]["queue"], "inference");
    let name = group.metadata.name.clone().expect("name");
    for (what, pod) in [
        ("attention", pod_spec_sts(&plan.attention_statefulset)),
        ("expert", pod_spec_sts(&plan.expert_statefulset)),
    ] {
        assert_eq!(pod.scheduler_name.as_deref(), Some("volcano"), "{what}");
    }
    for sts in [&plan.attention_statefulset, &plan.expert_statefulset] {
        let annotations = sts
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        assert_eq!(annotations.get("scheduling.k8s.io/group-name"), Some(&name));
        assert_eq!(
            annotations.get("volcano.sh/queue-name").map(String::as_str),
            Some("inference")
        );
    }
    let router = pod_spec_deploy(&plan.router_deployment);
    assert_eq!(router.scheduler_name, None, "the router is not part of the gang");

    // Scaling attention grows the group; a cut-over (no pods) empties it.
    let mut wider = cr.clone();
    wider.spec.attention.replicas += 2;
    let wide = plan_of(&wider);
    let value = serde_json::to_value(&wide.pod_group.expect("group").1).expect("json");
    assert_eq!(value["spec"]["minMember"], members + 2);
    let cut = planner::plan(
        &cr,
        &PlanInput {
            placement_cutover: true,
            ..Default::default()
        },
    )
    .expect("plan");
    let value = serde_json::to_value(&cut.pod_group.expect("group").1).expect("json");
    assert_eq!(value["spec"]["minMember"], 0);
}

/// KAI Scheduler: its PodGroup kind with the queue, pods naming the group by annotation and
/// the queue by label; a generation in the green slot has a group of its own.
#[test]
fn kai_groups_by_annotation_with_its_queue_and_each_generation_has_its_own_group() {
    use crate::crd::GangScheduler;
    let cr = with_gang(GangScheduler::Kai, Some("inference"));
    let plan = plan_of(&cr);
    let (scheduler, group) = plan.pod_group.as_ref().expect("a PodGroup");
    assert_eq!(*scheduler, GangScheduler::Kai);
    let value = serde_json::to_value(group).expect("json");
    assert_eq!(value["apiVersion"], "scheduling.run.ai/v2alpha2");
    assert_eq!(value["kind"], "PodGroup");
    assert_eq!(
        value["spec"]["minMember"],
        cr.spec.attention.replicas + cr.spec.experts.replicas
    );
    assert_eq!(value["spec"]["queue"], "inference");
    let green = plan_in(&cr, Slot::Green, None);
    let green_group = green.pod_group.as_ref().expect("a PodGroup").1.metadata.name.clone();
    assert_ne!(green_group, group.metadata.name, "one group per generation");
    for (plan, name) in [(&plan, group.metadata.name.clone()), (&green, green_group)] {
        for sts in [&plan.attention_statefulset, &plan.expert_statefulset] {
            let meta = sts
                .spec
                .as_ref()
                .and_then(|s| s.template.metadata.clone())
                .expect("metadata");
            assert_eq!(
                meta.annotations.unwrap_or_default().get("pod-group-name"),
                name.as_ref()
            );
            assert_eq!(
                meta.labels
                    .unwrap_or_default()
                    .get("kai.scheduler/queue")
                    .map(String::as_str),
                Some("inference")
            );
            assert_eq!(pod_spec_sts(sts).scheduler_name.as_deref(), Some("kai-scheduler"));
        }
    }
    // The other schedulers' groups of the same generation are not wanted.
    assert!(plan
        .absent
        .iter()
        .any(|(k, n)| *k == ChildKind::PodGroup(GangScheduler::Volcano) && Some(n) == group.metadata.name.as_ref()));
}

#[test]
fn coscheduling_groups_by_label_with_a_timeout_and_a_named_scheduler_wins() {
    use crate::crd::GangScheduler;
    let mut cr = with_gang(GangScheduler::Coscheduling, None);
    let plan = plan_of(&cr);
    let (_, group) = plan.pod_group.as_ref().expect("a PodGroup");
    let value = serde_json::to_value(group).expect("json");
    assert_eq!(value["apiVersion"], "scheduling.x-k8s.io/v1alpha1");
    assert_eq!(value["spec"]["scheduleTimeoutSeconds"], 600);
    let labels = plan
        .expert_statefulset
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert_eq!(
        labels.get("scheduling.x-k8s.io/pod-group"),
        group.metadata.name.as_ref()
    );
    assert_eq!(
        pod_spec_sts(&plan.expert_statefulset).scheduler_name.as_deref(),
        Some("scheduler-plugins-scheduler")
    );
    cr.spec.scheduling.scheduler_name = Some("my-scheduler".into());
    let plan = plan_of(&cr);
    assert_eq!(
        pod_spec_sts(&plan.attention_statefulset).scheduler_name.as_deref(),
        Some("my-scheduler")
    );
    assert!(plan_of(&sample("h200-single-node.yaml")).pod_group.is_none());
}

#[test]
fn pod_overrides_patch_only_their_role_and_a_bad_one_is_named() {
    let mut cr = sample("h200-single-node.yaml");
    cr.spec.experts.pod.pod_overrides = Some(serde_json::json!({
        "spec": {"containers": [{"name": "trace", "image": "busybox:1"}], "shareProcessNamespace": true}
    }));
    let plan = plan_of(&cr);
    let experts = pod_spec_sts(&plan.expert_statefulset);
    let names: Vec<&str> = experts.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["expert", "trace"]);
    assert_eq!(experts.share_process_namespace, Some(true));
    assert_eq!(
        main_container(&experts).args,
        plan_of(&sample("h200-single-node.yaml"))
            .expert_statefulset
            .spec
            .and_then(|s| s.template.spec)
            .map(|p| p.containers[0].args.clone())
            .expect("args")
    );
    assert_eq!(pod_spec_sts(&plan.attention_statefulset).containers.len(), 1);

    cr.spec.router.pod.pod_overrides = Some(serde_json::json!({"spec": {"containers": [{"image": "x"}]}}));
    let err = planner::plan(&cr, &PlanInput::default()).unwrap_err().to_string();
    assert!(
        err.starts_with("router.podOverrides: ") && err.contains("`name`"),
        "{err}"
    );
}

#[test]
fn mutual_tls_mounts_the_secret_into_every_member_and_probes_the_ranks_over_it() {
    use crate::crd::FleetTlsSpec;
    let mut cr = sample("h200-single-node.yaml");
    let ns = cr.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = cr.metadata.name.clone().expect("name");
    let plain = plan_of(&cr);
    cr.spec.tls = Some(FleetTlsSpec {
        secret_name: "fleet-tls".into(),
    });
    let plan = plan_of(&cr);
    let pods = |p: &Plan| {
        [
            ("router", pod_spec_deploy(&p.router_deployment)),
            ("attention", pod_spec_sts(&p.attention_statefulset)),
            ("expert", pod_spec_sts(&p.expert_statefulset)),
        ]
    };
    for (role, pod) in pods(&plan) {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("fleet-tls"))
            .unwrap_or_else(|| panic!("{role}: no volume of the TLS Secret"));
        let c = main_container(&pod);
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .unwrap_or_else(|| panic!("{role}: the TLS Secret is not mounted"));
        assert_eq!(mount.read_only, Some(true), "{role}");
        for (flag, file) in [
            ("--tls-cert", "tls.crt"),
            ("--tls-key", "tls.key"),
            ("--tls-ca", "ca.crt"),
        ] {
            assert_eq!(
                arg_after(c, flag),
                Some(format!("{}/{file}", mount.mount_path)),
                "{role} {flag}"
            );
        }
        let probes = [&c.startup_probe, &c.readiness_probe, &c.liveness_probe];
        for probe in probes.into_iter().map(|p| p.as_ref().expect("probe")) {
            if role == "router" {
                assert!(probe.http_get.is_some(), "the router's HTTP probes are unchanged");
                continue;
            }
            assert!(probe.grpc.is_none(), "{role}: the kubelet's gRPC probe speaks no TLS");
            let command = probe.exec.as_ref().and_then(|e| e.command.clone()).expect("exec probe");
            assert_eq!(&command[..2], ["dsv3-worker", "probe"], "{role}");
            let i = command
                .iter()
                .position(|a| a == "--tls-server-name")
                .expect("server name");
            // The name the first pod of the role is dialled at, which the certificate covers.
            assert_eq!(
                command[i + 1],
                format!("{name}-{role}-0.{name}-{role}.{ns}.svc"),
                "{role}"
            );
            let timeout = command
                .iter()
                .position(|a| a == "--timeout")
                .map(|i| command[i + 1].clone());
            assert!(
                timeout.and_then(|t| t.parse::<i32>().ok()) < probe.timeout_seconds,
                "{role}: the probe answers before the kubelet gives up"
            );
        }
    }
    // Without the section: no Secret, no flags, the kubelet's gRPC probes.
    for (role, pod) in pods(&plain) {
        let c = main_container(&pod);
        assert!(arg_after(c, "--tls-cert").is_none(), "{role}");
        assert!(pod.volumes.iter().flatten().all(|v| v.secret.is_none()), "{role}");
        if role != "router" {
            assert!(
                c.readiness_probe.as_ref().and_then(|p| p.grpc.as_ref()).is_some(),
                "{role}"
            );
        }
    }
}

#[test]
fn masking_unavailable_experts_is_passed_to_the_attention_ranks_only() {
    use crate::crd::UnavailableExperts;
    let mut cr = sample("h200-single-node.yaml");
    let args = |p: &Plan, role: &str| {
        let pod = match role {
            "attention" => pod_spec_sts(&p.attention_statefulset),
            _ => pod_spec_sts(&p.expert_statefulset),
        };
        main_container(&pod).args.clone().unwrap_or_default().join(" ")
    };
    let plain = plan_of(&cr);
    assert!(
        !args(&plain, "attention").contains("--unavailable-experts"),
        "the default is not spelled out"
    );
    cr.spec.experts.unavailable = UnavailableExperts::Mask;
    let masked = plan_of(&cr);
    assert!(args(&masked, "attention").contains("--unavailable-experts mask"));
    assert!(!args(&masked, "expert").contains("--unavailable-experts"));
}

/// The plan of `cr` with its generation in `slot`, the routers sending to `serving`.
fn plan_in(cr: &DeepSeekV3Deployment, slot: Slot, serving: Option<FleetGeneration>) -> Plan {
    let input = PlanInput {
        slot,
        serving,
        ..PlanInput::model_downloaded(cr)
    };
    planner::plan(cr, &input).unwrap_or_else(|e| panic!("plan failed: {e}"))
}

/// Whether `selector` selects a pod with `labels` (matchLabels, and the In / NotIn / Exists /
/// DoesNotExist expressions as the API server reads them).
fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match (e.operator.as_str(), labels.get(&e.key)) {
            ("In", Some(v)) => values.contains(v),
            ("NotIn", v) => v.is_none_or(|v| !values.contains(v)),
            ("Exists", v) => v.is_some(),
            ("DoesNotExist", v) => v.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// The attention and expert disruption budgets are per slot: each is named as its slot's
/// StatefulSet and selects that set's pods and not the other slot's, and the expert budget is
/// sized by its own generation's placement.
#[test]
fn each_slot_has_its_own_disruption_budgets() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.experts.redundant_experts = cr.spec.model.num_routed_experts; // every expert twice
    let blue = plan_in(&cr, Slot::Blue, None);
    let green = plan_in(&cr, Slot::Green, None);
    let pod_labels = |set: &k8s_openapi::api::apps::v1::StatefulSet| {
        set.spec
            .as_ref()
            .expect("spec")
            .template
            .metadata
            .as_ref()
            .expect("meta")
            .labels
            .clone()
            .unwrap_or_default()
    };
    for role in [Role::Attention, Role::Expert] {
        let (blue_set, green_set) = match role {
            Role::Attention => (&blue.attention_statefulset, &green.attention_statefulset),
            _ => (&blue.expert_statefulset, &green.expert_statefulset),
        };
        for (plan, own, other) in [(&blue, blue_set, green_set), (&green, green_set, blue_set)] {
            let name = own.metadata.name.clone().expect("name");
            let pdb = plan
                .pdbs
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("no budget named {name}"));
            let selector = pdb.spec.as_ref().and_then(|s| s.selector.as_ref()).expect("selector");
            assert!(selects(selector, &pod_labels(own)), "{name} selects its own pods");
            assert!(
                !selects(selector, &pod_labels(other)),
                "{name} leaves the other slot's pods alone"
            );
            if role == Role::Expert {
                assert_eq!(
                    max_unavailable(pdb),
                    Some(1),
                    "{name}: one shard of a doubled placement"
                );
            }
        }
    }
    // The routers are one Deployment across generations: one budget.
    for plan in [&blue, &green] {
        let router = plan
            .pdbs
            .iter()
            .filter(|p| p.metadata.name.as_deref() == Some("tiny-router"))
            .count();
        assert_eq!(router, 1);
    }
}

#[test]
fn a_generation_in_the_green_slot_has_its_own_sets_reaching_only_each_other() {
    for name in SAMPLES {
        let cr = sample(name);
        let blue = plan_in(&cr, Slot::Blue, None);
        let green = plan_in(&cr, Slot::Green, None);
        assert_eq!(
            blue.generation.revision, green.generation.revision,
            "{name}: one revision in either slot"
        );
        let instance = cr.metadata.name.clone().expect("name");
        for (role, b, g) in [
            (
                Role::Attention,
                &blue.attention_statefulset,
                &green.attention_statefulset,
            ),
            (Role::Expert, &blue.expert_statefulset, &green.expert_statefulset),
        ] {
            let base = format!("{instance}-{}", role.as_str());
            assert_eq!(b.metadata.name.as_deref(), Some(base.as_str()));
            assert_eq!(g.metadata.name, Some(format!("{base}-green")));
            let (bs, gs) = (b.spec.as_ref().expect("spec"), g.spec.as_ref().expect("spec"));
            // One headless Service per role serves both slots' pod names.
            assert_eq!(gs.service_name.as_deref(), Some(base.as_str()));
            assert_eq!(bs.service_name, gs.service_name);
            let selector = gs.selector.match_labels.clone().unwrap_or_default();
            assert_eq!(selector.get(LABEL_SLOT).map(String::as_str), Some("green"), "{name}");
            let labels = gs
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            assert!(
                selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
                "{name}: the selector matches its pods"
            );
            // Blue keeps the selector it always had, and its pods no slot label.
            assert!(!bs
                .selector
                .match_labels
                .clone()
                .unwrap_or_default()
                .contains_key(LABEL_SLOT));
            let blue_labels = bs
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            assert!(!blue_labels.contains_key(LABEL_SLOT));
            for (set, slot) in [(b, "blue"), (g, "green")] {
                let l = set.metadata.labels.clone().unwrap_or_default();
                assert_eq!(l.get(LABEL_SLOT).map(String::as_str), Some(slot));
                assert_eq!(l.get(LABEL_REVISION), Some(&blue.generation.revision));
            }
        }
        let peers = arg_after(
            main_container(&pod_spec_sts(&green.attention_statefulset)),
            "--expert-peers",
        )
        .expect("expert peers");
        for (i, p) in peers.split(',').enumerate() {
            assert_eq!(
                p,
                format!(
                    "{instance}-expert-green-{i}.{instance}-expert.{}.svc:{WORKER_PORT}",
                    cr.metadata.namespace.as_deref().unwrap_or_default()
                ),
                "{name}"
            );
        }
        // With nothing else serving, the routers send to the planned generation.
        let routers = arg_after(
            main_container(&pod_spec_deploy(&green.router_deployment)),
            "--attention-peers",
        )
        .expect("attention peers");
        assert!(
            routers
                .split(',')
                .all(|p| p.starts_with(&format!("{instance}-attention-green-"))),
            "{routers}"
        );
    }
}

#[test]
fn until_the_switch_the_routers_keep_the_serving_generations_peers_and_image() {
    let cr = sample("tiny-cpu.yaml");
    let serving = plan_in(&cr, Slot::Blue, None).generation;
    let mut newer = cr.clone();
    newer.spec.image = "registry.example/dsv3-worker:next".into();
    let rolling = plan_in(&newer, Slot::Green, Some(serving.clone()));
    assert_ne!(rolling.generation.revision, serving.revision);
    let router = main_container(&pod_spec_deploy(&rolling.router_deployment)).clone();
    assert_eq!(router.image.as_deref(), Some(serving.image.as_str()));
    let peers = arg_after(&router, "--attention-peers").expect("peers");
    assert_eq!(
        peers,
        arg_after(
            main_container(&pod_spec_deploy(&plan_of(&cr).router_deployment)),
            "--attention-peers"
        )
        .expect("peers")
    );
    for set in [&rolling.attention_statefulset, &rolling.expert_statefulset] {
        assert_eq!(
            main_container(&pod_spec_sts(set)).image.as_deref(),
            Some("registry.example/dsv3-worker:next")
        );
    }
    // Switched: the same plan without a separate serving generation.
    let switched = plan_in(&newer, Slot::Green, None);
    let router = main_container(&pod_spec_deploy(&switched.router_deployment)).clone();
    assert_eq!(router.image.as_deref(), Some("registry.example/dsv3-worker:next"));
    assert!(arg_after(&router, "--attention-peers")
        .expect("peers")
        .contains("-attention-green-0."));
}

#[test]
fn the_revision_follows_the_expert_pods_and_the_image_not_the_attention_template_alone() {
    let base = sample("tiny-cpu.yaml");
    let revision = |cr: &DeepSeekV3Deployment| plan_of(cr).generation.revision;
    let r0 = revision(&base);
    let mut speculating = base.clone();
    speculating.spec.mtp.enabled = !base.spec.mtp.enabled;
    assert_eq!(revision(&speculating), r0, "the attention ranks roll in place for it");
    let mut scaled = base.clone();
    scaled.spec.attention.replicas += 1;
    assert_eq!(revision(&scaled), r0);
    let mut image = base.clone();
    image.spec.image = "registry.example/dsv3-worker:next".into();
    let mut placement = base.clone();
    placement.spec.experts.redundant_experts = 0;
    let mut masking = base.clone();
    masking
        .spec
        .experts
        .pod
        .pod_annotations
        .insert("example.com/note".into(), "x".into());
    for (what, cr) in [
        ("image", &image),
        ("placement", &placement),
        ("expert template", &masking),
    ] {
        assert_ne!(revision(cr), r0, "{what} makes a new generation");
    }
}

/// Over NCCL, every rank's container gets NVLink multicast off; over gRPC the planner sets no
/// NCCL variable (existing fleets' pods are not rolled).
#[test]
fn nccl_fleets_set_the_nccl_environment_of_every_rank() {
    let nccl_vars = |plan: &Plan| -> Vec<Vec<(String, String)>> {
        [&plan.attention_statefulset, &plan.expert_statefulset]
            .iter()
            .map(|set| {
                let v = serde_json::to_value(set).expect("serializes");
                v["spec"]["template"]["spec"]["containers"][0]["env"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|e| {
                        let name = e["name"].as_str()?;
                        name.starts_with("NCCL_")
                            .then(|| (name.to_string(), e["value"].as_str().unwrap_or("").to_string()))
                    })
                    .collect()
            })
            .collect()
    };
    let nvls = ("NCCL_NVLS_ENABLE".to_string(), "0".to_string());
    let mut cr = sample("h200-single-node.yaml");
    for set in nccl_vars(&plan_of(&cr)) {
        assert!(!set.contains(&nvls), "gRPC fleet with NCCL settings: {set:?}");
    }
    cr.spec.data_plane = crate::crd::DataPlane::Nccl;
    for set in nccl_vars(&plan_of(&cr)) {
        assert!(set.contains(&nvls), "{set:?}");
        let names: Vec<&String> = set.iter().map(|(n, _)| n).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(names.len(), unique.len(), "a variable set twice: {set:?}");
    }
}
