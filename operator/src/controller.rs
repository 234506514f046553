//! The reconcile loop: plan, server-side apply, status, events. Thin on purpose; the decisions
//! live in the pure [`crate::planner`] and [`compute_status`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::crd::{
    DeepSeekV3Deployment, DeepSeekV3DeploymentStatus, FleetGeneration, GangScheduler, RoleStatus, RolloutStrategy,
    Slot, UnavailableExperts,
};
use crate::metrics::{ErrorLabels, Metrics, PhaseLabels};
use crate::model_readiness::{self, ModelState};
use crate::placement::PlacementPlan;
use crate::planner::{self, ChildKind, Names, Partition, Plan, PlanError, PlanInput, Role, MANAGER, ROUTER_PORT};

pub const FINALIZER: &str = "dsv3.io/teardown";

pub const REQUEUE_READY: Duration = Duration::from_secs(300);
pub const REQUEUE_PROGRESSING: Duration = Duration::from_secs(30);
pub const REQUEUE_CUTOVER: Duration = Duration::from_secs(10);
pub const REQUEUE_BLOCKED: Duration = Duration::from_secs(60);
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the resource has no {0}")]
    MissingMetadata(&'static str),
}

impl Error {
    /// Bounded label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
            Error::Json(_) => "serialization",
            Error::MissingMetadata(_) => "metadata",
        }
    }
}

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn reset_backoff(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// Next delay for `key`: 5 s, 10 s, 20 s, ... capped at 5 minutes.
    pub fn next_backoff(&self, key: &str) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        let factor = 1u32 << n.saturating_sub(1).min(16);
        BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
    }

    async fn event(&self, cr: &DeepSeekV3Deployment, type_: EventType, reason: &str, note: String) {
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &cr.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}

fn key(cr: &DeepSeekV3Deployment) -> String {
    format!("{}/{}", cr.namespace().unwrap_or_default(), cr.name_any())
}

/// Reconcile one `DeepSeekV3Deployment`.
pub async fn reconcile(cr: Arc<DeepSeekV3Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = cr.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<DeepSeekV3Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let k = key(&cr);
    let for_events = cr.clone();
    let result = finalizer(&api, FINALIZER, cr, |event| async {
        match event {
            Finalizer::Apply(cr) => apply(cr, ctx.clone()).await,
            Finalizer::Cleanup(cr) => cleanup(cr, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.observe(started.elapsed());
    match &result {
        Ok(_) => ctx.reset_backoff(&k),
        Err(e) => {
            ctx.event(&for_events, EventType::Warning, "ReconcileFailed", e.to_string())
                .await;
        }
    }
    result
}

/// Requeue with per-object exponential backoff and count the failure.
pub fn error_policy(cr: Arc<DeepSeekV3Deployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    let delay = ctx.next_backoff(&key(&cr));
    tracing::warn!(object = %key(&cr), %error, ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// A reason the fleet cannot be built now although its spec is valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocker {
    pub reason: &'static str,
    pub message: String,
}

async fn check_dependencies(cr: &DeepSeekV3Deployment, client: &Client, ns: &str) -> Result<Option<Blocker>, Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let src = &cr.spec.model.source;
    let claim = src
        .pvc
        .as_ref()
        .map(|p| p.claim_name.clone())
        .or_else(|| src.hub.as_ref().map(|h| h.cache_claim_name.clone()));
    if let Some(claim) = claim {
        match pvcs.get_opt(&claim).await? {
            None => {
                return Ok(Some(Blocker {
                    reason: "ModelVolumeNotFound",
                    message: format!("PersistentVolumeClaim {ns}/{claim} (model.source) does not exist"),
                }))
            }
            Some(pvc) if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Lost") => {
                return Ok(Some(Blocker {
                    reason: "ModelVolumeLost",
                    message: format!("PersistentVolumeClaim {ns}/{claim} lost its volume"),
                }))
            }
            Some(_) => {}
        }
    }
    let mut wanted = Vec::new();
    if let Some(s) = &cr.spec.router.api_key_secret {
        wanted.push(("router.apiKeySecret", s.name.clone()));
    }
    if let Some(s) = src.hub.as_ref().and_then(|h| h.token_secret.as_ref()) {
        wanted.push(("model.source.hub.tokenSecret", s.name.clone()));
    }
    for (field, name) in wanted {
        // Metadata only: the operator never reads secret data.
        if secrets.get_metadata_opt(&name).await?.is_none() {
            return Ok(Some(Blocker {
                reason: "SecretNotFound",
                message: format!("Secret {ns}/{name} ({field}) does not exist"),
            }));
        }
    }
    if let Some(gang) = &cr.spec.scheduling.gang {
        // The gang scheduler's PodGroup kind must be served, or its pods would wait forever.
        let resource = planner::pod_group_resource(gang.scheduler);
        let groups: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
        match groups.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {
                return Ok(Some(Blocker {
                    reason: "GangSchedulerMissing",
                    message: format!(
                        "scheduling.gang.scheduler {}: the PodGroup kind {} is not installed in the cluster",
                        gang.scheduler.as_str(),
                        resource.api_version
                    ),
                }));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

fn sts_drained(sts: &StatefulSet) -> bool {
    let spec_zero = sts.spec.as_ref().and_then(|s| s.replicas) == Some(0);
    let status = sts.status.clone().unwrap_or_default();
    let observed = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    spec_zero && observed && status.replicas == 0
}

/// The StatefulSet has as many pods as it asks for (none stopping past its count).
fn sts_settled(sts: &StatefulSet) -> bool {
    let want = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = sts.status.clone().unwrap_or_default();
    let observed = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    observed && status.replicas == want
}

async fn server_side_apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().ok_or(Error::MissingMetadata("name"))?;
    let mut value = serde_json::to_value(obj)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), K::kind(&()).into());
        map.remove("status");
    }
    let pp = PatchParams::apply(MANAGER).force();
    Ok(api.patch(&name, &pp, &Patch::Apply(&value)).await?)
}

/// Create an object unless one of its name exists. For a Job: its pod template is immutable, so
/// re-applying it after, say, an image change would be refused on every reconcile; the Job that
/// exists finishes with what it started with (its name already pins what it downloads).
async fn create_if_absent<K>(client: &Client, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().ok_or(Error::MissingMetadata("name"))?;
    if api.get_metadata_opt(&name).await?.is_some() {
        return Ok(());
    }
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_if_present<K>(client: &Client, ns: &str, name: &str) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Observed state of the workloads, as the API server returned them.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub router: Option<Deployment>,
    pub attention: Option<StatefulSet>,
    pub experts: Option<StatefulSet>,
    /// The fleet's pods the scheduler cannot place: (pod, the scheduler's reason).
    pub unschedulable: Vec<(String, String)>,
    /// Containers past the restart budget: (pod/container, restarts, why it last stopped).
    pub crash_looping: Vec<(String, i32, String)>,
}

/// What the fleet's pods say that their workloads' status does not: pods the scheduler cannot
/// place (PodScheduled False, reason Unschedulable, with its message, e.g. "0/18 nodes are
/// available: 18 Insufficient nvidia.com/gpu") and containers restarted `restart_budget` times.
async fn observe_pods(
    client: &Client,
    ns: &str,
    name: &str,
    restart_budget: i32,
    observed: &mut Observed,
) -> Result<(), Error> {
    for pod in fleet_pods(client, ns, name).await? {
        let Some(status) = pod.status.as_ref() else { continue };
        let stuck =
            status.conditions.iter().flatten().find(|c| {
                c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
            });
        if let Some(c) = stuck {
            observed
                .unschedulable
                .push((pod.name_any(), c.message.clone().unwrap_or_default()));
        }
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        for c in containers.filter(|c| c.restart_count >= restart_budget) {
            let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
            let why = last.map_or_else(
                || "no termination recorded".to_string(),
                |t| {
                    let reason = t.reason.clone().unwrap_or_else(|| "Error".into());
                    match t.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
                        Some(m) => format!("{reason}, exit code {}: {m}", t.exit_code),
                        None => format!("{reason}, exit code {}", t.exit_code),
                    }
                },
            );
            observed
                .crash_looping
                .push((format!("{}/{}", pod.name_any(), c.name), c.restart_count, why));
        }
    }
    observed.unschedulable.sort();
    observed.crash_looping.sort();
    Ok(())
}

async fn apply(cr: Arc<DeepSeekV3Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let client = &ctx.client;
    let ns = cr.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let name = cr.name_any();
    let names = Names::new(&name);
    let mut old_status = cr.status.clone().unwrap_or_default();
    if old_status.serving.is_none() {
        old_status.serving = serving_of_routers(client, &ns, &names).await?;
    }
    let now = Time(Timestamp::now());

    if let Some(blocker) = check_dependencies(&cr, client, &ns).await? {
        ctx.event(&cr, EventType::Warning, blocker.reason, blocker.message.clone())
            .await;
        let status = blocked_status(&cr, &blocker, &now);
        patch_status(&ctx, &cr, &status).await?;
        return Ok(Action::requeue(REQUEUE_BLOCKED));
    }

    let model = model_readiness::observe(&cr, client, &ns).await?;
    let input = PlanInput {
        served_model: model.served.clone(),
        ..Default::default()
    };
    let plan_or_block = |input: &PlanInput| planner::plan(&cr, input);
    let desired = match plan_or_block(&input) {
        Ok(p) => p,
        Err(e @ (PlanError::Placement(_) | PlanError::Negative(_) | PlanError::PodOverrides(..))) => {
            let blocker = Blocker {
                reason: if matches!(e, PlanError::PodOverrides(..)) {
                    "InvalidPodOverrides"
                } else {
                    "InvalidTopology"
                },
                message: e.to_string(),
            };
            ctx.event(&cr, EventType::Warning, blocker.reason, blocker.message.clone())
                .await;
            patch_status(&ctx, &cr, &blocked_status(&cr, &blocker, &now)).await?;
            return Ok(Action::requeue(REQUEUE_BLOCKED));
        }
        Err(PlanError::MissingMetadata(m)) => return Err(Error::MissingMetadata(m)),
    };
    let replan = |input: PlanInput| plan_or_block(&input).map_err(|_| Error::MissingMetadata("plan"));
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let slot_sets = |slot: Slot| {
        let sts = sts.clone();
        let names = Names::new(&name);
        async move {
            let attention = sts.get_opt(&names.set(Role::Attention, slot)).await?;
            let experts = sts.get_opt(&names.set(Role::Expert, slot)).await?;
            Ok::<_, Error>((attention, experts))
        }
    };
    let rollout = match old_status.serving.clone() {
        Some(s) if s.revision == desired.generation.revision => Rollout::InPlace(s.slot),
        Some(s) if cr.spec.rollout.strategy == RolloutStrategy::Recreate => Rollout::Recreate(s),
        // A cut-over under way (recorded as the next generation in the serving slot) is seen
        // through: the serving pods may still report ready while they stop.
        Some(s) if old_status.next.as_ref().is_some_and(|n| n.slot == s.slot) => Rollout::Recreate(s),
        // A blue/green rollout of this very generation already under way goes on, whatever
        // the serving pods' readiness at this moment.
        Some(s)
            if old_status
                .next
                .as_ref()
                .is_some_and(|n| n.revision == desired.generation.revision && n.slot == s.slot.other()) =>
        {
            Rollout::BlueGreen(s)
        }
        Some(s) => {
            // Nothing of the serving generation answers: no request to keep, nothing to double.
            let (a, e) = slot_sets(s.slot).await?;
            let answers = |set: &Option<StatefulSet>| {
                set.as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some_and(|st| st.ready_replicas.unwrap_or(0) > 0)
            };
            if answers(&a) && answers(&e) {
                Rollout::BlueGreen(s)
            } else {
                Rollout::Recreate(s)
            }
        }
        // A fleet from before generations were recorded: its placement decides, as it did.
        None => match &old_status.placement_version {
            Some(v) if *v != desired.placement.version => Rollout::Recreate(FleetGeneration {
                // A revision no plan has, so the cut-over is seen through on the next reconciles.
                revision: format!("placement-{v}"),
                placement_version: v.clone(),
                ..desired.generation.clone()
            }),
            _ => Rollout::InPlace(Slot::Blue),
        },
    };

    // A partitioned rollout: how much of each generation runs until the switch.
    let halving = match &rollout {
        Rollout::BlueGreen(s) if cr.spec.rollout.strategy == RolloutStrategy::Partitioned => {
            let serving_shards = serving_placement(client, &ns, &names, &s.placement_version)
                .await?
                .map(|p| p.covering_prefix() as i32);
            Some(Halving::of(
                cr.spec.attention.replicas,
                serving_shards,
                desired.placement.covering_prefix() as i32,
            ))
        }
        _ => None,
    };

    let mut cutover = false;
    let mut activated = false;
    let mut next = None;
    let mut serving = None;
    let plan = match &rollout {
        Rollout::InPlace(slot) => {
            // After a partitioned rollout's switch the new generation grows only into the room
            // the old one leaves: at its counts until the other slot's sets and pods are gone.
            // Only a partitioned fleet looks: the others' steady state reads nothing more.
            let old_left = cr.spec.rollout.strategy == RolloutStrategy::Partitioned && {
                let (other_a, other_e) = slot_sets(slot.other()).await?;
                other_a.is_some()
                    || other_e.is_some()
                    || slot_pods_left_without_sets(client, &ns, &name, slot.other()).await?
            };
            let partition = if old_left {
                let (a, e) = slot_sets(*slot).await?;
                let replicas = |set: Option<StatefulSet>| set.and_then(|s| s.spec).and_then(|s| s.replicas);
                match (replicas(a), replicas(e)) {
                    (Some(attention), Some(experts)) => Some(Partition { attention, experts }),
                    _ => None,
                }
            } else {
                None
            };
            replan(PlanInput {
                slot: *slot,
                partition,
                ..input.clone()
            })?
        }
        Rollout::Recreate(s) => {
            // No router sends to the other slot (a blue/green rollout given up): it goes at
            // once, so its pods hold no GPUs the new generation needs.
            let (a, e) = slot_sets(s.slot.other()).await?;
            if a.is_some() || e.is_some() {
                delete_slot(client, &ns, &cr, s.slot.other()).await?;
            }
            // Stop the serving generation's pods first; start the new one once none is left.
            let (a, e) = slot_sets(s.slot).await?;
            let drained = [a, e].iter().all(|s| s.as_ref().is_none_or(sts_drained));
            activated = drained;
            cutover = !drained;
            replan(PlanInput {
                slot: s.slot,
                placement_cutover: !drained,
                ..input.clone()
            })?
        }
        Rollout::BlueGreen(s) => {
            let p = replan(PlanInput {
                slot: s.slot.other(),
                serving: Some(s.clone()),
                partition: halving.map(|h| h.next),
                ..input.clone()
            })?;
            next = Some(p.generation.clone());
            serving = Some(s.clone());
            p
        }
    };
    if let Rollout::BlueGreen(s) = &rollout {
        let want = ServingSize {
            attention: halving.map_or(cr.spec.attention.replicas, |h| h.serving_attention),
            experts: halving.and_then(|h| h.serving_experts),
        };
        let gang = cr.spec.scheduling.gang.as_ref();
        if let Some(size) = scale_serving(client, &ns, &name, s, want, gang).await? {
            let (reason, note) = match halving {
                Some(h) => (
                    "ServingPartitioned",
                    format!(
                        "the serving generation ({} pods) runs on {} attention ranks and {} expert pods (they hold \
                         every expert) while generation {} starts on {} attention ranks and {} expert pods",
                        s.slot.as_str(),
                        size.attention,
                        size.experts,
                        desired.generation.revision,
                        h.next.attention,
                        h.next.experts
                    ),
                ),
                None => (
                    "ServingScaled",
                    format!(
                        "the serving generation's attention ranks ({} pods) scaled to {} during the rollout",
                        s.slot.as_str(),
                        size.attention
                    ),
                ),
            };
            ctx.event(&cr, EventType::Normal, reason, note).await;
        }
        // The new generation starts only in the room the serving one has made.
        if let Some(h) = halving {
            let (a, e) = slot_sets(s.slot).await?;
            let shrunk = |set: &Option<StatefulSet>| set.as_ref().is_none_or(sts_settled);
            if !(shrunk(&a) && shrunk(&e)) {
                let message = format!(
                    "generation {}: the serving generation shrinks to {} attention ranks and {} expert pods \
                     (attention {}, experts {}) to make room for it",
                    desired.generation.revision,
                    h.serving_attention,
                    h.serving_experts.map_or("all its".to_string(), |n| n.to_string()),
                    role_from_sts(a.as_ref(), None).summary,
                    role_from_sts(e.as_ref(), None).summary,
                );
                let mut status = cr.status.clone().unwrap_or_default();
                status.conditions = progressing_conditions(&cr, &status, "ShrinkingServing", message);
                status.phase = Some("Progressing".into());
                status.next = Some(FleetGeneration {
                    slot: s.slot.other(),
                    ..desired.generation.clone()
                });
                patch_status(&ctx, &cr, &status).await?;
                return Ok(Action::requeue(REQUEUE_CUTOVER));
            }
        }
    }
    // The new slot must hold nothing the routers may still send to: after a switch, the old
    // generation stays until every router runs the new peers.
    if let Rollout::BlueGreen(s) = &rollout {
        let router: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let routers = router.get_opt(&names.role(Role::Router)).await?;
        let (a, e) = slot_sets(s.slot.other()).await?;
        let old_generation_left = [a, e].iter().flatten().any(|set| {
            set.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(planner::LABEL_REVISION))
                != Some(&plan.generation.revision)
        });
        let routers_over =
            routers.as_ref().is_some_and(router_rolled_out) && !routers_terminating(client, &ns, &name).await?;
        if (old_generation_left && !routers_over)
            || slot_pods_left_without_sets(client, &ns, &name, s.slot.other()).await?
        {
            let message = "waiting for the routers to finish switching generations".to_string();
            let mut status = cr.status.clone().unwrap_or_default();
            status.conditions = progressing_conditions(&cr, &status, "SwitchingGenerations", message);
            patch_status(&ctx, &cr, &status).await?;
            return Ok(Action::requeue(REQUEUE_CUTOVER));
        }
    }

    // Until the switch the routers stay exactly as they run (their peers, image, TLS and model
    // files are the serving generation's).
    let keep_routers = matches!(rollout, Rollout::BlueGreen(_));
    let mut observed = apply_plan(client, &ns, &plan, !keep_routers).await?;
    observe_pods(client, &ns, &name, cr.spec.rollout.restart_budget, &mut observed).await?;

    // The new generation's StatefulSets as applied, for the status while it starts.
    let next_sets = (observed.attention.clone(), observed.experts.clone());
    if let (Rollout::BlueGreen(s), Some(new)) = (&rollout, &next) {
        if set_ready(observed.attention.as_ref()) && set_ready(observed.experts.as_ref()) {
            // Every pod of the new generation answers: the routers switch to it.
            let switched = replan(PlanInput {
                slot: new.slot,
                ..input.clone()
            })?;
            observed.router = Some(server_side_apply(client, &ns, &switched.router_deployment).await?);
            ctx.event(
                &cr,
                EventType::Normal,
                "GenerationSwitched",
                format!(
                    "routers now send to generation {} ({} pods); generation {} stops once they have rolled over",
                    new.revision,
                    new.slot.as_str(),
                    s.revision
                ),
            )
            .await;
            serving = Some(new.clone());
            next = None;
        } else {
            // The status speaks of the generation that serves.
            let (a, e) = slot_sets(s.slot).await?;
            observed.attention = a;
            observed.experts = e;
        }
    }

    let serving = serving.unwrap_or_else(|| match (&rollout, cutover) {
        (Rollout::Recreate(s), true) => s.clone(),
        _ => plan.generation.clone(),
    });
    // With the routers on the serving generation, the other slot's StatefulSets go.
    let mut other_slot_left = false;
    if next.is_none() && !cutover {
        let (a, e) = slot_sets(serving.slot.other()).await?;
        if a.is_some() || e.is_some() {
            if observed.router.as_ref().is_some_and(router_rolled_out)
                && !routers_terminating(client, &ns, &name).await?
            {
                delete_slot(client, &ns, &cr, serving.slot.other()).await?;
                ctx.event(
                    &cr,
                    EventType::Normal,
                    "GenerationStopped",
                    format!(
                        "the {} attention and expert pods stop: every router sends to generation {}",
                        serving.slot.other().as_str(),
                        serving.revision
                    ),
                )
                .await;
            } else {
                other_slot_left = true;
            }
        }
    }
    if (activated || next.is_none()) && !cutover && !other_slot_left {
        collect_old_placements(client, &ns, &name, &plan).await?;
    }
    if activated {
        ctx.event(
            &cr,
            EventType::Normal,
            "GenerationActivated",
            format!(
                "attention and expert pods now start as generation {} (placement {})",
                plan.generation.revision, plan.placement.version
            ),
        )
        .await;
    }

    if model.ready {
        model_readiness::collect_old_downloads(client, &ns, &cr).await?;
    }

    let mut status = compute_status(&cr, &plan, &observed, cutover, &model, &now);
    if let Some(new) = &next {
        let mut message = format!(
            "generation {} starting beside {} (attention {}, experts {}); the routers switch once every pod is ready",
            new.revision,
            serving.revision,
            role_from_sts(next_sets.0.as_ref(), None).summary,
            role_from_sts(next_sets.1.as_ref(), None).summary,
        );
        // Pods the scheduler cannot place: most likely no room for two generations at once.
        if let Some((pod, why)) = observed.unschedulable.first() {
            message.push_str(&format!(
                "; pod {pod} cannot be scheduled: {why} (without room for both generations, rollout.strategy: Recreate stops the serving one first)"
            ));
        }
        status.conditions = progressing_conditions(&cr, &status, "NewGenerationStarting", message);
        status.phase = Some("Progressing".into());
        status.placement_version = Some(serving.placement_version.clone());
        status.placement_config_map = Some(names.placement_config(&serving.placement_version));
    }
    status.serving = Some(serving);
    // A cut-over records what it starts, in the serving slot, until it is done.
    status.next = if cutover { Some(plan.generation.clone()) } else { next };
    publish_transition_events(&ctx, &cr, &old_status, &status, &plan, cutover).await;
    patch_status(&ctx, &cr, &status).await?;

    Ok(Action::requeue(match status.phase.as_deref() {
        Some("Ready") if !other_slot_left => REQUEUE_READY,
        _ if cutover || status.next.is_some() || other_slot_left => REQUEUE_CUTOVER,
        _ => REQUEUE_PROGRESSING,
    }))
}

/// How this reconcile brings the desired generation of attention and expert pods about.
enum Rollout {
    /// It is the serving one (or none was recorded): planned in its slot, rolled in place.
    InPlace(Slot),
    /// The serving generation's pods stop first, then the new one starts in the same slot.
    Recreate(FleetGeneration),
    /// The new generation starts in the other slot beside the serving one.
    BlueGreen(FleetGeneration),
}

/// Every pod of a StatefulSet runs its current template and is ready.
fn set_ready(set: Option<&StatefulSet>) -> bool {
    let Some(set) = set else { return false };
    let want = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = set.status.clone().unwrap_or_default();
    let current = st.observed_generation.unwrap_or(0) >= set.metadata.generation.unwrap_or(0);
    want > 0 && current && st.ready_replicas.unwrap_or(0) >= want && st.updated_replicas.unwrap_or(0) >= want
}

/// Every router pod runs the Deployment's current template and is available, none of another
/// template is left running (terminating ones are not counted here: see
/// [`routers_terminating`]).
fn router_rolled_out(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    let current = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    current
        && st.updated_replicas.unwrap_or(0) >= want
        && st.available_replicas.unwrap_or(0) >= want
        && st.replicas.unwrap_or(0) <= want
}

/// Router pods still stopping: they may still stream through the generation they sent to
/// (a Deployment's status no longer counts them).
async fn routers_terminating(client: &Client, ns: &str, name: &str) -> Result<bool, Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = planner::selector_string(name, Role::Router);
    let pods = api.list(&ListParams::default().labels(&selector)).await?;
    let stopping = pods.iter().any(|p| p.metadata.deletion_timestamp.is_some());
    Ok(stopping)
}

/// Pods of `slot`'s worker StatefulSets left after those were deleted (still stopping): a new
/// generation in that slot would reuse their names.
async fn slot_pods_left_without_sets(client: &Client, ns: &str, name: &str, slot: Slot) -> Result<bool, Error> {
    let names = Names::new(name);
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let mut gone = Vec::new();
    for set in [Role::Attention, Role::Expert].map(|r| names.set(r, slot)) {
        if sts.get_opt(&set).await?.is_none() {
            gone.push(set);
        }
    }
    if gone.is_empty() {
        return Ok(false);
    }
    // A StatefulSet's pods are named `<set>-<ordinal>`.
    let of_a_gone_set = |pod: &str| {
        gone.iter().any(|set| {
            pod.strip_prefix(set.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    let pods = fleet_pods(client, ns, name).await?;
    let left = pods.iter().any(|p| of_a_gone_set(&p.name_any()));
    Ok(left)
}

/// Every pod of the fleet called `name`.
async fn fleet_pods(client: &Client, ns: &str, name: &str) -> Result<Vec<Pod>, Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!(
        "{}={name},{}={}",
        planner::LABEL_INSTANCE,
        planner::LABEL_NAME,
        planner::APP_NAME
    );
    Ok(api.list(&ListParams::default().labels(&selector)).await?.items)
}

/// The status's conditions with Progressing set to `reason` (Ready and Degraded kept).
fn progressing_conditions(
    cr: &DeepSeekV3Deployment,
    status: &DeepSeekV3DeploymentStatus,
    reason: &str,
    message: String,
) -> Vec<Condition> {
    let g = cr.metadata.generation.unwrap_or(0);
    let now = Time(Timestamp::now());
    let old = cr.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let mut conditions: Vec<Condition> = status
        .conditions
        .iter()
        .filter(|c| c.type_ != "Progressing")
        .cloned()
        .collect();
    conditions.push(condition(old, "Progressing", true, reason, message, g, &now));
    conditions
}

/// Server-side apply every planned object (one field manager, forced) and delete unwanted ones.
/// Server-side apply every planned object (one field manager, forced) and delete unwanted ones;
/// the router Deployment only with `apply_router` (or when there is none yet).
pub async fn apply_plan(client: &Client, ns: &str, plan: &Plan, apply_router: bool) -> Result<Observed, Error> {
    server_side_apply(client, ns, &plan.service_account).await?;
    server_side_apply(client, ns, &plan.placement_config).await?;
    server_side_apply(client, ns, &plan.fleet_config).await?;
    server_side_apply(client, ns, &plan.router_service).await?;
    server_side_apply(client, ns, &plan.attention_service).await?;
    server_side_apply(client, ns, &plan.expert_service).await?;
    server_side_apply(client, ns, &plan.network_policy).await?;
    if let Some((scheduler, group)) = &plan.pod_group {
        // Before the StatefulSets: a gang scheduler holds pods whose group does not exist yet.
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &planner::pod_group_resource(*scheduler));
        let name = group.metadata.name.clone().ok_or(Error::MissingMetadata("name"))?;
        api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(group))
            .await?;
    }
    let experts = server_side_apply(client, ns, &plan.expert_statefulset).await?;
    let attention = server_side_apply(client, ns, &plan.attention_statefulset).await?;
    let live_router = if apply_router {
        None
    } else {
        let name = plan.router_deployment.metadata.name.clone().unwrap_or_default();
        Api::<Deployment>::namespaced(client.clone(), ns).get_opt(&name).await?
    };
    let router = match live_router {
        Some(r) => r,
        None => server_side_apply(client, ns, &plan.router_deployment).await?,
    };
    if let Some(job) = &plan.model_download {
        create_if_absent(client, ns, job).await?;
    }
    for p in &plan.pdbs {
        server_side_apply(client, ns, p).await?;
    }
    for h in &plan.hpas {
        server_side_apply(client, ns, h).await?;
    }
    for (kind, name) in &plan.absent {
        match kind {
            ChildKind::HorizontalPodAutoscaler => {
                delete_if_present::<HorizontalPodAutoscaler>(client, ns, name).await?;
            }
            ChildKind::PodGroup(scheduler) => delete_pod_group(client, ns, *scheduler, name).await?,
        }
    }
    Ok(Observed {
        router: Some(router),
        attention: Some(attention),
        experts: Some(experts),
        unschedulable: Vec::new(),
        crash_looping: Vec::new(),
    })
}

/// The generation the routers send to, as their Deployment records it: where the status lost it
/// (a failed status write, a fleet restored without its status), the rollout goes on from what
/// runs rather than from nothing. None for a fleet with no routers yet or from before the record.
async fn serving_of_routers(client: &Client, ns: &str, names: &Names) -> Result<Option<FleetGeneration>, Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let Some(deployment) = api.get_opt(&names.role(Role::Router)).await? else {
        return Ok(None);
    };
    let recorded = deployment
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(planner::ANNOTATION_SERVING))
        .and_then(|json| serde_json::from_str(json).ok());
    Ok(recorded)
}

/// How much of each generation runs during a partitioned rollout, from the attention replica
/// count and the expert pods that hold every expert: the new generation gets the larger half of
/// the attention ranks, the serving one the rest (at least one while there are any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Halving {
    serving_attention: i32,
    /// None: the serving generation's placement is not known, so its shards are left as they run.
    serving_experts: Option<i32>,
    next: Partition,
}

impl Halving {
    fn of(attention: i32, serving_experts: Option<i32>, next_experts: i32) -> Self {
        let next = (attention + 1) / 2;
        Halving {
            serving_attention: (attention - next).max(attention.min(1)),
            serving_experts,
            next: Partition {
                attention: next,
                experts: next_experts,
            },
        }
    }
}

/// The serving generation's placement, from its ConfigMap (None if that is gone or unreadable).
async fn serving_placement(
    client: &Client,
    ns: &str,
    names: &Names,
    version: &str,
) -> Result<Option<PlacementPlan>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let plan = api
        .get_opt(&names.placement_config(version))
        .await?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get(planner::PLACEMENT_FILE).cloned())
        .and_then(|json| serde_json::from_str(&json).ok());
    Ok(plan)
}

/// What the serving generation runs with while a new one starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ServingSize {
    attention: i32,
    /// None: its expert pods are left as they run.
    experts: Option<i32>,
}

/// The counts the serving generation was scaled to.
struct Scaled {
    attention: i32,
    experts: i32,
}

/// While a new generation starts, the serving generation's StatefulSets stay as they run, all but
/// their replica counts. The attention count (`want`: the HPA's, through the scale subresource,
/// an edit, or the serving half of a partitioned rollout) reaches the serving ranks at once, up to
/// the ranks its routers know (with autoscaling, the HPA's maximum; without, the count when it
/// started serving, since more ranks would get no requests before the switch). In a partitioned
/// rollout the expert pods go down to the leading ones that hold every expert, and their
/// disruption budget to none (each now holds experts no other running pod does). The serving
/// generation's gang, if any, is kept at its pods (a group asking for more would hold back a
/// rescheduled pod). Returns the counts, if one changed.
async fn scale_serving(
    client: &Client,
    ns: &str,
    name: &str,
    serving: &FleetGeneration,
    want: ServingSize,
    gang: Option<&crate::crd::GangSpec>,
) -> Result<Option<Scaled>, Error> {
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let names = Names::new(name);
    let attention_set = names.set(Role::Attention, serving.slot);
    let expert_set = names.set(Role::Expert, serving.slot);
    let Some(attention) = sts.get_opt(&attention_set).await? else {
        return Ok(None);
    };
    let replicas = |set: &StatefulSet| set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let shards = sts.get_opt(&expert_set).await?.map_or(0, |e| replicas(&e));
    let to = Scaled {
        attention: want.attention.min(serving.attention_peers),
        experts: want.experts.map_or(shards, |e| e.min(shards)),
    };
    if replicas(&attention) == to.attention && shards == to.experts {
        return Ok(None);
    }
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    // The gang first: should a count's patch fail after it, the next reconcile does all again.
    if let Some(gang) = gang {
        let groups: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &planner::pod_group_resource(gang.scheduler));
        let members = serde_json::json!({"spec": {"minMember": to.attention + to.experts}});
        match groups
            .patch(
                &planner::pod_group_name(name, serving.slot),
                &params,
                &Patch::Merge(members),
            )
            .await
        {
            // A serving generation from before its gang was switched on has no group.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            other => {
                other?;
            }
        }
    }
    // Merge patches of the counts alone: an apply would take the sets' templates to the new
    // generation's. The next apply of this slot (forced) owns the counts again.
    let count = |n: i32| Patch::Merge(serde_json::json!({"spec": {"replicas": n}}));
    if shards != to.experts {
        let budgets: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
        let none = Patch::Merge(serde_json::json!({"spec": {"maxUnavailable": 0}}));
        match budgets.patch(&expert_set, &params, &none).await {
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            other => {
                other?;
            }
        }
        sts.patch(&expert_set, &params, &count(to.experts)).await?;
    }
    if replicas(&attention) != to.attention {
        sts.patch(&attention_set, &params, &count(to.attention)).await?;
    }
    Ok(Some(to))
}

/// Deletes the attention and expert StatefulSets of `slot`, their disruption budgets and their
/// gang's PodGroup (of any scheduler: the gang may have changed since).
async fn delete_slot(client: &Client, ns: &str, cr: &DeepSeekV3Deployment, slot: Slot) -> Result<(), Error> {
    let name = cr.name_any();
    let names = Names::new(&name);
    for role in [Role::Attention, Role::Expert] {
        delete_if_present::<StatefulSet>(client, ns, &names.set(role, slot)).await?;
        delete_if_present::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(client, ns, &names.set(role, slot))
            .await?;
    }
    if cr.spec.scheduling.gang.is_some() {
        for scheduler in GangScheduler::ALL {
            delete_pod_group(client, ns, scheduler, &planner::pod_group_name(&name, slot)).await?;
        }
    }
    Ok(())
}

/// Deletes `scheduler`'s PodGroup `name` if it is there.
async fn delete_pod_group(client: &Client, ns: &str, scheduler: GangScheduler, name: &str) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &planner::pod_group_resource(scheduler));
    match api.delete(name, &DeleteParams::background()).await {
        // 404: no such group, or its kind is not installed in the cluster at all.
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn collect_old_placements(client: &Client, ns: &str, name: &str, plan: &Plan) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let selector = format!(
        "{}={name},{}=placement",
        planner::LABEL_INSTANCE,
        planner::LABEL_COMPONENT
    );
    let current = plan.placement_config.metadata.name.clone().unwrap_or_default();
    for cm in api.list(&ListParams::default().labels(&selector)).await? {
        let cm_name = cm.name_any();
        if cm_name != current {
            delete_if_present::<ConfigMap>(client, ns, &cm_name).await?;
        }
    }
    Ok(())
}

async fn cleanup(cr: Arc<DeepSeekV3Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let client = &ctx.client;
    let ns = cr.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let names = Names::new(&cr.name_any());
    ctx.event(
        &cr,
        EventType::Normal,
        "Deleting",
        "stopping the router, then the attention and expert workers".into(),
    )
    .await;
    // Stop traffic first, then the workers; owner references collect the rest.
    delete_if_present::<HorizontalPodAutoscaler>(client, &ns, &names.role(Role::Router)).await?;
    delete_if_present::<Deployment>(client, &ns, &names.role(Role::Router)).await?;
    delete_if_present::<HorizontalPodAutoscaler>(client, &ns, &names.role(Role::Attention)).await?;
    for slot in [Slot::Blue, Slot::Green] {
        delete_if_present::<StatefulSet>(client, &ns, &names.set(Role::Attention, slot)).await?;
        delete_if_present::<StatefulSet>(client, &ns, &names.set(Role::Expert, slot)).await?;
    }
    ctx.reset_backoff(&key(&cr));
    Ok(Action::await_change())
}

async fn patch_status(
    ctx: &Context,
    cr: &DeepSeekV3Deployment,
    status: &DeepSeekV3DeploymentStatus,
) -> Result<(), Error> {
    let ns = cr.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<DeepSeekV3Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let body = serde_json::json!({
        "apiVersion": DeepSeekV3Deployment::api_version(&()),
        "kind": DeepSeekV3Deployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &cr.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    ctx.metrics
        .status_phase
        .get_or_create(&PhaseLabels {
            phase: status.phase.clone().unwrap_or_default(),
        })
        .inc();
    Ok(())
}

async fn publish_transition_events(
    ctx: &Context,
    cr: &DeepSeekV3Deployment,
    old: &DeepSeekV3DeploymentStatus,
    new: &DeepSeekV3DeploymentStatus,
    plan: &Plan,
    cutover: bool,
) {
    let generation = cr.metadata.generation.unwrap_or(0);
    if old.observed_generation != Some(generation) {
        let count = plan.objects().map(|o| o.len()).unwrap_or(0);
        ctx.event(
            cr,
            EventType::Normal,
            "Applied",
            format!(
                "applied generation {generation}: {count} objects, placement {}",
                plan.placement.version
            ),
        )
        .await;
    }
    let reason_of = |s: &DeepSeekV3DeploymentStatus, t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    if cutover && reason_of(old, "Progressing").map(|x| x.1) != Some("Recreating".into()) {
        ctx.event(cr, EventType::Normal, "Recreating", recreating_message(old, plan))
            .await;
    }
    let was = reason_of(old, "Ready").map(|x| x.0);
    if let Some((now, reason)) = reason_of(new, "Ready") {
        if was.as_deref() != Some(now.as_str()) {
            let message = new
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            if now == "True" {
                ctx.event(cr, EventType::Normal, "Ready", message).await;
            } else if was.as_deref() == Some("True") {
                ctx.event(cr, EventType::Warning, &reason, message).await;
            }
        }
    }
    if let Some((s, reason)) = reason_of(new, "Degraded") {
        if s == "True" && reason_of(old, "Degraded").map(|x| x.1) != Some(reason.clone()) {
            ctx.event(cr, EventType::Warning, &reason, "fleet is degraded".into())
                .await;
        }
    }
}

fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: i64,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: Some(generation),
        last_transition_time,
    }
}

fn role_from_deployment(d: Option<&Deployment>, planned: Option<i32>) -> RoleStatus {
    let desired = d
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas)
        .or(planned)
        .unwrap_or(1);
    let st = d.and_then(|d| d.status.clone()).unwrap_or_default();
    role_status(
        desired,
        st.ready_replicas.unwrap_or(0),
        st.updated_replicas.unwrap_or(0),
    )
}

fn role_from_sts(s: Option<&StatefulSet>, planned: Option<i32>) -> RoleStatus {
    let desired = s
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas)
        .or(planned)
        .unwrap_or(1);
    let st = s.and_then(|d| d.status.clone()).unwrap_or_default();
    role_status(
        desired,
        st.ready_replicas.unwrap_or(0),
        st.updated_replicas.unwrap_or(0),
    )
}

fn role_status(desired: i32, ready: i32, updated: i32) -> RoleStatus {
    RoleStatus {
        replicas: desired,
        ready_replicas: ready,
        updated_replicas: updated,
        summary: format!("{ready}/{desired}"),
    }
}

fn base_status(cr: &DeepSeekV3Deployment) -> DeepSeekV3DeploymentStatus {
    let name = cr.name_any();
    let ns = cr.namespace().unwrap_or_default();
    DeepSeekV3DeploymentStatus {
        observed_generation: cr.metadata.generation,
        selector: Some(planner::selector_string(&name, Role::Attention)),
        endpoint: Some(format!(
            "http://{}.{ns}.svc:{ROUTER_PORT}/v1",
            Names::new(&name).role(Role::Router)
        )),
        ..Default::default()
    }
}

/// Status of a fleet that cannot be built yet.
pub fn blocked_status(cr: &DeepSeekV3Deployment, b: &Blocker, now: &Time) -> DeepSeekV3DeploymentStatus {
    let old = cr.status.clone().unwrap_or_default();
    let g = cr.metadata.generation.unwrap_or(0);
    let c = &old.conditions;
    DeepSeekV3DeploymentStatus {
        phase: Some("Blocked".into()),
        ready_roles: old.ready_roles.clone().or(Some("0/3".into())),
        replicas: old.replicas,
        router: old.router.clone(),
        attention: old.attention.clone(),
        experts: old.experts.clone(),
        placement_version: old.placement_version.clone(),
        placement_config_map: old.placement_config_map.clone(),
        // What runs is unchanged while blocked: the next reconcile must know it.
        served_model: old.served_model.clone(),
        serving: old.serving.clone(),
        next: old.next.clone(),
        conditions: vec![
            condition(c, "Ready", false, b.reason, b.message.clone(), g, now),
            condition(c, "Progressing", false, "Blocked", b.message.clone(), g, now),
            condition(c, "Degraded", true, b.reason, b.message.clone(), g, now),
        ],
        ..base_status(cr)
    }
}

/// What a Recreate rollout does, from the serving generation to the planned one.
fn recreating_message(old: &DeepSeekV3DeploymentStatus, plan: &Plan) -> String {
    let (revision, placement) = match &old.serving {
        Some(s) => (s.revision.clone(), s.placement_version.clone()),
        None => (String::new(), old.placement_version.clone().unwrap_or_default()),
    };
    format!(
        "stopping the attention and expert pods of generation {revision} (placement {placement}) before starting generation {} (placement {})",
        plan.generation.revision, plan.placement.version
    )
}

/// Status from the observed workloads. Pure.
///
/// Ready: the fleet serves (a router, an attention rank and every expert shard are ready).
/// Degraded: it serves below the desired strength, or it stopped serving after having served.
/// Progressing: a rollout, a placement cut-over or a first start is under way.
pub fn compute_status(
    cr: &DeepSeekV3Deployment,
    plan: &Plan,
    observed: &Observed,
    cutover: bool,
    model: &ModelState,
    now: &Time,
) -> DeepSeekV3DeploymentStatus {
    let old = cr.status.clone().unwrap_or_default();
    let g = cr.metadata.generation.unwrap_or(0);
    let c = &old.conditions;
    let router = role_from_deployment(
        observed.router.as_ref(),
        plan.router_deployment.spec.as_ref().and_then(|s| s.replicas),
    );
    let attention = role_from_sts(
        observed.attention.as_ref(),
        plan.attention_statefulset.spec.as_ref().and_then(|s| s.replicas),
    );
    let experts = role_from_sts(
        observed.experts.as_ref(),
        plan.expert_statefulset.spec.as_ref().and_then(|s| s.replicas),
    );
    let full = |r: &RoleStatus| r.replicas > 0 && r.ready_replicas >= r.replicas;
    let rolling = |r: &RoleStatus| r.updated_replicas < r.replicas;
    let ready_roles = [&router, &attention, &experts].iter().filter(|r| full(r)).count();
    // Every shard is needed unless the plan holds redundant copies: then up to that many may
    // be lost (any of them) with every expert still answered, by its other copies. With
    // unavailable experts masked, any one shard left serves (the rest are masked out).
    let shards_lost = (experts.replicas - experts.ready_replicas).max(0);
    let masking = cr.spec.experts.unavailable == UnavailableExperts::Mask;
    let experts_covered = experts.replicas > 0
        && (i64::from(shards_lost) <= i64::from(plan.placement.shard_losses_covered())
            || (masking && experts.ready_replicas >= 1));
    let serving = !cutover && router.ready_replicas >= 1 && attention.ready_replicas >= 1 && experts_covered;
    let all_full = ready_roles == 3;
    let any_rolling = [&router, &attention, &experts].iter().any(|r| rolling(r));
    let was_serving = c.iter().any(|x| x.type_ == "Ready" && x.status == "True");
    let summary = format!(
        "router {}, attention {}, experts {}",
        router.summary, attention.summary, experts.summary
    );
    // Pods the scheduler cannot place: the reason is the scheduler's, not a wait.
    let unschedulable = observed.unschedulable.first().map(|(pod, why)| {
        let more = observed.unschedulable.len() - 1;
        let others = if more > 0 {
            format!(" (and {more} more pods)")
        } else {
            String::new()
        };
        format!("pod {pod} cannot be scheduled{others}: {why}")
    });
    let summary = match &unschedulable {
        Some(u) => format!("{summary}; {u}"),
        None => summary,
    };
    let short_reason = if unschedulable.is_some() {
        "Unschedulable"
    } else if !full(&experts) {
        "ExpertShardUnavailable"
    } else if attention.ready_replicas < attention.replicas {
        "AttentionRankUnavailable"
    } else {
        "RouterUnavailable"
    };

    let crashed = observed.crash_looping.first().map(|(container, restarts, why)| {
        format!(
            "{container} restarted {restarts} times (restart budget {}); last stop: {why}",
            cr.spec.rollout.restart_budget
        )
    });
    let (phase, ready, progressing, degraded) = if model.pending(cr) {
        // Nothing runs before the first download: its progress is the fleet's.
        let reason = if model.failed {
            "ModelDownloadFailed"
        } else {
            "ModelDownloading"
        };
        (
            if model.failed { "Failed" } else { "Progressing" },
            (false, reason, model.message.clone()),
            (!model.failed, reason, model.message.clone()),
            (model.failed, reason, model.message.clone()),
        )
    } else if let Some(crashed) = crashed {
        let ready_reason = if serving { "Serving" } else { "RestartBudgetExhausted" };
        (
            "Failed",
            (serving, ready_reason, crashed.clone()),
            (false, "RestartBudgetExhausted", crashed.clone()),
            (true, "RestartBudgetExhausted", crashed),
        )
    } else if cutover {
        let msg = recreating_message(&old, plan);
        (
            "Progressing",
            (false, "Recreating", msg.clone()),
            (true, "Recreating", msg),
            (false, "AsExpected", String::new()),
        )
    } else if serving && all_full && !any_rolling {
        (
            "Ready",
            (true, "AllRolesReady", summary.clone()),
            (false, "RolloutComplete", summary),
            (false, "AsExpected", String::new()),
        )
    } else if serving && any_rolling {
        (
            "Progressing",
            (true, "Serving", summary.clone()),
            (true, "RollingOut", summary),
            (false, "AsExpected", String::new()),
        )
    } else if serving {
        (
            "Degraded",
            (true, "Serving", summary.clone()),
            (true, "Recovering", summary.clone()),
            (true, short_reason, summary),
        )
    } else if was_serving {
        (
            "Degraded",
            (false, short_reason, summary.clone()),
            (true, "Recovering", summary.clone()),
            (true, short_reason, summary),
        )
    } else {
        let reason = if unschedulable.is_some() {
            "Unschedulable"
        } else if any_rolling {
            "RollingOut"
        } else {
            "WaitingForPods"
        };
        let waiting = if unschedulable.is_some() {
            "Unschedulable"
        } else {
            "WaitingForPods"
        };
        (
            "Progressing",
            (false, waiting, summary.clone()),
            (true, reason, summary),
            (false, "AsExpected", String::new()),
        )
    };
    let placement_version = if cutover {
        old.placement_version.clone()
    } else {
        Some(plan.placement.version.clone())
    };
    DeepSeekV3DeploymentStatus {
        phase: Some(phase.into()),
        ready_roles: Some(format!("{ready_roles}/3")),
        replicas: attention.ready_replicas,
        placement_config_map: placement_version
            .as_ref()
            .map(|v| Names::new(&cr.name_any()).placement_config(v)),
        placement_version,
        router: Some(router),
        attention: Some(attention),
        experts: Some(experts),
        conditions: vec![
            condition(c, "Ready", ready.0, ready.1, ready.2, g, now),
            condition(c, "Progressing", progressing.0, progressing.1, progressing.2, g, now),
            condition(c, "Degraded", degraded.0, degraded.1, degraded.2, g, now),
            condition(
                c,
                "ModelReady",
                model.ready,
                model.reason,
                model.message.clone(),
                g,
                now,
            ),
        ],
        served_model: model.served.clone(),
        ..base_status(cr)
    }
}

/// Options of `dsv3-operator run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub namespace: Option<String>,
    pub metrics_addr: std::net::SocketAddr,
    pub leader_elect: bool,
    pub lease_name: String,
    pub lease_namespace: Option<String>,
    pub identity: String,
    pub concurrency: u16,
}

/// Run the controller until SIGTERM/SIGINT or loss of leadership.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let metrics = metrics.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::metrics::serve(opts.metrics_addr, metrics, shutdown).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        })
    };

    let crs: Api<DeepSeekV3Deployment> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // The CRD and the RBAC rules may be applied after the operator starts (kubectl apply -f deploy/
    // applies files in name order): wait for them for a while instead of crash-looping at once.
    let mut attempt = 0u32;
    while let Err(e) = crs.list(&ListParams::default().limit(1)).await {
        attempt += 1;
        if attempt >= 60 {
            anyhow::bail!(
                "cannot list DeepSeekV3Deployments ({e}); is the CRD installed (kubectl apply -f deploy/crd.yaml)?"
            );
        }
        tracing::warn!(error = %e, "cannot list DeepSeekV3Deployments yet (CRD or RBAC missing?); retrying");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    let signal = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
    };

    let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutdown signal received");
        let _ = sig_tx.send(true);
    });
    let signalled = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut lock = None;
    let mut lost = None;
    if opts.leader_elect {
        let ns = opts
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let l = Arc::new(crate::leader::LeaseLock::new(
            Api::namespaced(client.clone(), &ns),
            &opts.lease_name,
            &opts.identity,
            Duration::from_secs(15),
        ));
        tracing::info!(identity = %opts.identity, lease = %opts.lease_name, namespace = %ns, "waiting for leadership");
        tokio::select! {
            _ = crate::leader::acquire(&l, Duration::from_secs(2)) => {}
            _ = signalled(sig_rx.clone()) => {
                let _ = stop_tx.send(true);
                let _ = server.await;
                return Ok(());
            }
        }
        metrics.leader.set(1);
        tracing::info!("acquired leadership");
        lost = Some(crate::leader::keep_renewing(
            l.clone(),
            Duration::from_secs(5),
            Duration::from_secs(10),
        ));
        lock = Some(l);
    }

    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        Some(opts.identity.clone()),
    ));
    fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let lost_for_shutdown = lost.clone();
    let sig = sig_rx.clone();
    let shutdown = async move {
        match lost_for_shutdown {
            Some(mut rx) => {
                tokio::select! {
                    _ = signalled(sig) => {}
                    _ = rx.wait_for(|leading| !*leading) => {}
                }
            }
            None => signalled(sig).await,
        }
    };
    // Children are watched through a label selector, so the operator never caches the cluster's
    // other ConfigMaps or Services. HPAs are not watched: the HPA controller rewrites their status
    // every 15 s; the periodic requeue corrects drift on them.
    let children = watcher::Config::default()
        .labels(&format!("{}={MANAGER}", planner::LABEL_MANAGED_BY))
        .any_semantic();
    let ns = &opts.namespace;
    Controller::new(crs, watcher::Config::default().any_semantic())
        .owns(scoped::<StatefulSet>(&client, ns), children.clone())
        .owns(scoped::<Deployment>(&client, ns), children.clone())
        .owns(
            scoped::<k8s_openapi::api::core::v1::Service>(&client, ns),
            children.clone(),
        )
        .owns(scoped::<ConfigMap>(&client, ns), children.clone())
        .owns(
            scoped::<k8s_openapi::api::batch::v1::Job>(&client, ns),
            children.clone(),
        )
        .owns(
            scoped::<k8s_openapi::api::core::v1::ServiceAccount>(&client, ns),
            children.clone(),
        )
        .owns(
            scoped::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(&client, ns),
            children.clone(),
        )
        .owns(
            scoped::<k8s_openapi::api::networking::v1::NetworkPolicy>(&client, ns),
            children,
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(opts.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    tracing::info!("controller stopped");

    let lost_leadership = lost.as_ref().is_some_and(|rx| !*rx.borrow());
    if let Some(l) = lock {
        if !lost_leadership {
            if let Err(e) = l.release().await {
                tracing::warn!(error = %e, "could not release the lease");
            }
        }
    }
    metrics.leader.set(0);
    let _ = stop_tx.send(true);
    let _ = server.await;
    if lost_leadership {
        anyhow::bail!("lost leadership");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitioned_rollout_gives_the_new_generation_the_larger_half_of_the_ranks() {
        let split = |attention| {
            let h = Halving::of(attention, Some(2), 2);
            (h.serving_attention, h.next.attention)
        };
        assert_eq!(split(4), (2, 2));
        assert_eq!(split(3), (1, 2));
        // One rank: each generation needs one to serve, so one attention pod more for a while.
        assert_eq!(split(1), (1, 1));
        assert_eq!(split(0), (0, 0));
    }
}
