//! Reconcile tests against the in-memory API server (kube-rs's tower-test pattern).

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::{json, Value};

use crate::controller::{
    error_policy, reconcile, Context, BACKOFF_BASE, FINALIZER, REQUEUE_BLOCKED, REQUEUE_CUTOVER, REQUEUE_PROGRESSING,
    REQUEUE_READY,
};
use crate::crd::{DeepSeekV3Deployment, FleetGeneration, RolloutStrategy, Slot, UnavailableExperts};
use crate::fixtures::FakeApi;
use crate::metrics::Metrics;
use crate::planner::{self, PlanInput};
use crate::testutil::sample;

fn cr_path(ns: &str, name: &str) -> String {
    format!("/apis/dsv3.io/v1alpha1/namespaces/{ns}/deepseekv3deployments/{name}")
}
fn sts_path(ns: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}")
}
fn deploy_path(ns: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
}
fn core_path(ns: &str, kind: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{ns}/{kind}/{name}")
}
fn pdb_path(ns: &str, name: &str) -> String {
    format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{name}")
}

struct Harness {
    fake: FakeApi,
    ctx: Arc<Context>,
    ns: String,
    name: String,
}

impl Harness {
    fn new(cr: &DeepSeekV3Deployment) -> Self {
        let fake = FakeApi::default();
        let ctx = Arc::new(Context::new(
            fake.client(),
            Arc::new(Metrics::default()),
            Some("test".into()),
        ));
        let ns = cr.metadata.namespace.clone().expect("namespace");
        let name = cr.metadata.name.clone().expect("name");
        let value = serde_json::to_value(cr).expect("serializes");
        fake.put(&cr_path(&ns, &name), value);
        Self { fake, ctx, ns, name }
    }

    fn with_pvc(self, claim: &str) -> Self {
        self.fake.put(
            &core_path(&self.ns, "persistentvolumeclaims", claim),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": claim, "namespace": self.ns}, "status": {"phase": "Bound"}}),
        );
        self
    }

    fn with_secret(self, name: &str) -> Self {
        self.fake.put(
            &core_path(&self.ns, "secrets", name),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": self.ns}}),
        );
        self
    }

    fn cr(&self) -> DeepSeekV3Deployment {
        let v = self.fake.get(&cr_path(&self.ns, &self.name)).expect("CR stored");
        serde_json::from_value(v).expect("CR deserializes")
    }

    fn status(&self) -> Value {
        self.fake
            .get(&cr_path(&self.ns, &self.name))
            .and_then(|v| v.get("status").cloned())
            .unwrap_or(Value::Null)
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let st = self.status();
        let c = st["conditions"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["type"] == type_).cloned())
            .unwrap_or_else(|| panic!("no {type_} condition in {st}"));
        (
            c["status"].as_str().unwrap_or_default().to_string(),
            c["reason"].as_str().unwrap_or_default().to_string(),
        )
    }

    fn condition_message(&self, type_: &str) -> String {
        let st = self.status();
        st["conditions"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["type"] == type_))
            .and_then(|c| c["message"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    async fn reconcile(&self) -> Result<Action, crate::controller::Error> {
        reconcile(Arc::new(self.cr()), self.ctx.clone()).await
    }

    /// Finalizer first, then the first real apply.
    async fn create(&self) -> Action {
        let first = self.reconcile().await.expect("finalizer reconcile");
        assert_eq!(
            first,
            Action::await_change(),
            "adding the finalizer ends the first pass"
        );
        self.reconcile().await.expect("apply reconcile")
    }

    fn edit_spec(&self, f: impl FnOnce(&mut Value)) {
        self.fake.edit(&cr_path(&self.ns, &self.name), |o| {
            f(&mut o["spec"]);
            let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
            o["metadata"]["generation"] = json!(g + 1);
        });
    }

    /// Every pod of the tiny sample's blue slot (2 attention ranks, 4 shards) and its router
    /// ready.
    fn set_tiny_fleet_ready(&self) {
        self.set_sts_status("attention", 2, 2);
        self.set_sts_status("expert", 4, 4);
        self.set_router_status(1);
    }

    /// Sets the status of the blue slot's StatefulSet of `role`.
    fn set_sts_status(&self, role: &str, replicas: i64, ready: i64) {
        self.set_named_sts_status(&format!("{}-{role}", self.name), replicas, ready);
    }

    /// Sets the status of the StatefulSet called `set` (a role's, in either slot).
    fn set_named_sts_status(&self, set: &str, replicas: i64, ready: i64) {
        let path = sts_path(&self.ns, set);
        self.fake.edit(&path, |o| {
            let g = o["metadata"]["generation"].clone();
            o["status"] = json!({"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas,
                                 "currentReplicas": replicas, "observedGeneration": g});
        });
    }

    /// The router Deployment as the API server holds it.
    fn router(&self) -> Value {
        self.fake
            .get(&deploy_path(&self.ns, &format!("{}-router", self.name)))
            .expect("router")
    }

    fn set_router_status(&self, ready: i64) {
        let path = deploy_path(&self.ns, &format!("{}-router", self.name));
        self.fake.edit(&path, |o| {
            let g = o["metadata"]["generation"].clone();
            o["status"] = json!({"replicas": ready, "readyReplicas": ready, "updatedReplicas": ready,
                                 "availableReplicas": ready, "observedGeneration": g});
        });
    }

    fn events(&self) -> Vec<(String, String)> {
        self.fake
            .log()
            .into_iter()
            .filter(|r| r.path.contains("/events"))
            .filter_map(|r| {
                let reason = r.body.get("reason")?.as_str()?.to_string();
                let type_ = r.body.get("type")?.as_str()?.to_string();
                Some((reason, type_))
            })
            .collect()
    }

    fn resource_versions(&self) -> Vec<(String, String)> {
        self.fake
            .paths()
            .into_iter()
            .filter(|p| !p.contains("deepseekv3deployments") && !p.contains("/events/"))
            .map(|p| {
                let rv = self
                    .fake
                    .get(&p)
                    .and_then(|o| o["metadata"]["resourceVersion"].as_str().map(str::to_string))
                    .unwrap_or_default();
                (p, rv)
            })
            .collect()
    }
}

fn changed_paths(before: &[(String, String)], after: &[(String, String)]) -> Vec<String> {
    after
        .iter()
        .filter(|(p, rv)| before.iter().find(|(q, _)| q == p).is_none_or(|(_, old)| old != rv))
        .map(|(p, _)| p.clone())
        .collect()
}

#[tokio::test]
async fn create_applies_every_child_with_one_field_manager_and_reports_progress() {
    let cr = sample("tiny-cpu.yaml");
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    let action = h.create().await;
    assert_eq!(action, Action::requeue(REQUEUE_PROGRESSING));
    assert_eq!(h.cr().metadata.finalizers, Some(vec![FINALIZER.to_string()]));

    let plan = planner::plan(&h.cr(), &PlanInput::default()).expect("plan");
    let applies: Vec<_> = h
        .fake
        .log()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.content_type.starts_with("application/apply-patch"))
        .collect();
    let objects = plan.objects().expect("objects");
    // Every child once, plus the status.
    assert_eq!(
        applies.len(),
        objects.len() + 1,
        "{:#?}",
        applies.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    for r in &applies {
        assert!(r.query.contains("fieldManager=dsv3-operator"), "{}?{}", r.path, r.query);
        assert!(r.query.contains("force=true"), "{}?{}", r.path, r.query);
    }
    for (kind, name) in [("statefulsets", "tiny-attention"), ("statefulsets", "tiny-expert")] {
        let o = h
            .fake
            .get(&format!("/apis/apps/v1/namespaces/default/{kind}/{name}"))
            .expect("child stored");
        assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "uid-tiny-cpu.yaml");
    }
    assert!(h.fake.get(&deploy_path("default", "tiny-router")).is_some());
    assert!(h
        .fake
        .get(&core_path(
            "default",
            "configmaps",
            &format!("tiny-placement-{}", plan.placement.version)
        ))
        .is_some());

    let st = h.status();
    assert_eq!(st["phase"], "Progressing");
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["placementVersion"], plan.placement.version.as_str());
    assert_eq!(
        st["selector"],
        planner::selector_string("tiny", planner::Role::Attention).as_str()
    );
    assert_eq!(h.condition("Ready"), ("False".into(), "WaitingForPods".into()));
    assert_eq!(h.condition("Progressing").0, "True");
    assert_eq!(h.condition("Degraded").0, "False");
    assert!(
        h.events().contains(&("Applied".into(), "Normal".into())),
        "{:?}",
        h.events()
    );
}

#[tokio::test]
async fn a_pod_the_scheduler_cannot_place_shows_in_the_status_with_its_reason() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.create().await;
    let why = "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available";
    let pod = |name: &str, scheduled: Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "default",
                            "labels": {"app.kubernetes.io/name": "dsv3", "app.kubernetes.io/instance": "tiny",
                                       "app.kubernetes.io/component": "expert"}},
               "status": {"conditions": [scheduled]}})
    };
    h.fake.put(
        &core_path("default", "pods", "tiny-expert-0"),
        pod("tiny-expert-0", json!({"type": "PodScheduled", "status": "True"})),
    );
    h.fake.put(
        &core_path("default", "pods", "tiny-expert-1"),
        pod(
            "tiny-expert-1",
            json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}),
        ),
    );
    // Another fleet's stuck pod is not this fleet's business.
    let mut other = pod(
        "other-expert-0",
        json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "elsewhere"}),
    );
    other["metadata"]["labels"]["app.kubernetes.io/instance"] = json!("other");
    h.fake.put(&core_path("default", "pods", "other-expert-0"), other);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.condition("Progressing"), ("True".into(), "Unschedulable".into()));
    assert_eq!(h.condition("Ready"), ("False".into(), "Unschedulable".into()));
    let message = h.condition_message("Progressing");
    assert!(
        message.contains("pod tiny-expert-1 cannot be scheduled: 0/3 nodes are available"),
        "{message}"
    );
    assert!(!message.contains("elsewhere"), "{message}");
    // Once placed, the status says the usual wait again.
    h.fake.edit(&core_path("default", "pods", "tiny-expert-1"), |o| {
        o["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True"}]);
    });
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.condition("Ready"), ("False".into(), "WaitingForPods".into()));
    assert_ne!(h.condition("Progressing").1, "Unschedulable");
}

#[tokio::test]
async fn a_container_past_its_restart_budget_fails_the_fleet_with_why() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.create().await;
    let pod = |restarts: i64| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "tiny-attention-1", "namespace": "default",
                            "labels": {"app.kubernetes.io/name": "dsv3", "app.kubernetes.io/instance": "tiny",
                                       "app.kubernetes.io/component": "attention"}},
               "status": {"containerStatuses": [{
                   "name": "attention", "image": "x", "imageID": "", "ready": false, "restartCount": restarts,
                   "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                                "message": "loading attention rank 1: model.safetensors.index.json is missing"}}}]}})
    };
    // Below the budget (5 by default): still the usual wait.
    h.fake.put(&core_path("default", "pods", "tiny-attention-1"), pod(4));
    h.reconcile().await.expect("reconcile");
    assert_ne!(h.status()["phase"], "Failed");
    h.fake.put(&core_path("default", "pods", "tiny-attention-1"), pod(5));
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["phase"], "Failed");
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "RestartBudgetExhausted".into())
    );
    assert_eq!(
        h.condition("Progressing"),
        ("False".into(), "RestartBudgetExhausted".into())
    );
    let message = h.condition_message("Degraded");
    assert!(
        message.contains("tiny-attention-1/attention restarted 5 times")
            && message
                .contains("Error, exit code 1: loading attention rank 1: model.safetensors.index.json is missing"),
        "{message}"
    );
}

#[tokio::test]
async fn spec_change_rewrites_only_the_objects_that_changed() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.create().await;
    let before = h.resource_versions();
    h.fake.clear_log();
    h.edit_spec(|s| s["router"]["replicas"] = json!(3));
    h.reconcile().await.expect("reconcile");
    let after = h.resource_versions();
    assert_eq!(
        changed_paths(&before, &after),
        vec![deploy_path("default", "tiny-router")],
        "server-side apply of unchanged objects is a no-op"
    );
    let d = h.fake.get(&deploy_path("default", "tiny-router")).expect("router");
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(h.status()["observedGeneration"], 2);
    assert!(h.events().contains(&("Applied".into(), "Normal".into())));
}

#[tokio::test]
async fn scaling_attention_keeps_expert_pods_untouched() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.create().await;
    let before = h.resource_versions();
    // What `kubectl scale deepseekv3deployment tiny --replicas=4` writes through the scale subresource.
    h.edit_spec(|s| s["attention"]["replicas"] = json!(4));
    h.reconcile().await.expect("reconcile");
    let changed = changed_paths(&before, &h.resource_versions());
    assert!(changed.contains(&sts_path("default", "tiny-attention")), "{changed:?}");
    assert!(!changed.contains(&sts_path("default", "tiny-expert")), "{changed:?}");
    let sts = h.fake.get(&sts_path("default", "tiny-attention")).expect("attention");
    assert_eq!(sts["spec"]["replicas"], 4);
    let router = h.fake.get(&deploy_path("default", "tiny-router")).expect("router");
    let args = router["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    let peers = args
        .as_array()
        .and_then(|a| {
            let i = a.iter().position(|x| x == "--attention-peers")?;
            a.get(i + 1)?.as_str().map(str::to_string)
        })
        .expect("peers");
    assert_eq!(peers.split(',').count(), 4);
}

#[tokio::test]
async fn children_becoming_ready_make_the_fleet_ready_and_a_lost_shard_degrades_it() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.set_tiny_fleet_ready();
    h.fake.clear_log();
    let action = h.reconcile().await.expect("reconcile");
    assert_eq!(action, Action::requeue(REQUEUE_READY));
    let st = h.status();
    assert_eq!(st["phase"], "Ready");
    assert_eq!(st["readyRoles"], "3/3");
    assert_eq!(st["replicas"], 2);
    assert_eq!(st["experts"]["summary"], "4/4");
    assert_eq!(h.condition("Ready"), ("True".into(), "AllRolesReady".into()));
    assert_eq!(h.condition("Progressing"), ("False".into(), "RolloutComplete".into()));
    assert!(
        h.events().contains(&("Ready".into(), "Normal".into())),
        "{:?}",
        h.events()
    );

    // An expert pod dies: every shard is needed, so the fleet stops serving and says why.
    h.set_sts_status("expert", 4, 3);
    h.fake.clear_log();
    h.reconcile().await.expect("reconcile");
    let st = h.status();
    assert_eq!(st["phase"], "Degraded");
    assert_eq!(h.condition("Ready"), ("False".into(), "ExpertShardUnavailable".into()));
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "ExpertShardUnavailable".into())
    );
    assert!(h
        .events()
        .contains(&("ExpertShardUnavailable".into(), "Warning".into())));

    // One attention rank short: still serving, but degraded.
    h.set_sts_status("expert", 4, 4);
    h.set_sts_status("attention", 2, 1);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["phase"], "Degraded");
    assert_eq!(h.condition("Ready"), ("True".into(), "Serving".into()));
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "AttentionRankUnavailable".into())
    );
}

#[tokio::test]
async fn with_a_copy_of_every_expert_a_lost_shard_degrades_but_keeps_serving() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.experts.redundant_experts = cr.spec.model.num_routed_experts;
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.set_sts_status("attention", 2, 2);
    h.set_router_status(1);
    h.set_sts_status("expert", 4, 3);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["phase"], "Degraded");
    assert_eq!(h.condition("Ready"), ("True".into(), "Serving".into()));
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "ExpertShardUnavailable".into())
    );
    // A second shard lost: some expert may have lost both copies.
    h.set_sts_status("expert", 4, 2);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.condition("Ready"), ("False".into(), "ExpertShardUnavailable".into()));
}

#[tokio::test]
async fn with_unavailable_experts_masked_the_fleet_serves_while_one_shard_is_left() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.experts.unavailable = UnavailableExperts::Mask;
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.set_sts_status("attention", 2, 2);
    h.set_router_status(1);
    // Three of four shards lost, experts with one copy among them: masked, still serving.
    h.set_sts_status("expert", 4, 1);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.condition("Ready"), ("True".into(), "Serving".into()));
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "ExpertShardUnavailable".into())
    );
    h.set_sts_status("expert", 4, 0);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.condition("Ready"), ("False".into(), "ExpertShardUnavailable".into()));
}

#[tokio::test]
async fn recreated_a_placement_change_stops_the_old_version_before_the_new_starts() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.rollout.strategy = RolloutStrategy::Recreate;
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.set_tiny_fleet_ready();
    h.reconcile().await.expect("reconcile");
    let v1 = h.status()["placementVersion"].as_str().expect("version").to_string();

    h.edit_spec(|s| s["experts"]["redundantExperts"] = json!(0));
    h.fake.clear_log();
    let action = h.reconcile().await.expect("reconcile");
    assert_eq!(action, Action::requeue(REQUEUE_CUTOVER));
    for role in ["attention", "expert"] {
        let sts = h.fake.get(&sts_path("default", &format!("tiny-{role}"))).expect("sts");
        assert_eq!(
            sts["spec"]["replicas"], 0,
            "{role} is stopped before the new plan starts"
        );
    }
    assert_eq!(
        h.status()["placementVersion"],
        v1.as_str(),
        "old version still recorded"
    );
    assert_eq!(h.condition("Progressing"), ("True".into(), "Recreating".into()));
    assert!(h.events().contains(&("Recreating".into(), "Normal".into())));

    // Pods still terminating: stay stopped.
    h.reconcile().await.expect("reconcile");
    let sts = h.fake.get(&sts_path("default", "tiny-expert")).expect("sts");
    assert_eq!(sts["spec"]["replicas"], 0);

    // Both sets drained: the new version starts on both.
    h.set_sts_status("attention", 0, 0);
    h.set_sts_status("expert", 0, 0);
    h.fake.clear_log();
    h.reconcile().await.expect("reconcile");
    let v2 = h.status()["placementVersion"].as_str().expect("version").to_string();
    assert_ne!(v1, v2);
    for (role, n) in [("attention", 2), ("expert", 4)] {
        let sts = h.fake.get(&sts_path("default", &format!("tiny-{role}"))).expect("sts");
        assert_eq!(sts["spec"]["replicas"], n);
        assert_eq!(
            sts["spec"]["template"]["metadata"]["labels"]["dsv3.io/placement-version"],
            v2.as_str()
        );
    }
    assert!(h
        .fake
        .get(&core_path("default", "configmaps", &format!("tiny-placement-{v1}")))
        .is_none());
    assert!(h
        .fake
        .get(&core_path("default", "configmaps", &format!("tiny-placement-{v2}")))
        .is_some());
    assert!(h.events().contains(&("GenerationActivated".into(), "Normal".into())));
}

/// A fleet whose status predates generations (no `serving`) sees a placement change through
/// the cut-over: stopped until drained, however many reconciles that takes.
#[tokio::test]
async fn a_fleet_from_before_generations_recreates_a_placement_change_to_the_end() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.set_tiny_fleet_ready();
    h.reconcile().await.expect("reconcile");
    h.fake.edit(&cr_path("default", "tiny"), |o| {
        o["status"].as_object_mut().map(|s| s.remove("serving"));
    });
    // Nor did its routers' Deployment record a generation.
    h.fake.edit(&deploy_path("default", "tiny-router"), |o| {
        o["metadata"].as_object_mut().map(|m| m.remove("annotations"));
    });
    h.edit_spec(|s| s["experts"]["redundantExperts"] = json!(0));
    for _ in 0..2 {
        h.reconcile().await.expect("reconcile");
        for role in ["attention", "expert"] {
            let sts = h.fake.get(&sts_path("default", &format!("tiny-{role}"))).expect("sts");
            assert_eq!(sts["spec"]["replicas"], 0, "{role} stays stopped until drained");
        }
    }
    h.set_sts_status("attention", 0, 0);
    h.set_sts_status("expert", 0, 0);
    h.reconcile().await.expect("reconcile");
    let sts = h.fake.get(&sts_path("default", "tiny-expert")).expect("sts");
    assert_eq!(sts["spec"]["replicas"], 4, "{}", h.status());
}

/// The value after `flag` in a pod template's first container's arguments.
fn arg_of(template_owner: &Value, flag: &str) -> String {
    let args = &template_owner["spec"]["template"]["spec"]["containers"][0]["args"];
    args.as_array()
        .and_then(|a| {
            let i = a.iter().position(|x| x == flag)?;
            a.get(i + 1)?.as_str().map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no {flag} in {args}"))
}

fn image_of(template_owner: &Value) -> String {
    template_owner["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("image")
        .to_string()
}

/// An image change, blue/green: the new generation starts in the green StatefulSets beside the
/// serving blue ones, which stay untouched; the routers keep the blue peers and the old image
/// until every green pod is ready, then switch in one rollout; the blue sets go only once every
/// router runs the switch. The next change goes back into the blue slot.
#[tokio::test]
async fn a_new_generation_starts_beside_the_serving_one_and_the_routers_switch_when_it_is_ready() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.set_tiny_fleet_ready();
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["phase"], "Ready");
    let blue = h.status()["serving"].clone();
    assert_eq!(blue["slot"], "blue");
    let old_image = blue["image"].as_str().expect("image").to_string();
    let blue_peers = arg_of(&h.router(), "--attention-peers");
    assert!(
        blue_peers.starts_with("tiny-attention-0.tiny-attention."),
        "{blue_peers}"
    );
    let blue_sets = [
        sts_path("default", "tiny-attention"),
        sts_path("default", "tiny-expert"),
    ];
    let before: Vec<Value> = blue_sets.iter().map(|p| h.fake.get(p).expect("blue set")).collect();
    // Each slot's pods have disruption budgets of their own: blue's select pods without a slot.
    let blue_pdbs = [
        pdb_path("default", "tiny-attention"),
        pdb_path("default", "tiny-expert"),
    ];
    let green_pdbs = [
        pdb_path("default", "tiny-attention-green"),
        pdb_path("default", "tiny-expert-green"),
    ];
    let blue_pdbs_before: Vec<Value> = blue_pdbs.iter().map(|p| h.fake.get(p).expect("blue PDB")).collect();
    for pdb in &blue_pdbs_before {
        assert_eq!(
            pdb["spec"]["selector"]["matchExpressions"],
            json!([{"key": "dsv3.io/slot", "operator": "DoesNotExist"}])
        );
    }

    h.edit_spec(|s| s["image"] = json!("registry.example/dsv3-worker:2"));
    let action = h.reconcile().await.expect("reconcile");
    assert_eq!(action, Action::requeue(REQUEUE_CUTOVER));
    // Green beside blue: blue untouched, the routers unchanged.
    for (p, b) in blue_sets.iter().zip(&before) {
        assert_eq!(&h.fake.get(p).expect("blue set"), b, "{p} is left as it runs");
    }
    let green_attention = h
        .fake
        .get(&sts_path("default", "tiny-attention-green"))
        .expect("green attention");
    let green_experts = h
        .fake
        .get(&sts_path("default", "tiny-expert-green"))
        .expect("green experts");
    assert_eq!(image_of(&green_attention), "registry.example/dsv3-worker:2");
    assert_eq!(image_of(&green_experts), "registry.example/dsv3-worker:2");
    let green_expert_peers = arg_of(&green_attention, "--expert-peers");
    assert!(
        green_expert_peers
            .split(',')
            .all(|p| p.starts_with("tiny-expert-green-") && p.contains(".tiny-expert.default.svc:")),
        "green attention ranks reach green shards only: {green_expert_peers}"
    );
    for set in [&green_attention, &green_experts] {
        assert_eq!(set["spec"]["selector"]["matchLabels"]["dsv3.io/slot"], "green");
        assert_eq!(set["spec"]["template"]["metadata"]["labels"]["dsv3.io/slot"], "green");
    }
    for (p, b) in blue_pdbs.iter().zip(&blue_pdbs_before) {
        assert_eq!(&h.fake.get(p).expect("blue PDB"), b, "{p} is left as it is");
    }
    for p in &green_pdbs {
        let pdb = h.fake.get(p).expect("green PDB");
        assert_eq!(pdb["spec"]["selector"]["matchLabels"]["dsv3.io/slot"], "green", "{p}");
    }
    assert_eq!(arg_of(&h.router(), "--attention-peers"), blue_peers);
    assert_eq!(
        image_of(&h.router()),
        old_image,
        "the routers run the serving generation's image"
    );
    let st = h.status();
    assert_eq!(st["serving"], blue);
    assert_eq!(st["next"]["slot"], "green");
    assert_ne!(st["next"]["revision"], blue["revision"]);
    assert_eq!(h.condition("Ready").0, "True", "blue serves throughout");
    assert_eq!(st["phase"], "Progressing");
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "NewGenerationStarting".into())
    );

    // Half the green shards ready, one that no node has room for: still blue, and the status
    // names the pod and the way out.
    h.set_named_sts_status("tiny-attention-green", 2, 2);
    h.set_named_sts_status("tiny-expert-green", 4, 2);
    let stuck = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tiny-expert-green-3", "namespace": "default",
                     "labels": {"app.kubernetes.io/name": "dsv3", "app.kubernetes.io/instance": "tiny",
                                "app.kubernetes.io/component": "expert", "dsv3.io/slot": "green"}},
        "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                   "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}});
    h.fake.put(&core_path("default", "pods", "tiny-expert-green-3"), stuck);
    h.reconcile().await.expect("reconcile");
    assert_eq!(arg_of(&h.router(), "--attention-peers"), blue_peers);
    assert_eq!(h.status()["serving"], blue);
    let message = h.condition_message("Progressing");
    assert!(
        message.contains("experts 2/4")
            && message.contains("pod tiny-expert-green-3 cannot be scheduled: 0/4 nodes")
            && message.contains("rollout.strategy: Recreate"),
        "{message}"
    );
    h.fake.remove(&core_path("default", "pods", "tiny-expert-green-3"));

    // Every green pod ready: the routers switch, in one rollout, to green peers and image.
    h.set_named_sts_status("tiny-expert-green", 4, 4);
    h.fake.clear_log();
    h.reconcile().await.expect("reconcile");
    let green_peers = arg_of(&h.router(), "--attention-peers");
    assert!(
        green_peers.starts_with("tiny-attention-green-0.tiny-attention."),
        "{green_peers}"
    );
    assert_eq!(image_of(&h.router()), "registry.example/dsv3-worker:2");
    let st = h.status();
    assert_eq!(st["serving"]["slot"], "green");
    assert!(st.get("next").is_none() || st["next"].is_null(), "{st}");
    assert!(h.events().contains(&("GenerationSwitched".into(), "Normal".into())));
    // Old routers may still send to blue: it stays while they roll.
    h.reconcile().await.expect("reconcile");
    assert!(h.fake.get(&blue_sets[0]).is_some() && h.fake.get(&blue_sets[1]).is_some());

    // The Deployment has rolled over, but an old router pod is still stopping (draining its
    // streams through blue), which its status no longer counts: blue stays.
    h.set_router_status(1);
    let stopping = core_path("default", "pods", "tiny-router-old-1");
    h.fake.put(
        &stopping,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "tiny-router-old-1", "namespace": "default",
                            "deletionTimestamp": "2026-12-03T10:00:00Z",
                            "labels": {"app.kubernetes.io/name": "dsv3", "app.kubernetes.io/instance": "tiny",
                                       "app.kubernetes.io/component": "router"}}}),
    );
    h.reconcile().await.expect("reconcile");
    assert!(h.fake.get(&blue_sets[0]).is_some() && h.fake.get(&blue_sets[1]).is_some());

    // Every router runs the switch and none is left stopping: blue goes.
    h.fake.remove(&stopping);
    h.fake.clear_log();
    h.reconcile().await.expect("reconcile");
    assert!(h.fake.get(&blue_sets[0]).is_none() && h.fake.get(&blue_sets[1]).is_none());
    assert!(
        blue_pdbs.iter().all(|p| h.fake.get(p).is_none()),
        "blue's budgets go with it"
    );
    let grants = cluster_role_grants();
    let denied: Vec<_> = h
        .fake
        .log()
        .iter()
        .map(rbac_check)
        .filter(|c| !grants.contains(c))
        .collect();
    assert!(
        denied.is_empty(),
        "deleting a slot needs what deploy/rbac.yaml does not grant: {denied:?}"
    );
    assert!(green_pdbs.iter().all(|p| h.fake.get(p).is_some()));
    assert!(h.fake.get(&pdb_path("default", "tiny-router")).is_some());
    assert!(h.events().contains(&("GenerationStopped".into(), "Normal".into())));
    h.set_named_sts_status("tiny-attention-green", 2, 2);
    h.set_named_sts_status("tiny-expert-green", 4, 4);
    h.set_router_status(1);
    assert_eq!(h.reconcile().await.expect("reconcile"), Action::requeue(REQUEUE_READY));
    assert_eq!(h.status()["phase"], "Ready");

    // The status lost (a fleet restored without it): the routers' Deployment records where they
    // send, so green goes on serving and nothing is started or switched.
    let router_serving: FleetGeneration = serde_json::from_str(
        h.router()["metadata"]["annotations"]["dsv3.io/serving"]
            .as_str()
            .expect("the routers' generation on their Deployment"),
    )
    .expect("a generation");
    assert_eq!(router_serving.slot, Slot::Green);
    let green_sets_before = [
        h.fake.get(&sts_path("default", "tiny-attention-green")),
        h.fake.get(&sts_path("default", "tiny-expert-green")),
    ];
    let router_spec_before = h.router()["spec"].clone();
    h.fake.edit(&cr_path(&h.ns, &h.name), |o| {
        if let Some(m) = o.as_object_mut() {
            m.remove("status");
        }
    });
    assert_eq!(h.reconcile().await.expect("reconcile"), Action::requeue(REQUEUE_READY));
    assert_eq!(h.status()["serving"]["slot"], "green");
    assert_eq!(h.status()["serving"]["revision"], router_serving.revision.as_str());
    assert_eq!(h.router()["spec"], router_spec_before, "the routers stay as they run");
    assert!(h.fake.get(&blue_sets[0]).is_none() && h.fake.get(&blue_sets[1]).is_none());
    assert_eq!(
        [
            h.fake.get(&sts_path("default", "tiny-attention-green")),
            h.fake.get(&sts_path("default", "tiny-expert-green")),
        ],
        green_sets_before
    );

    // Blocked for a while (pod overrides that do not apply): what serves is still known, and
    // once fixed nothing moves.
    let router_before = h.router();
    h.edit_spec(|s| {
        s["attention"]["podOverrides"] = json!({"spec": {"volumes": [{"name": "nope", "$patch": "delete"}]}})
    });
    assert_eq!(h.reconcile().await.expect("blocked"), Action::requeue(REQUEUE_BLOCKED));
    assert_eq!(h.status()["serving"]["slot"], "green");
    h.edit_spec(|s| {
        s["attention"]
            .as_object_mut()
            .map(|a| a.remove("podOverrides"))
            .map(|_| ())
            .unwrap_or(())
    });
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["serving"]["slot"], "green");
    assert_eq!(h.router()["spec"], router_before["spec"], "the routers stay on green");
    assert!(h.fake.get(&blue_sets[0]).is_none());

    // Scaling the attention ranks is no new generation: in place, in green.
    h.edit_spec(|s| s["attention"]["replicas"] = json!(3));
    h.reconcile().await.expect("reconcile");
    let green_attention = h.fake.get(&sts_path("default", "tiny-attention-green")).expect("green");
    assert_eq!(green_attention["spec"]["replicas"], 3);
    assert!(h.fake.get(&blue_sets[0]).is_none());
    assert_eq!(arg_of(&h.router(), "--attention-peers").split(',').count(), 3);

    // The next generation (a new placement) goes back into blue, with its own placement
    // ConfigMap beside the serving one's.
    h.set_named_sts_status("tiny-attention-green", 3, 3);
    h.set_router_status(1);
    let v_green = h.status()["serving"]["placementVersion"]
        .as_str()
        .expect("version")
        .to_string();
    h.edit_spec(|s| s["experts"]["redundantExperts"] = json!(0));
    h.reconcile().await.expect("reconcile");
    let st = h.status();
    assert_eq!(st["next"]["slot"], "blue");
    let v_blue = st["next"]["placementVersion"].as_str().expect("version").to_string();
    assert_ne!(v_blue, v_green);
    assert_eq!(st["placementVersion"], v_green.as_str(), "the serving placement");
    for v in [&v_green, &v_blue] {
        assert!(h
            .fake
            .get(&core_path("default", "configmaps", &format!("tiny-placement-{v}")))
            .is_some());
    }
    let blue_attention = h.fake.get(&blue_sets[0]).expect("blue again");
    assert!(arg_of(&blue_attention, "--expert-peers").starts_with("tiny-expert-0.tiny-expert."));
}

/// While a new generation starts, the attention replica count (the HPA's, through the scale
/// subresource) reaches the serving ranks at once, up to the ranks the serving routers know;
/// the rest of the serving generation and the routers stay as they run, and the serving gang
/// asks for the pods it has.
#[tokio::test]
async fn the_attention_replica_count_reaches_the_serving_ranks_during_a_rollout() {
    let grants = cluster_role_grants();
    for (autoscaled, gang) in [(false, false), (true, false), (false, true)] {
        let mut cr = sample("tiny-cpu.yaml");
        if gang {
            cr.spec.scheduling.gang = Some(crate::crd::GangSpec {
                scheduler: crate::crd::GangScheduler::Volcano,
                queue: None,
                schedule_timeout_seconds: None,
            });
        }
        if autoscaled {
            cr.spec.autoscaling = Some(crate::crd::AutoscalingSpec {
                router: None,
                attention: Some(crate::crd::RoleAutoscaling {
                    min_replicas: 1,
                    max_replicas: 4,
                    target_cpu_utilization: None,
                    target_metric: None,
                    scale_down_stabilization_seconds: 600,
                }),
            });
        }
        let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
        h.create().await;
        h.set_tiny_fleet_ready();
        h.reconcile().await.expect("reconcile");
        let known = h.status()["serving"]["attentionPeers"].as_i64().expect("peers");
        assert_eq!(known, if autoscaled { 4 } else { 2 });
        h.edit_spec(|s| s["image"] = json!("registry.example/dsv3-worker:2"));
        h.reconcile().await.expect("reconcile");
        assert_eq!(h.status()["next"]["slot"], "green", "the rollout is under way");
        let blue_experts = h.fake.get(&sts_path("default", "tiny-expert")).expect("blue experts");
        let router = h.router();
        let replicas = |set: &str| {
            h.fake.get(&sts_path("default", set)).expect("set")["spec"]["replicas"]
                .as_i64()
                .expect("replicas")
        };
        for want in [1, 3] {
            // What the HPA writes through the scale subresource.
            h.edit_spec(|s| s["attention"]["replicas"] = json!(want));
            h.reconcile().await.expect("reconcile");
            let blue_attention = h
                .fake
                .get(&sts_path("default", "tiny-attention"))
                .expect("blue attention");
            assert_eq!(
                replicas("tiny-attention"),
                want.min(known),
                "autoscaled {autoscaled}: the serving ranks follow the count as far as the routers know ranks"
            );
            assert_ne!(
                image_of(&blue_attention),
                "registry.example/dsv3-worker:2",
                "the serving ranks keep their generation"
            );
            assert_eq!(
                replicas("tiny-attention-green"),
                want,
                "the new generation starts at the count"
            );
            assert_eq!(
                h.fake.get(&sts_path("default", "tiny-expert")).expect("blue experts"),
                blue_experts,
                "the serving shards are left as they run"
            );
            assert_eq!(h.router(), router, "the routers are left as they run");
            assert_eq!(h.status()["serving"]["slot"], "blue");
            if gang {
                let group = h
                    .fake
                    .get("/apis/scheduling.volcano.sh/v1beta1/namespaces/default/podgroups/tiny-workers")
                    .expect("the serving gang");
                assert_eq!(
                    group["spec"]["minMember"],
                    want.min(known) + 4,
                    "its ranks and its 4 shards"
                );
            }
        }
        assert!(h.events().contains(&("ServingScaled".into(), "Normal".into())));
        for r in h.fake.log() {
            let need = rbac_check(&r);
            assert!(grants.contains(&need), "deploy/rbac.yaml does not grant {need:?}");
        }
        // Once green is ready the routers switch to it, at the count.
        h.set_named_sts_status("tiny-attention-green", 3, 3);
        h.set_named_sts_status("tiny-expert-green", 4, 4);
        h.reconcile().await.expect("reconcile");
        assert_eq!(h.status()["serving"]["slot"], "green");
        assert_eq!(
            arg_of(&h.router(), "--attention-peers").split(',').count() as i64,
            if autoscaled { 4 } else { 3 }
        );
    }
}

/// A partitioned rollout: the serving generation shrinks to half its attention ranks and the
/// expert pods that hold every expert, the new one starts in the room freed (the rest of the
/// attention ranks and the first half of its expert pods), the routers switch once those are
/// ready, the old generation stops, and the new one grows to its full size. At no point do the
/// two generations together ask for more pods than the fleet has.
#[tokio::test]
async fn a_partitioned_rollout_serves_from_half_of_each_generation_in_the_room_of_one() {
    // Without a copy of every expert there is no half to serve from: blocked, saying why.
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.rollout.strategy = RolloutStrategy::Partitioned;
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.create().await;
    assert_eq!(h.condition("Ready"), ("False".into(), "InvalidTopology".into()));
    let message = h.condition_message("Ready");
    assert!(
        message.contains("partitioned rollout") && message.contains("redundantExperts = 16, not 4"),
        "{message}"
    );

    cr.spec.experts.redundant_experts = 16;
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.set_tiny_fleet_ready();
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["phase"], "Ready");
    // The first two of the four expert pods hold every expert.
    let version = h.status()["serving"]["placementVersion"]
        .as_str()
        .expect("version")
        .to_string();
    let cm = h
        .fake
        .get(&core_path(
            "default",
            "configmaps",
            &format!("tiny-placement-{version}"),
        ))
        .expect("placement");
    let plan: crate::placement::PlacementPlan =
        serde_json::from_str(cm["data"]["placement.json"].as_str().expect("plan")).expect("a plan");
    assert_eq!(plan.covering_prefix(), 2);
    let router = h.router();
    let replicas = |set: &str| {
        h.fake
            .get(&sts_path("default", set))
            .map(|s| s["spec"]["replicas"].as_i64().expect("replicas"))
    };
    let max_unavailable =
        |pdb: &str| h.fake.get(&pdb_path("default", pdb)).expect("budget")["spec"]["maxUnavailable"].clone();
    assert_eq!(
        max_unavailable("tiny-expert"),
        1,
        "one shard may go: its experts have copies"
    );
    // Both generations' pods together: never more than the 2 + 4 of one.
    let pods_asked = || {
        [
            "tiny-attention",
            "tiny-expert",
            "tiny-attention-green",
            "tiny-expert-green",
        ]
        .iter()
        .map(|s| replicas(s).unwrap_or(0))
        .sum::<i64>()
    };

    h.edit_spec(|s| s["image"] = json!("registry.example/dsv3-worker:2"));
    h.reconcile().await.expect("reconcile");
    // First the serving generation shrinks: one rank, the two shards that hold every expert,
    // none of which may now be evicted. Nothing new starts before their pods are gone.
    assert_eq!(
        (replicas("tiny-attention"), replicas("tiny-expert")),
        (Some(1), Some(2))
    );
    assert_eq!(max_unavailable("tiny-expert"), 0);
    assert_eq!(replicas("tiny-attention-green"), None);
    assert_eq!(h.condition("Progressing"), ("True".into(), "ShrinkingServing".into()));
    assert_eq!(h.status()["serving"]["slot"], "blue");
    assert_eq!(h.status()["next"]["slot"], "green");
    assert_eq!(h.condition("Ready").0, "True", "blue serves throughout");
    assert!(h.events().contains(&("ServingPartitioned".into(), "Normal".into())));
    h.reconcile().await.expect("reconcile");
    assert_eq!(
        replicas("tiny-attention-green"),
        None,
        "the stopping pods still hold their room"
    );

    // Blue's pods past its counts are gone: green starts in their room.
    h.set_sts_status("attention", 1, 1);
    h.set_sts_status("expert", 2, 2);
    h.reconcile().await.expect("reconcile");
    assert_eq!(
        (replicas("tiny-attention-green"), replicas("tiny-expert-green")),
        (Some(1), Some(2))
    );
    assert_eq!(pods_asked(), 6);
    assert_eq!(max_unavailable("tiny-expert-green"), 0);
    let green_attention = h.fake.get(&sts_path("default", "tiny-attention-green")).expect("green");
    assert_eq!(
        arg_of(&green_attention, "--expert-peers").split(',').count(),
        4,
        "green's ranks know all four of its shards; the two to come join when they answer"
    );
    assert_eq!(image_of(&green_attention), "registry.example/dsv3-worker:2");
    assert_eq!(h.router(), router, "the routers are left as they run");
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "NewGenerationStarting".into())
    );
    assert_eq!(
        (replicas("tiny-attention"), replicas("tiny-expert")),
        (Some(1), Some(2))
    );

    // Green's half ready: the routers switch to it.
    h.set_named_sts_status("tiny-attention-green", 1, 1);
    h.set_named_sts_status("tiny-expert-green", 2, 2);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["serving"]["slot"], "green");
    assert_eq!(image_of(&h.router()), "registry.example/dsv3-worker:2");
    assert!(h.events().contains(&("GenerationSwitched".into(), "Normal".into())));
    assert!(replicas("tiny-expert").is_some(), "blue stays while the routers roll");
    assert_eq!(pods_asked(), 6);

    h.reconcile().await.expect("reconcile");
    assert_eq!(
        (replicas("tiny-attention-green"), replicas("tiny-expert-green")),
        (Some(1), Some(2)),
        "green grows only into the room blue leaves"
    );

    // Every router runs the switch: blue stops, and once its pods are gone green grows to its
    // full size.
    h.set_router_status(1);
    let stopping = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tiny-expert-1", "namespace": "default",
                     "deletionTimestamp": "2026-12-04T10:00:00Z",
                     "labels": {"app.kubernetes.io/name": "dsv3", "app.kubernetes.io/instance": "tiny",
                                "app.kubernetes.io/component": "expert"}}});
    h.fake.put(&core_path("default", "pods", "tiny-expert-1"), stopping);
    h.reconcile().await.expect("reconcile");
    assert_eq!((replicas("tiny-attention"), replicas("tiny-expert")), (None, None));
    h.reconcile().await.expect("reconcile");
    assert_eq!(
        (replicas("tiny-attention-green"), replicas("tiny-expert-green")),
        (Some(1), Some(2)),
        "a blue pod still stopping holds its room"
    );
    assert!(pods_asked() <= 6);
    h.fake.remove(&core_path("default", "pods", "tiny-expert-1"));
    h.reconcile().await.expect("reconcile");
    assert_eq!(
        (replicas("tiny-attention-green"), replicas("tiny-expert-green")),
        (Some(2), Some(4))
    );
    assert_eq!(max_unavailable("tiny-expert-green"), 1);
    h.set_named_sts_status("tiny-attention-green", 2, 2);
    h.set_named_sts_status("tiny-expert-green", 4, 4);
    h.set_router_status(1);
    assert_eq!(h.reconcile().await.expect("reconcile"), Action::requeue(REQUEUE_READY));
    assert_eq!(h.status()["phase"], "Ready");

    let grants = cluster_role_grants();
    for r in h.fake.log() {
        let need = rbac_check(&r);
        assert!(grants.contains(&need), "deploy/rbac.yaml does not grant {need:?}");
    }
}

/// With a gang, each generation is scheduled as a group of its own, and the old generation's
/// group goes with its StatefulSets.
#[tokio::test]
async fn each_generation_is_its_own_gang() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.scheduling.gang = Some(crate::crd::GangSpec {
        scheduler: crate::crd::GangScheduler::Kai,
        queue: Some("inference".into()),
        schedule_timeout_seconds: None,
    });
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.set_tiny_fleet_ready();
    h.reconcile().await.expect("reconcile");
    let group = |slot| {
        format!(
            "/apis/scheduling.run.ai/v2alpha2/namespaces/default/podgroups/{}",
            planner::pod_group_name("tiny", slot)
        )
    };
    assert!(h.fake.get(&group(crate::crd::Slot::Blue)).is_some());
    h.edit_spec(|s| s["image"] = json!("registry.example/dsv3-worker:2"));
    h.reconcile().await.expect("reconcile");
    let green = h
        .fake
        .get(&group(crate::crd::Slot::Green))
        .expect("the new generation's group");
    assert_eq!(green["spec"]["minMember"], 6);
    assert!(
        h.fake.get(&group(crate::crd::Slot::Blue)).is_some(),
        "the serving gang stays"
    );
    let green_set = h.fake.get(&sts_path("default", "tiny-expert-green")).expect("green");
    assert_eq!(
        green_set["spec"]["template"]["metadata"]["annotations"]["pod-group-name"],
        "tiny-workers-green"
    );
    h.set_named_sts_status("tiny-attention-green", 2, 2);
    h.set_named_sts_status("tiny-expert-green", 4, 4);
    h.reconcile().await.expect("switch");
    h.set_router_status(1);
    h.reconcile().await.expect("old generation stops");
    assert!(h.fake.get(&sts_path("default", "tiny-expert")).is_none());
    assert!(
        h.fake.get(&group(crate::crd::Slot::Blue)).is_none(),
        "its group goes with it"
    );
    assert!(h.fake.get(&group(crate::crd::Slot::Green)).is_some());
}

#[tokio::test]
async fn delete_tears_down_in_order_and_releases_the_finalizer() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.create().await;
    h.fake.edit(&cr_path("default", "tiny"), |o| {
        o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    });
    h.fake.clear_log();
    let action = h.reconcile().await.expect("cleanup");
    assert_eq!(action, Action::await_change());
    let deletes: Vec<String> = h
        .fake
        .log()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    let pos = |p: String| deletes.iter().position(|d| *d == p).unwrap_or(usize::MAX);
    let router = pos(deploy_path("default", "tiny-router"));
    let attention = pos(sts_path("default", "tiny-attention"));
    let experts = pos(sts_path("default", "tiny-expert"));
    assert!(
        router < attention && attention < experts && experts < usize::MAX,
        "{deletes:?}"
    );
    assert!(
        h.fake.get(&cr_path("default", "tiny")).is_none(),
        "finalizer removed, object gone"
    );
    assert!(h.events().contains(&("Deleting".into(), "Normal".into())));
}

#[tokio::test]
async fn api_errors_requeue_with_growing_backoff_and_are_counted() {
    let h = Harness::new(&sample("tiny-cpu.yaml")).with_pvc("dsv3-tiny-model");
    h.reconcile().await.expect("finalizer");
    h.fake.fail("PATCH", "/statefulsets/", 500);
    let cr = Arc::new(h.cr());
    let err = h.reconcile().await.expect_err("apply fails");
    assert_eq!(err.metric_label(), "api");
    assert_eq!(
        error_policy(cr.clone(), &err, h.ctx.clone()),
        Action::requeue(BACKOFF_BASE)
    );
    let err = h.reconcile().await.expect_err("still failing");
    assert_eq!(
        error_policy(cr.clone(), &err, h.ctx.clone()),
        Action::requeue(BACKOFF_BASE * 2)
    );
    assert_eq!(h.ctx.metrics.error_count("api"), 2);
    assert!(h.events().contains(&("ReconcileFailed".into(), "Warning".into())));

    // Recovery resets the backoff.
    h.fake.clear_failures();
    h.reconcile().await.expect("recovers");
    let err = {
        h.fake.fail("PATCH", "/statefulsets/", 503);
        h.reconcile().await.expect_err("fails again")
    };
    assert_eq!(error_policy(cr, &err, h.ctx.clone()), Action::requeue(BACKOFF_BASE));
    assert!(h
        .ctx
        .metrics
        .render()
        .contains("dsv3_operator_reconcile_errors_total{error=\"api\"} 3"));
}

#[tokio::test]
async fn missing_pvc_blocks_with_a_reason_and_a_slow_requeue() {
    let h = Harness::new(&sample("tiny-cpu.yaml"));
    h.reconcile().await.expect("finalizer");
    h.fake.clear_log();
    let action = h.reconcile().await.expect("a missing PVC is not an error");
    assert_eq!(action, Action::requeue(REQUEUE_BLOCKED));
    assert!(REQUEUE_BLOCKED >= Duration::from_secs(30), "no hot loop");
    assert_eq!(h.status()["phase"], "Blocked");
    assert_eq!(h.condition("Ready"), ("False".into(), "ModelVolumeNotFound".into()));
    assert_eq!(h.condition("Degraded"), ("True".into(), "ModelVolumeNotFound".into()));
    let msg = h.status()["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("dsv3-tiny-model"), "{msg}");
    assert!(h.events().contains(&("ModelVolumeNotFound".into(), "Warning".into())));
    assert!(
        h.fake.get(&sts_path("default", "tiny-expert")).is_none(),
        "nothing is built"
    );

    // The PVC appears: the fleet gets built.
    let h = h.with_pvc("dsv3-tiny-model");
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["phase"], "Progressing");
    assert!(h.fake.get(&sts_path("default", "tiny-expert")).is_some());
}

#[tokio::test]
async fn missing_api_key_secret_blocks() {
    let h = Harness::new(&sample("h200-single-node.yaml")).with_pvc("deepseek-v3-weights");
    h.reconcile().await.expect("finalizer");
    let action = h.reconcile().await.expect("not an error");
    assert_eq!(action, Action::requeue(REQUEUE_BLOCKED));
    assert_eq!(h.condition("Ready"), ("False".into(), "SecretNotFound".into()));
    assert!(h.events().contains(&("SecretNotFound".into(), "Warning".into())));
    let h = h.with_secret("deepseek-v3-api-key");
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["phase"], "Progressing");
}

#[tokio::test]
async fn invalid_topology_that_slipped_past_admission_blocks_instead_of_crashing() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.experts.replicas = 3;
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.reconcile().await.expect("finalizer");
    let action = h.reconcile().await.expect("not an error");
    assert_eq!(action, Action::requeue(REQUEUE_BLOCKED));
    assert_eq!(h.condition("Ready"), ("False".into(), "InvalidTopology".into()));
}

fn job_path(ns: &str, name: &str) -> String {
    format!("/apis/batch/v1/namespaces/{ns}/jobs/{name}")
}

/// The tiny sample with its model from the hub instead of a PVC.
fn hub_harness(revision: &str) -> Harness {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.model.source.pvc = None;
    cr.spec.model.source.hub = Some(crate::crd::HubSource {
        repo: "dsv3-test/tiny".into(),
        revision: revision.into(),
        token_secret: Some(crate::crd::SecretKeyRef {
            name: "hf".into(),
            key: "token".into(),
        }),
        cache_claim_name: "hub-cache".into(),
    });
    Harness::new(&cr).with_pvc("hub-cache").with_secret("hf")
}

impl Harness {
    fn download_job(&self) -> String {
        let cr = self.cr();
        let hub = cr.spec.model.source.hub.as_ref().expect("hub source");
        job_path(
            &self.ns,
            &planner::download_job_name(&self.name, &crate::crd::ServedModel::of(hub)),
        )
    }

    fn finish_job(&self, path: &str, succeeded: bool) {
        self.fake.edit(path, |o| {
            o["status"] = if succeeded {
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            } else {
                json!({"failed": 7, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                    "message": "Job has reached the specified backoff limit"}]})
            };
        });
    }

    fn worker_sub_path(&self, role: &str) -> String {
        let sts = self
            .fake
            .get(&sts_path(&self.ns, &format!("{}-{role}", self.name)))
            .expect("statefulset");
        let mounts = &sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"];
        mounts
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "model"))
            .and_then(|m| m["subPath"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    fn sts_replicas(&self, role: &str) -> i64 {
        self.fake
            .get(&sts_path(&self.ns, &format!("{}-{role}", self.name)))
            .and_then(|s| s["spec"]["replicas"].as_i64())
            .unwrap_or(-1)
    }
}

#[tokio::test]
async fn a_hub_model_is_downloaded_once_and_gates_the_fleet_and_a_new_revision_swaps_in_when_verified() {
    let h = hub_harness("main");
    h.create().await;
    let first_job = h.download_job();
    assert!(h.fake.get(&first_job).is_some(), "the download Job is created");
    assert_eq!((h.sts_replicas("attention"), h.sts_replicas("expert")), (0, 0));
    assert_eq!(h.status()["phase"], "Progressing");
    assert_eq!(h.condition("ModelReady"), ("False".into(), "Downloading".into()));
    assert_eq!(h.condition("Ready"), ("False".into(), "ModelDownloading".into()));
    assert!(h.status().get("servedModel").is_none());

    // Verified: the workers start on the revision's directory.
    h.finish_job(&first_job, true);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.condition("ModelReady"), ("True".into(), "Downloaded".into()));
    assert_eq!(h.status()["servedModel"]["revision"], "main");
    assert!(h.sts_replicas("attention") > 0 && h.sts_replicas("expert") > 0);
    assert_eq!(h.worker_sub_path("expert"), "hub/dsv3-test/tiny/main");

    // A new revision downloads beside it; the workers keep running the old one meanwhile.
    h.edit_spec(|s| s["model"]["source"]["hub"]["revision"] = json!("v2"));
    h.reconcile().await.expect("reconcile");
    let second_job = h.download_job();
    assert_ne!(first_job, second_job);
    assert!(h.fake.get(&second_job).is_some());
    assert_eq!(h.condition("ModelReady"), ("False".into(), "Downloading".into()));
    assert!(h
        .condition_message("ModelReady")
        .contains("serving dsv3-test/tiny@main meanwhile"));
    assert_eq!(h.worker_sub_path("expert"), "hub/dsv3-test/tiny/main");
    assert!(h.sts_replicas("expert") > 0);

    // It fails: said, with what to do, and the old revision still serves.
    h.finish_job(&second_job, false);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.condition("ModelReady"), ("False".into(), "DownloadFailed".into()));
    let message = h.condition_message("ModelReady");
    assert!(
        message.contains("backoff limit") && message.contains("delete the Job"),
        "{message}"
    );
    assert_ne!(h.status()["phase"], "Failed");
    assert_eq!(h.worker_sub_path("attention"), "hub/dsv3-test/tiny/main");

    // The user deletes the failed Job, as the message says; the operator creates it afresh.
    assert!(h.fake.remove(&second_job).is_some());
    h.reconcile().await.expect("reconcile");
    let retried = h.fake.get(&second_job).expect("the Job is created again");
    assert!(retried.get("status").is_none(), "a new Job, not the failed one");
    assert_eq!(h.condition("ModelReady"), ("False".into(), "Downloading".into()));

    // Verified: the workers move to v2 and the old Job goes.
    h.finish_job(&second_job, true);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["servedModel"]["revision"], "v2");
    assert_eq!(h.worker_sub_path("attention"), "hub/dsv3-test/tiny/v2");
    assert!(h.fake.get(&first_job).is_none(), "the old revision's Job is deleted");
    assert!(h.fake.get(&second_job).is_some());
}

#[tokio::test]
async fn a_download_job_that_exists_is_left_alone_when_the_image_changes() {
    let h = hub_harness("main");
    h.create().await;
    let job = h.download_job();
    let before = h.fake.get(&job).expect("the download Job");
    // The pod template of a Job is immutable: re-applying it would be refused on every reconcile.
    h.edit_spec(|s| s["image"] = json!("registry.example/dsv3-worker:next"));
    h.reconcile().await.expect("the reconcile goes through");
    assert_eq!(h.fake.get(&job), Some(before), "the running Job is not rewritten");
    assert_eq!(h.status()["observedGeneration"], json!(h.cr().metadata.generation));
    assert_eq!(h.condition("ModelReady"), ("False".into(), "Downloading".into()));
    h.finish_job(&job, true);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.condition("ModelReady"), ("True".into(), "Downloaded".into()));
}

#[tokio::test]
async fn a_first_download_that_fails_fails_the_fleet_with_the_reason() {
    let h = hub_harness("main");
    h.create().await;
    h.finish_job(&h.download_job(), false);
    h.reconcile().await.expect("reconcile");
    assert_eq!(h.status()["phase"], "Failed");
    assert_eq!(h.condition("Ready"), ("False".into(), "ModelDownloadFailed".into()));
    assert_eq!(h.condition("ModelReady"), ("False".into(), "DownloadFailed".into()));
    assert_eq!((h.sts_replicas("attention"), h.sts_replicas("expert")), (0, 0));
}

#[tokio::test]
async fn a_gang_applies_its_pod_group_and_blocks_when_the_scheduler_is_missing() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.scheduling.gang = Some(crate::crd::GangSpec {
        scheduler: crate::crd::GangScheduler::Volcano,
        queue: None,
        schedule_timeout_seconds: None,
    });
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.fake.fail("GET", "/podgroups", 404);
    let first = h.reconcile().await.expect("finalizer");
    assert_eq!(first, Action::await_change());
    assert_eq!(h.reconcile().await.expect("blocked"), Action::requeue(REQUEUE_BLOCKED));
    assert_eq!(h.status()["phase"], "Blocked");
    assert!(h.condition_message("Ready").contains("scheduling.volcano.sh/v1beta1"));

    h.fake.clear_failures();
    h.reconcile().await.expect("reconcile");
    let group = h
        .fake
        .get(&format!(
            "/apis/scheduling.volcano.sh/v1beta1/namespaces/{}/podgroups/{}",
            h.ns,
            planner::pod_group_name(&h.name, crate::crd::Slot::Blue)
        ))
        .expect("the PodGroup is applied");
    assert_eq!(
        group["spec"]["minMember"].as_i64(),
        Some(i64::from(cr.spec.attention.replicas + cr.spec.experts.replicas))
    );
    // The group exists before the pods that name it.
    let writes: Vec<String> = h
        .fake
        .log()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path)
        .collect();
    let position = |part: &str| writes.iter().position(|p| p.contains(part));
    assert!(position("/podgroups/") < position("/statefulsets/"), "{writes:?}");

    // Moved to the other scheduler: the old kind's group goes, the new one is applied.
    h.edit_spec(|s| s["scheduling"]["gang"]["scheduler"] = json!("coscheduling"));
    h.reconcile().await.expect("reconcile");
    let volcano = format!(
        "/apis/scheduling.volcano.sh/v1beta1/namespaces/{}/podgroups/{}",
        h.ns,
        planner::pod_group_name(&h.name, crate::crd::Slot::Blue)
    );
    let coscheduling = volcano.replace("scheduling.volcano.sh/v1beta1", "scheduling.x-k8s.io/v1alpha1");
    assert!(h.fake.get(&volcano).is_none());
    assert!(h.fake.get(&coscheduling).is_some());

    // Switched off: no group is left behind.
    h.edit_spec(|s| s["scheduling"] = json!({}));
    h.reconcile().await.expect("reconcile");
    assert!(h.fake.get(&coscheduling).is_none());
}

#[tokio::test]
async fn pod_overrides_that_do_not_apply_block_with_the_reason() {
    let mut cr = sample("tiny-cpu.yaml");
    cr.spec.attention.pod.pod_overrides = Some(json!({"spec": {"volumes": [{"name": "nope", "$patch": "delete"}]}}));
    let h = Harness::new(&cr).with_pvc("dsv3-tiny-model");
    h.reconcile().await.expect("finalizer");
    assert_eq!(h.reconcile().await.expect("blocked"), Action::requeue(REQUEUE_BLOCKED));
    assert_eq!(h.status()["phase"], "Blocked");
    let message = h.condition_message("Ready");
    assert!(
        message.contains("attention.podOverrides") && message.contains("nope"),
        "{message}"
    );
}

/// The ClusterRole's rules in deploy/rbac.yaml: (apiGroup, resource, verb).
fn cluster_role_grants() -> std::collections::BTreeSet<(String, String, String)> {
    let docs = crate::testutil::documents(&crate::testutil::deploy_dir().join("rbac.yaml"));
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("deploy/rbac.yaml has the ClusterRole");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    };
    let mut grants = std::collections::BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    grants.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    grants
}

/// The (apiGroup, resource, verb) RBAC checks for one request of the operator.
fn rbac_check(r: &crate::fixtures::Recorded) -> (String, String, String) {
    let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.first() {
        Some(&"api") => (String::new(), &parts[2..]),
        _ => (
            parts.get(1).copied().unwrap_or_default().to_string(),
            &parts[3.min(parts.len())..],
        ),
    };
    // namespaces/<ns>/<resource>[/<name>[/<subresource>]]
    let rest = if rest.first() == Some(&"namespaces") {
        &rest[2.min(rest.len())..]
    } else {
        rest
    };
    let resource = match rest {
        [resource, _, sub] => format!("{resource}/{sub}"),
        [resource, ..] => resource.to_string(),
        [] => String::new(),
    };
    let named = rest.len() >= 2;
    let verb = match (r.method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if r.query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        (other, _) => other,
    };
    (group, resource, verb.to_string())
}

#[tokio::test]
async fn every_request_of_a_fleets_life_is_granted_by_the_operators_cluster_role() {
    let mut cr = sample("wide-ep-multinode.yaml");
    cr.spec.scheduling.gang = Some(crate::crd::GangSpec {
        scheduler: crate::crd::GangScheduler::Coscheduling,
        queue: None,
        schedule_timeout_seconds: None,
    });
    let hub = cr
        .spec
        .model
        .source
        .hub
        .clone()
        .expect("the wide sample downloads from the hub");
    let mut h = Harness::new(&cr).with_pvc(&hub.cache_claim_name);
    for secret in [
        hub.token_secret.as_ref().map(|s| s.name.clone()),
        cr.spec.router.api_key_secret.as_ref().map(|s| s.name.clone()),
    ]
    .into_iter()
    .flatten()
    {
        h = h.with_secret(&secret);
    }
    // Created, downloaded, ready; a new revision swapped in; the placement, gang and
    // autoscaling changed; deleted.
    h.create().await;
    h.finish_job(&h.download_job(), true);
    h.reconcile().await.expect("reconcile");
    h.set_sts_status("attention", 1, 1);
    h.reconcile().await.expect("reconcile");
    h.edit_spec(|s| s["model"]["source"]["hub"]["revision"] = json!("v2"));
    h.reconcile().await.expect("reconcile");
    h.finish_job(&h.download_job(), true);
    h.reconcile().await.expect("reconcile");
    h.edit_spec(|s| {
        s["experts"]["redundantExperts"] = json!(0);
        s["scheduling"] = json!({});
        s["autoscaling"] = Value::Null;
    });
    h.reconcile().await.expect("reconcile");
    h.set_sts_status("attention", 0, 0);
    h.set_sts_status("expert", 0, 0);
    h.reconcile().await.expect("reconcile");
    h.fake.edit(&cr_path(&h.ns, &h.name), |o| {
        o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    });
    h.reconcile().await.expect("cleanup");

    let grants = cluster_role_grants();
    let mut denied: Vec<(String, String, String)> = h.fake.log().iter().map(rbac_check).collect();
    denied.retain(|check| !grants.contains(check));
    denied.dedup();
    assert!(
        denied.is_empty(),
        "requests deploy/rbac.yaml does not grant: {denied:?}"
    );
    // The checks see what they should: the requests span the kinds the operator manages.
    let seen: std::collections::BTreeSet<String> = h.fake.log().iter().map(|r| rbac_check(r).1).collect();
    for kind in [
        "jobs",
        "podgroups",
        "horizontalpodautoscalers",
        "configmaps",
        "deepseekv3deployments/status",
    ] {
        assert!(seen.contains(kind), "no {kind} request in {seen:?}");
    }
}
