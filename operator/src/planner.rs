//! The planner: `DeepSeekV3Deployment` → the objects the fleet needs. Pure: no I/O, no clock, no
//! randomness, so the same spec always gives byte-identical objects and a change to the spec
//! changes only the objects that depend on the changed fields.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, RollingUpdateStatefulSetStrategy,
    StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior,
    HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, GRPCAction, HTTPGetAction, Lifecycle, LifecycleHandler, LocalObjectReference, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, SleepAction, Toleration,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;

use crate::crd::{
    DataPlane, DeepSeekV3Deployment, DeepSeekV3DeploymentSpec, FleetGeneration, GangScheduler, PodSettings,
    RoleAutoscaling, RolloutStrategy, SecretKeyRef, ServedModel, Slot, UnavailableExperts,
};
use crate::placement::{self, PlacementError, PlacementInput, PlacementPlan};

mod gang;
mod model_files;
mod overrides;
mod tls;
pub use gang::{default_scheduler_name, pod_group_name, pod_group_resource};
pub use model_files::{download_job_name, DOWNLOAD_COMPONENT, ROUTER_VIEW};

pub const ROUTER_PORT: i32 = 8000;
pub const WORKER_PORT: i32 = 50051;
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Non-root user the containers run as.
pub const RUN_AS_USER: i64 = 65532;
pub const MODEL_DIR: &str = "/model";
pub const PLACEMENT_DIR: &str = "/etc/dsv3/placement";
pub const PLACEMENT_FILE: &str = "placement.json";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
pub const LABEL_PLACEMENT_VERSION: &str = "dsv3.io/placement-version";
/// On the worker StatefulSets: the generation they run ([`FleetGeneration::revision`]).
pub const LABEL_REVISION: &str = "dsv3.io/fleet-revision";
/// On StatefulSets: which slot they are; on pods, only on the green slot's.
pub const LABEL_SLOT: &str = "dsv3.io/slot";
/// On the router Deployment: the generation its routers send to (a `FleetGeneration` as JSON), so
/// that where the routers point survives a lost status.
pub const ANNOTATION_SERVING: &str = "dsv3.io/serving";
/// Pod-index label Kubernetes puts on StatefulSet pods (beta 1.28, GA 1.32).
pub const LABEL_POD_INDEX: &str = "apps.kubernetes.io/pod-index";
pub const APP_NAME: &str = "dsv3";
pub const MANAGER: &str = "dsv3-operator";

/// The three roles of a fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Router,
    Attention,
    Expert,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Attention => "attention",
            Role::Expert => "expert",
        }
    }
}

/// What the controller knows about the cluster that changes the plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanInput {
    /// The placement version is changing and pods of the old version still run: both worker
    /// StatefulSets are planned with zero replicas so the two versions never overlap.
    pub placement_cutover: bool,
    /// With a hub source: the downloaded, verified revision the workers run (status.servedModel).
    /// None: nothing is downloaded yet, so no router or worker pod is started.
    pub served_model: Option<ServedModel>,
    /// The StatefulSets the planned generation of attention and expert pods runs in.
    pub slot: Slot,
    /// The generation the routers send to, while it is not the planned one (a blue/green
    /// rollout before the switch). None: the planned one.
    pub serving: Option<FleetGeneration>,
    /// A partitioned rollout before the switch: the planned generation starts at part of its
    /// size. None: at its full size.
    pub partition: Option<Partition>,
}

/// The part of a generation that runs during a partitioned rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub attention: i32,
    /// Expert pods, the leading ones (they hold every expert).
    pub experts: i32,
}

impl PlanInput {
    /// The fleet as it runs once its hub model is downloaded (the dry run's view).
    pub fn model_downloaded(cr: &DeepSeekV3Deployment) -> Self {
        PlanInput {
            served_model: cr.spec.model.source.hub.as_ref().map(ServedModel::of),
            ..Default::default()
        }
    }
}

/// Kinds of object the planner produces, for deleting ones that are no longer wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChildKind {
    HorizontalPodAutoscaler,
    /// A gang scheduler's PodGroup, after the gang was switched off or moved to another scheduler.
    PodGroup(GangScheduler),
}

/// The desired objects of one fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub placement: PlacementPlan,
    /// The generation of attention and expert pods planned (in `PlanInput::slot`).
    pub generation: FleetGeneration,
    pub service_account: ServiceAccount,
    pub fleet_config: ConfigMap,
    pub placement_config: ConfigMap,
    pub router_service: Service,
    pub attention_service: Service,
    pub expert_service: Service,
    pub network_policy: NetworkPolicy,
    pub expert_statefulset: StatefulSet,
    pub attention_statefulset: StatefulSet,
    pub router_deployment: Deployment,
    /// With a hub source: the Job that downloads the desired revision into the cache claim.
    pub model_download: Option<Job>,
    /// With gang scheduling: the attention and expert pods' PodGroup, and whose kind it is.
    pub pod_group: Option<(GangScheduler, kube::api::DynamicObject)>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub hpas: Vec<HorizontalPodAutoscaler>,
    /// Objects the fleet must not have (e.g. an HPA after autoscaling was switched off).
    pub absent: Vec<(ChildKind, String)>,
}

/// One planned object in a uniform shape, for diffs and dumps.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedObject {
    pub kind: &'static str,
    pub name: String,
    pub value: serde_json::Value,
}

impl Plan {
    /// All objects in apply order.
    pub fn objects(&self) -> Result<Vec<PlannedObject>, serde_json::Error> {
        let mut out = Vec::new();
        push(&mut out, "ServiceAccount", &self.service_account)?;
        push(&mut out, "ConfigMap", &self.placement_config)?;
        push(&mut out, "ConfigMap", &self.fleet_config)?;
        push(&mut out, "Service", &self.router_service)?;
        push(&mut out, "Service", &self.attention_service)?;
        push(&mut out, "Service", &self.expert_service)?;
        push(&mut out, "NetworkPolicy", &self.network_policy)?;
        push(&mut out, "StatefulSet", &self.expert_statefulset)?;
        push(&mut out, "StatefulSet", &self.attention_statefulset)?;
        push(&mut out, "Deployment", &self.router_deployment)?;
        if let Some(job) = &self.model_download {
            push(&mut out, "Job", job)?;
        }
        if let Some((_, group)) = &self.pod_group {
            out.push(PlannedObject {
                kind: "PodGroup",
                name: group.metadata.name.clone().unwrap_or_default(),
                value: serde_json::to_value(group)?,
            });
        }
        for p in &self.pdbs {
            push(&mut out, "PodDisruptionBudget", p)?;
        }
        for h in &self.hpas {
            push(&mut out, "HorizontalPodAutoscaler", h)?;
        }
        Ok(out)
    }
}

fn push<K: Resource<DynamicType = ()> + Serialize>(
    out: &mut Vec<PlannedObject>,
    kind: &'static str,
    obj: &K,
) -> Result<(), serde_json::Error> {
    let mut value = serde_json::to_value(obj)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), K::kind(&()).into());
    }
    out.push(PlannedObject {
        kind,
        name: obj.meta().name.clone().unwrap_or_default(),
        value,
    });
    Ok(())
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the resource has no {0}")]
    MissingMetadata(&'static str),
    #[error("invalid expert placement: {0}")]
    Placement(#[from] PlacementError),
    #[error("{0} must not be negative")]
    Negative(&'static str),
    #[error("{0}.podOverrides: {1}")]
    PodOverrides(&'static str, String),
}

/// Names of the children of a fleet called `name`.
pub struct Names {
    pub base: String,
}

impl Names {
    pub fn new(base: &str) -> Self {
        Self { base: base.to_string() }
    }
    /// The role's router Deployment, Services, PDB and HPA; the blue slot's StatefulSets.
    pub fn role(&self, role: Role) -> String {
        format!("{}-{}", self.base, role.as_str())
    }
    /// The StatefulSet of a worker role in `slot`.
    pub fn set(&self, role: Role, slot: Slot) -> String {
        match slot {
            Slot::Blue => self.role(role),
            Slot::Green => format!("{}-{}-green", self.base, role.as_str()),
        }
    }
    pub fn service_account(&self) -> String {
        format!("{}-fleet", self.base)
    }
    pub fn fleet_config(&self) -> String {
        format!("{}-fleet", self.base)
    }
    pub fn placement_config(&self, version: &str) -> String {
        format!("{}-placement-{}", self.base, version)
    }
    pub fn network_policy(&self) -> String {
        format!("{}-workers", self.base)
    }
}

pub fn selector_labels(instance: &str, role: Role) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
        (LABEL_COMPONENT.to_string(), role.as_str().to_string()),
    ])
}

fn labels(instance: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
        (LABEL_COMPONENT.to_string(), component.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_PART_OF.to_string(), APP_NAME.to_string()),
    ])
}

/// The label the green slot's pods carry (none for blue, whose pods predate slots).
fn slot_label(slot: Slot) -> Option<(String, String)> {
    (slot == Slot::Green).then(|| (LABEL_SLOT.to_string(), slot.as_str().to_string()))
}

/// Label selector string of the pods of one role (for the scale subresource).
pub fn selector_string(instance: &str, role: Role) -> String {
    selector_labels(instance, role)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

struct Ctx<'a> {
    name: String,
    namespace: String,
    owner: OwnerReference,
    spec: &'a DeepSeekV3DeploymentSpec,
    names: Names,
    served_model: Option<ServedModel>,
    /// Where the planned attention and expert pods run.
    slot: Slot,
}

impl<'a> Ctx<'a> {
    /// The same fleet with its planned generation in `slot`.
    fn in_slot(&self, slot: Slot) -> Ctx<'a> {
        Ctx {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            owner: self.owner.clone(),
            spec: self.spec,
            names: Names::new(&self.name),
            served_model: self.served_model.clone(),
            slot,
        }
    }

    fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.name, component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    /// Pod `i` of the role's StatefulSet in `slot`, through the role's headless Service (which
    /// selects both slots' pods).
    fn peer(&self, role: Role, slot: Slot, i: i32) -> String {
        let set = self.names.set(role, slot);
        format!(
            "{set}-{i}.{}.{}.svc:{WORKER_PORT}",
            self.names.role(role),
            self.namespace
        )
    }

    /// The planned generation's pods of a role.
    fn peers(&self, role: Role, count: i32) -> String {
        self.peers_in(role, self.slot, count)
    }

    fn peers_in(&self, role: Role, slot: Slot, count: i32) -> String {
        (0..count)
            .map(|i| self.peer(role, slot, i))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn served_model_name(&self) -> String {
        self.spec
            .model
            .served_model_name
            .clone()
            .unwrap_or_else(|| self.name.clone())
    }

    /// Attention ranks the router and the fleet config know about: the HPA's maximum when the
    /// attention role autoscales, the replica count otherwise.
    fn attention_peer_count(&self) -> i32 {
        match self.spec.autoscaling.as_ref().and_then(|a| a.attention.as_ref()) {
            Some(a) => a.max_replicas,
            None => self.spec.attention.replicas,
        }
    }
}

/// Build every desired object of a fleet.
pub fn plan(cr: &DeepSeekV3Deployment, input: &PlanInput) -> Result<Plan, PlanError> {
    let name = cr.metadata.name.clone().ok_or(PlanError::MissingMetadata("name"))?;
    let namespace = cr
        .metadata
        .namespace
        .clone()
        .ok_or(PlanError::MissingMetadata("namespace"))?;
    let owner = cr.controller_owner_ref(&()).ok_or(PlanError::MissingMetadata("uid"))?;
    let spec = &cr.spec;
    for (v, what) in [
        (spec.router.replicas, "router.replicas"),
        (spec.attention.replicas, "attention.replicas"),
        (spec.experts.redundant_experts, "experts.redundantExperts"),
        (spec.model.num_routed_experts, "model.numRoutedExperts"),
        (spec.model.num_moe_layers, "model.numMoeLayers"),
    ] {
        if v < 0 {
            return Err(PlanError::Negative(what));
        }
    }
    let hot: Vec<u32> = spec
        .experts
        .hot_experts
        .iter()
        .flatten()
        .filter_map(|&e| u32::try_from(e).ok())
        .collect();
    let placement = placement::plan(&PlacementInput {
        num_experts: spec.model.num_routed_experts as u32,
        num_moe_layers: spec.model.num_moe_layers as u32,
        pods: u32::try_from(spec.experts.replicas).unwrap_or(0),
        redundant: spec.experts.redundant_experts as u32,
        strategy: spec.experts.placement,
        hot_experts: &hot,
        halves: spec.rollout.strategy == RolloutStrategy::Partitioned,
    })?;

    let ctx = Ctx {
        names: Names::new(&name),
        name,
        namespace,
        owner,
        spec,
        served_model: input.served_model.clone(),
        slot: input.slot,
    };
    // A hub model not downloaded yet: nothing to run.
    let model_pending = spec.model.source.hub.is_some() && input.served_model.is_none();

    let placement_json = serde_json::to_string_pretty(&placement).unwrap_or_default();
    let placement_config = ConfigMap {
        metadata: {
            let mut m = ctx.meta(ctx.names.placement_config(&placement.version), "placement");
            if let Some(l) = m.labels.as_mut() {
                l.insert(LABEL_PLACEMENT_VERSION.into(), placement.version.clone());
            }
            m
        },
        immutable: Some(true),
        data: Some(BTreeMap::from([(PLACEMENT_FILE.to_string(), placement_json.clone())])),
        ..Default::default()
    };

    let fleet = fleet_config_json(&ctx, &placement);
    let fleet_config = ConfigMap {
        metadata: ctx.meta(ctx.names.fleet_config(), "config"),
        data: Some(BTreeMap::from([
            ("fleet.json".to_string(), fleet),
            (PLACEMENT_FILE.to_string(), placement_json),
        ])),
        ..Default::default()
    };

    let service_account = ServiceAccount {
        metadata: ctx.meta(ctx.names.service_account(), "fleet"),
        automount_service_account_token: Some(false),
        ..Default::default()
    };

    let router_service = Service {
        metadata: ctx.meta(ctx.names.role(Role::Router), Role::Router.as_str()),
        spec: Some(ServiceSpec {
            type_: Some(spec.router.service_type.as_str().to_string()),
            selector: Some(selector_labels(&ctx.name, Role::Router)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: ROUTER_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let attention_service = headless_service(&ctx, Role::Attention);
    let expert_service = headless_service(&ctx, Role::Expert);
    let network_policy = network_policy(&ctx);

    let worker_replicas = |role: Role| -> Option<i32> {
        if input.placement_cutover || model_pending {
            return Some(0);
        }
        // With autoscaling, the attention HPA scales this resource (its scale subresource is
        // spec.attention.replicas), so the replica count has one owner and every change of it
        // goes through the operator.
        match (role, input.partition) {
            (Role::Attention, Some(part)) => Some(part.attention),
            (Role::Attention, None) => Some(spec.attention.replicas),
            (_, Some(part)) => Some(part.experts),
            (_, None) => Some(spec.experts.replicas),
        }
    };
    let (attention_statefulset, expert_statefulset) = worker_statefulsets(&ctx, &worker_replicas, &placement)?;
    // The revision is the blue slot's templates' (the slot's own names and labels aside), so a
    // generation keeps its revision in either slot.
    let revision = if ctx.slot == Slot::Blue {
        fleet_revision(&attention_statefulset, &expert_statefulset)
    } else {
        let (a, e) = worker_statefulsets(&ctx.in_slot(Slot::Blue), &worker_replicas, &placement)?;
        fleet_revision(&a, &e)
    };
    let generation = FleetGeneration {
        revision,
        slot: ctx.slot,
        image: spec.image.clone(),
        attention_peers: ctx.attention_peer_count(),
        placement_version: placement.version.clone(),
    };
    let (mut attention_statefulset, mut expert_statefulset) = (attention_statefulset, expert_statefulset);
    for set in [&mut attention_statefulset, &mut expert_statefulset] {
        if let Some(l) = set.metadata.labels.as_mut() {
            l.insert(LABEL_REVISION.into(), generation.revision.clone());
        }
    }
    let serving = input.serving.as_ref().unwrap_or(&generation);
    let mut router_deployment = router_deployment(&ctx, serving, model_pending);
    if let (Some(patch), Some(spec)) = (&spec.router.pod.pod_overrides, router_deployment.spec.as_mut()) {
        overrides::apply(&mut spec.template, patch).map_err(|why| PlanError::PodOverrides("router", why))?;
    }
    let model_download = spec
        .model
        .source
        .hub
        .as_ref()
        .map(|hub| model_files::download_job(&ctx, hub));
    let gang_members = [&attention_statefulset, &expert_statefulset]
        .iter()
        .map(|s| s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0))
        .sum();
    let pod_group = spec
        .scheduling
        .gang
        .as_ref()
        .map(|g| (g.scheduler, gang::pod_group(&ctx, g, gang_members)));

    let pdbs = [Role::Router, Role::Attention, Role::Expert]
        .into_iter()
        .map(|role| pdb(&ctx, role, &placement, input.partition.is_some()))
        .collect();
    let mut hpas = Vec::new();
    let mut absent = Vec::new();
    for role in [Role::Router, Role::Attention] {
        match autoscaling(spec, role).filter(|_| !model_pending) {
            Some(a) => hpas.push(hpa(&ctx, role, a)),
            None => absent.push((ChildKind::HorizontalPodAutoscaler, ctx.names.role(role))),
        }
    }
    for scheduler in GangScheduler::ALL {
        if pod_group.as_ref().is_none_or(|(wanted, _)| *wanted != scheduler) {
            absent.push((
                ChildKind::PodGroup(scheduler),
                gang::pod_group_name(&ctx.name, ctx.slot),
            ));
        }
    }

    Ok(Plan {
        placement,
        generation,
        service_account,
        fleet_config,
        placement_config,
        router_service,
        attention_service,
        expert_service,
        network_policy,
        expert_statefulset,
        attention_statefulset,
        router_deployment,
        model_download,
        pod_group,
        pdbs,
        hpas,
        absent,
    })
}

/// The attention and expert StatefulSets of the planned generation, pod overrides applied.
fn worker_statefulsets(
    ctx: &Ctx<'_>,
    replicas: &dyn Fn(Role) -> Option<i32>,
    placement: &PlacementPlan,
) -> Result<(StatefulSet, StatefulSet), PlanError> {
    let mut sets = [Role::Attention, Role::Expert].map(|role| {
        let settings = match role {
            Role::Attention => &ctx.spec.attention.pod,
            _ => &ctx.spec.experts.pod,
        };
        (role, settings, worker_statefulset(ctx, role, replicas(role), placement))
    });
    for (role, settings, set) in &mut sets {
        if let (Some(patch), Some(spec)) = (&settings.pod_overrides, set.spec.as_mut()) {
            overrides::apply(&mut spec.template, patch).map_err(|why| PlanError::PodOverrides(role.as_str(), why))?;
        }
    }
    let [(_, _, attention), (_, _, experts)] = sets;
    Ok((attention, experts))
}

/// Hash of what makes a generation: the expert pod template (image, arguments, placement,
/// model revision, everything a shard runs with) and the attention ranks' image. A change of
/// the attention template alone (speculation, drain time, resources) rolls the ranks in place:
/// they reach the same shards, which run what they ran.
fn fleet_revision(attention: &StatefulSet, experts: &StatefulSet) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let template = experts.spec.as_ref().map(|s| &s.template);
    h.update(serde_json::to_vec(&template).unwrap_or_default());
    let images = attention
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers.iter().map(|c| c.image.clone()).collect::<Vec<_>>());
    h.update([0]);
    h.update(serde_json::to_vec(&images).unwrap_or_default());
    h.finalize().iter().take(5).map(|b| format!("{b:02x}")).collect()
}

fn autoscaling(spec: &DeepSeekV3DeploymentSpec, role: Role) -> Option<&RoleAutoscaling> {
    let a = spec.autoscaling.as_ref()?;
    match role {
        Role::Router => a.router.as_ref(),
        Role::Attention => a.attention.as_ref(),
        Role::Expert => None,
    }
}

fn fleet_config_json(ctx: &Ctx<'_>, placement: &PlacementPlan) -> String {
    let s = ctx.spec;
    let v = serde_json::json!({
        "name": ctx.name,
        "servedModelName": ctx.served_model_name(),
        "dataPlane": s.data_plane.as_str(),
        "model": {
            "dir": MODEL_DIR,
            "numRoutedExperts": s.model.num_routed_experts,
            "numMoeLayers": s.model.num_moe_layers,
        },
        "batching": {
            "maxNumSeqs": s.batching.max_num_seqs,
            "maxBatchTokens": s.batching.max_batch_tokens,
            "maxModelLen": s.batching.max_model_len,
        },
        "mtp": { "enabled": s.mtp.enabled, "numSpeculativeTokens": s.mtp.num_speculative_tokens },
        "router": {
            "service": format!("{}.{}.svc:{ROUTER_PORT}", ctx.names.role(Role::Router), ctx.namespace),
        },
        "attention": {
            "gpusPerPod": s.attention.gpus_per_pod,
            "peers": ctx.peers(Role::Attention, ctx.attention_peer_count()).split(',').collect::<Vec<_>>(),
        },
        "experts": {
            "gpusPerPod": s.experts.gpus_per_pod,
            "peers": ctx.peers(Role::Expert, s.experts.replicas).split(',').collect::<Vec<_>>(),
        },
        "placementVersion": placement.version,
        "placementConfigMap": ctx.names.placement_config(&placement.version),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn headless_service(ctx: &Ctx<'_>, role: Role) -> Service {
    Service {
        metadata: ctx.meta(ctx.names.role(role), role.as_str()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Ranks must find each other before they are ready (NCCL bootstrap, peer handshake).
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&ctx.name, role)),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: WORKER_PORT,
                target_port: Some(IntOrString::String("grpc".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn network_policy(ctx: &Ctx<'_>) -> NetworkPolicy {
    // gRPC data plane: only the worker port. NCCL over sockets uses ephemeral ports between
    // ranks, so the fleet may reach every port of its own workers (nobody else may).
    let ports = match ctx.spec.data_plane {
        DataPlane::Grpc => Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(WORKER_PORT)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        DataPlane::Nccl => None,
    };
    let mut ingress = vec![NetworkPolicyIngressRule {
        from: Some(vec![NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (LABEL_NAME.to_string(), APP_NAME.to_string()),
                    (LABEL_INSTANCE.to_string(), ctx.name.clone()),
                ])),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ports,
    }];
    // The scraper reaches the worker port, where /metrics is served beside gRPC.
    if let Some(namespace) = &ctx.spec.metrics.scraper_namespace {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_string(),
                        namespace.clone(),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::Int(WORKER_PORT)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        });
    }
    NetworkPolicy {
        metadata: ctx.meta(ctx.names.network_policy(), "network"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (LABEL_NAME.to_string(), APP_NAME.to_string()),
                    (LABEL_INSTANCE.to_string(), ctx.name.clone()),
                ])),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: LABEL_COMPONENT.into(),
                    operator: "In".into(),
                    values: Some(vec![Role::Attention.as_str().into(), Role::Expert.as_str().into()]),
                }]),
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..Default::default()
        }),
    }
}

/// Voluntary disruptions a role's pods may take at once: the rollout's limit, and for the expert
/// shards no more than leaves every expert on a live shard — with an expert that only one shard
/// holds, none (a node drain waits until the fleet is changed). The attention and expert budgets
/// are per slot (named as the slot's StatefulSets, selecting only its pods): during a blue/green
/// rollout each generation is held to its own placement, and the serving one's budget stays as
/// applied until its slot is deleted.
/// `partitioned`: only the leading expert pods run, each holding experts no other running pod
/// holds, so none may be evicted.
fn pdb(ctx: &Ctx<'_>, role: Role, placement: &PlacementPlan, partitioned: bool) -> PodDisruptionBudget {
    let mut max_unavailable = ctx.spec.rollout.max_unavailable;
    if role == Role::Expert {
        let spare_copies = if partitioned {
            0
        } else {
            placement.shard_losses_covered()
        };
        max_unavailable = max_unavailable.min(i32::try_from(spare_copies).unwrap_or(i32::MAX));
    }
    let (name, selector) = match role {
        Role::Router => (
            ctx.names.role(role),
            LabelSelector {
                match_labels: Some(selector_labels(&ctx.name, role)),
                ..Default::default()
            },
        ),
        Role::Attention | Role::Expert => (ctx.names.set(role, ctx.slot), slot_selector(&ctx.name, role, ctx.slot)),
    };
    PodDisruptionBudget {
        metadata: ctx.meta(name, role.as_str()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
            selector: Some(selector),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pods of one role in one slot: the green slot's carry its label, the blue slot's none.
fn slot_selector(instance: &str, role: Role, slot: Slot) -> LabelSelector {
    let mut labels = selector_labels(instance, role);
    labels.extend(slot_label(slot));
    LabelSelector {
        match_labels: Some(labels),
        match_expressions: (slot == Slot::Blue).then(|| {
            vec![LabelSelectorRequirement {
                key: LABEL_SLOT.into(),
                operator: "DoesNotExist".into(),
                values: None,
            }]
        }),
    }
}

fn hpa(ctx: &Ctx<'_>, role: Role, a: &RoleAutoscaling) -> HorizontalPodAutoscaler {
    use kube::Resource;
    // The router's Deployment is scaled directly; the attention ranks through this resource's
    // scale subresource (spec.attention.replicas), which the operator turns into the
    // StatefulSet, the fleet config and the router's peers.
    let (api_version, kind, name) = match role {
        Role::Router => ("apps/v1".to_string(), "Deployment".to_string(), ctx.names.role(role)),
        _ => (
            DeepSeekV3Deployment::api_version(&()).into_owned(),
            DeepSeekV3Deployment::kind(&()).into_owned(),
            ctx.name.clone(),
        ),
    };
    let mut metrics = Vec::new();
    if let Some(m) = &a.target_metric {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: m.name.clone(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(m.average_value.clone())),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    if a.target_cpu_utilization.is_some() || a.target_metric.is_none() {
        metrics.push(MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(a.target_cpu_utilization.unwrap_or(70)),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    HorizontalPodAutoscaler {
        metadata: ctx.meta(ctx.names.role(role), role.as_str()),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(api_version),
                kind,
                name,
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(metrics),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(a.scale_down_stabilization_seconds),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn secret_env(name: &str, s: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: s.name.clone(),
                key: s.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The environment of a role's pods: the pod's identity for every role, and each setting the
/// worker's clap `env` fallbacks read only on the roles that read it (the contract test in
/// `worker/src/contract_tests.rs` holds every `DSV3_*` name here to an argument of that role).
fn role_env(ctx: &Ctx<'_>, role: Role) -> Vec<EnvVar> {
    let s = ctx.spec;
    let mut envs = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        env("HOME", "/tmp"),
    ];
    match role {
        Role::Router => envs.extend([
            env("DSV3_SERVED_MODEL_NAME", ctx.served_model_name()),
            env("DSV3_MAX_NUM_SEQS", s.batching.max_num_seqs.to_string()),
            env("DSV3_MAX_BATCH_TOKENS", s.batching.max_batch_tokens.to_string()),
            env("DSV3_MAX_MODEL_LEN", s.batching.max_model_len.to_string()),
        ]),
        // `--speculative-tokens`; 0 turns speculation off.
        Role::Attention => envs.push(env(
            "DSV3_SPECULATIVE_TOKENS",
            if s.mtp.enabled {
                s.mtp.num_speculative_tokens.max(0)
            } else {
                0
            }
            .to_string(),
        )),
        Role::Expert => {}
    }
    envs
}

/// The container security context; `ipc_lock` adds the one capability RDMA needs (pinning memory).
fn container_security(ipc_lock: bool) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: ipc_lock.then(|| vec!["IPC_LOCK".into()]),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The container's resources: the role's own, GPUs from gpusPerPod (none when 0, whatever the
/// role's resources say), and the network's RDMA devices when the pod gets them.
fn resources(settings: &PodSettings, gpus: i32, rdma: Option<(&str, i32)>) -> Option<ResourceRequirements> {
    let mut r = settings.resources.clone().unwrap_or_default();
    // An extended resource is a limit, and a request too where the role sets requests.
    let add = |r: &mut ResourceRequirements, name: &str, count: i32| {
        r.limits
            .get_or_insert_with(BTreeMap::new)
            .insert(name.into(), Quantity(count.to_string()));
        if let Some(req) = r.requests.as_mut() {
            req.insert(name.into(), Quantity(count.to_string()));
        }
    };
    if gpus > 0 {
        add(&mut r, GPU_RESOURCE, gpus);
    } else {
        for m in [r.limits.as_mut(), r.requests.as_mut()].into_iter().flatten() {
            m.remove(GPU_RESOURCE);
        }
    }
    if let Some((name, count)) = rdma {
        add(&mut r, name, count);
    }
    if r == ResourceRequirements::default() {
        None
    } else {
        Some(r)
    }
}

fn tolerations(settings: &PodSettings, gpus: i32) -> Option<Vec<Toleration>> {
    let mut t = settings.tolerations.clone();
    if gpus > 0 && !t.iter().any(|x| x.key.as_deref() == Some(GPU_RESOURCE)) {
        t.push(Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
    (!t.is_empty()).then_some(t)
}

struct PodParts {
    role: Role,
    args: Vec<String>,
    env: Vec<EnvVar>,
    ports: Vec<ContainerPort>,
    startup: Probe,
    readiness: Probe,
    liveness: Probe,
    extra_volumes: Vec<Volume>,
    extra_mounts: Vec<VolumeMount>,
    gpus: i32,
    extra_labels: BTreeMap<String, String>,
    grace: i64,
    /// Seconds the pod keeps running after it is taken out of its Service's endpoints and
    /// before it gets SIGTERM (0: none), so no new request reaches a stopping pod.
    pre_stop_seconds: i64,
}

/// A router pod's wait between leaving the Service's endpoints and SIGTERM.
const ROUTER_PRE_STOP_SECONDS: i64 = 5;
/// Grace beyond the drain, for the process to exit.
const DRAIN_MARGIN_SECONDS: i64 = 15;

fn pod_template(ctx: &Ctx<'_>, settings: &PodSettings, parts: PodParts) -> PodTemplateSpec {
    let spec = ctx.spec;
    let mut pod_labels = selector_labels(&ctx.name, parts.role);
    pod_labels.insert(LABEL_MANAGED_BY.into(), MANAGER.into());
    pod_labels.insert(LABEL_PART_OF.into(), APP_NAME.into());
    pod_labels.extend(parts.extra_labels);
    // The attention ranks and expert shards are the gang; the router is scheduled as usual.
    let gang = spec.scheduling.gang.as_ref().filter(|_| parts.role != Role::Router);
    let (gang_labels, gang_annotations) = gang.map(|g| gang::membership(ctx, g)).unwrap_or_default();
    pod_labels.extend(gang_labels);
    let mut annotations = settings.pod_annotations.clone();
    annotations.extend(gang_annotations);
    let scheduler_name = (parts.role != Role::Router)
        .then(|| {
            spec.scheduling
                .scheduler_name
                .clone()
                .or_else(|| gang.map(|g| default_scheduler_name(g.scheduler).to_string()))
        })
        .flatten();

    // The attention ranks and expert shards talk to each other: the network section is theirs.
    let network = (parts.role != Role::Router).then_some(&spec.network);
    let mut envs = role_env(ctx, parts.role);
    if let Some(n) = network {
        for (name, value) in [("NCCL_IB_HCA", &n.ib_hcas), ("NCCL_SOCKET_IFNAME", &n.socket_interface)] {
            if let Some(v) = value {
                envs.push(env(name, v.clone()));
            }
        }
    }
    envs.extend(parts.env);
    envs.extend(settings.env.iter().cloned());

    let mut volumes = vec![
        model_files::volume(ctx),
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("1Gi".into())),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        model_files::mount(ctx, parts.role),
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ];
    if parts.gpus > 0 {
        // NCCL and CUDA IPC want a large /dev/shm; the container default is 64 MiB.
        volumes.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("16Gi".into())),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        });
    }
    volumes.extend(parts.extra_volumes);
    mounts.extend(parts.extra_mounts);
    let mut args = parts.args;
    if let Some(t) = &spec.tls {
        volumes.push(tls::volume(t));
        mounts.push(tls::mount());
        args.extend(tls::args());
    }

    let rdma = network.and_then(|n| n.rdma_resource.as_deref().map(|r| (r, n.rdma_devices_per_pod)));

    let container = Container {
        name: parts.role.as_str().into(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.as_str().into()),
        command: Some(vec!["dsv3-worker".into()]),
        args: Some(args),
        env: Some(envs),
        ports: Some(parts.ports),
        resources: resources(settings, parts.gpus, rdma),
        startup_probe: Some(parts.startup),
        readiness_probe: Some(parts.readiness),
        liveness_probe: Some(parts.liveness),
        volume_mounts: Some(mounts),
        security_context: Some(container_security(network.is_some_and(|n| n.ipc_lock))),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        lifecycle: (parts.pre_stop_seconds > 0).then(|| Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: parts.pre_stop_seconds,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(ctx.names.service_account()),
            automount_service_account_token: Some(false),
            security_context: Some(pod_security()),
            scheduler_name,
            containers: vec![container],
            volumes: Some(volumes),
            node_selector: (!settings.node_selector.is_empty()).then(|| settings.node_selector.clone()),
            tolerations: tolerations(settings, parts.gpus),
            affinity: settings.affinity.clone(),
            topology_spread_constraints: Some(topology_spread(ctx, settings, parts.role)),
            priority_class_name: settings.priority_class_name.clone(),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
                spec.image_pull_secrets
                    .iter()
                    .map(|n| LocalObjectReference { name: n.clone() })
                    .collect()
            }),
            termination_grace_period_seconds: Some(parts.grace),
            enable_service_links: Some(false),
            ..Default::default()
        }),
    }
}

/// The role's spread: as the user set it, or over nodes as evenly as the scheduler can without
/// refusing one (a lost node then takes as few of the role's pods as possible).
fn topology_spread(ctx: &Ctx<'_>, settings: &PodSettings, role: Role) -> Vec<TopologySpreadConstraint> {
    if !settings.topology_spread_constraints.is_empty() {
        return settings.topology_spread_constraints.clone();
    }
    vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(&ctx.name, role)),
            ..Default::default()
        }),
        ..Default::default()
    }]
}

/// Startup probe budget: the model's load timeout in 10-second periods.
pub fn startup_failure_threshold(load_timeout_seconds: i32) -> i32 {
    (load_timeout_seconds.max(10) + 9) / 10
}

/// A rank's health probe: the kubelet's gRPC probe, or `dsv3-worker probe` over mutual TLS.
fn rank_probe(ctx: &Ctx<'_>, role: Role, period: i32, failure: i32, timeout: i32) -> Probe {
    match ctx.spec.tls {
        Some(_) => tls::probe(ctx, role, period, failure, timeout),
        None => grpc_probe(period, failure, timeout),
    }
}

fn grpc_probe(period: i32, failure: i32, timeout: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port: WORKER_PORT,
            service: None,
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure),
        timeout_seconds: Some(timeout),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failure: i32, timeout: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure),
        timeout_seconds: Some(timeout),
        ..Default::default()
    }
}

/// What NCCL needs in a rank's pod: NVLink multicast (NVLS) off, since a pair of ranks only
/// sends and receives, and multicast objects fail in containers that do not share the host's
/// IPC. (Interfaces and /dev/shm come from `spec.network` and the pod's volumes.)
fn nccl_env(data_plane: DataPlane) -> Vec<EnvVar> {
    match data_plane {
        DataPlane::Grpc => Vec::new(),
        DataPlane::Nccl => vec![env("NCCL_NVLS_ENABLE", "0")],
    }
}

fn worker_statefulset(ctx: &Ctx<'_>, role: Role, replicas: Option<i32>, placement: &PlacementPlan) -> StatefulSet {
    let spec = ctx.spec;
    let (settings, gpus) = match role {
        Role::Attention => (&spec.attention.pod, spec.attention.gpus_per_pod),
        _ => (&spec.experts.pod, spec.experts.gpus_per_pod),
    };
    let placement_file = format!("{PLACEMENT_DIR}/{PLACEMENT_FILE}");
    let mut args = vec![
        role.as_str().to_string(),
        "--model".into(),
        model_files::model_path(ctx),
        "--host".into(),
        "0.0.0.0".into(),
        "--port".into(),
        WORKER_PORT.to_string(),
        "--rank".into(),
        "$(DSV3_RANK)".into(),
        "--expert-peers".into(),
        ctx.peers(Role::Expert, spec.experts.replicas),
        "--placement".into(),
        placement_file,
        "--data-plane".into(),
        spec.data_plane.as_str().into(),
        // Pods with GPUs must run on them: `auto` would fall back to the CPU if the driver were missing.
        "--device".into(),
        if gpus > 0 { "cuda" } else { "cpu" }.into(),
    ];
    if role == Role::Attention {
        args.extend(["--drain-seconds".into(), spec.rollout.drain_seconds.to_string()]);
        // Only when not the default, so existing fleets' pods are not rolled for it.
        if spec.experts.unavailable != UnavailableExperts::End {
            args.extend(["--unavailable-experts".into(), spec.experts.unavailable.as_str().into()]);
        }
    }
    // Expert pods answer whoever dispatches to them and get no attention peer list, so scaling
    // the attention role never restarts them.
    let startup = rank_probe(
        ctx,
        role,
        10,
        startup_failure_threshold(spec.model.load_timeout_seconds),
        5,
    );
    let parts = PodParts {
        role,
        args,
        env: [field_env("DSV3_RANK", &format!("metadata.labels['{LABEL_POD_INDEX}']"))]
            .into_iter()
            .chain(nccl_env(spec.data_plane))
            .collect(),
        ports: vec![ContainerPort {
            name: Some("grpc".into()),
            container_port: WORKER_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }],
        startup,
        readiness: rank_probe(ctx, role, 10, 3, 5),
        liveness: rank_probe(ctx, role, 20, 6, 10),
        extra_volumes: vec![Volume {
            name: "placement".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ctx.names.placement_config(&placement.version),
                ..Default::default()
            }),
            ..Default::default()
        }],
        extra_mounts: vec![VolumeMount {
            name: "placement".into(),
            mount_path: PLACEMENT_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }],
        gpus,
        extra_labels: {
            let mut l = BTreeMap::from([(LABEL_PLACEMENT_VERSION.to_string(), placement.version.clone())]);
            l.extend(slot_label(ctx.slot));
            l
        },
        // An attention rank drains its sequences on SIGTERM; an expert shard serves until then.
        grace: match role {
            Role::Attention => i64::from(spec.rollout.drain_seconds) + DRAIN_MARGIN_SECONDS,
            _ => 30,
        },
        pre_stop_seconds: 0,
    };
    let template = pod_template(ctx, settings, parts);
    // The green set's pods carry its slot label and its selector asks for it; the blue set
    // keeps the selector it always had (selectors cannot change), which matches green pods
    // too, but a StatefulSet only counts and adopts pods no other controller owns.
    let mut selector = selector_labels(&ctx.name, role);
    selector.extend(slot_label(ctx.slot));
    StatefulSet {
        metadata: {
            let mut m = ctx.meta(ctx.names.set(role, ctx.slot), role.as_str());
            if let Some(l) = m.labels.as_mut() {
                l.insert(LABEL_PLACEMENT_VERSION.into(), placement.version.clone());
                l.insert(LABEL_SLOT.into(), ctx.slot.as_str().into());
            }
            m
        },
        spec: Some(StatefulSetSpec {
            replicas,
            // The role's Service selects both slots' pods: each pod's DNS name is its own.
            service_name: Some(ctx.names.role(role)),
            // All ranks start together: ranks wait for their peers, so ordered start would deadlock.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    max_unavailable: Some(IntOrString::Int(spec.rollout.max_unavailable)),
                    partition: None,
                }),
            }),
            template,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The routers, sending to the `serving` generation and running its image.
fn router_deployment(ctx: &Ctx<'_>, serving: &FleetGeneration, model_pending: bool) -> Deployment {
    let spec = ctx.spec;
    let args = vec![
        "router".to_string(),
        "--model".into(),
        model_files::model_path(ctx),
        "--host".into(),
        "0.0.0.0".into(),
        "--port".into(),
        ROUTER_PORT.to_string(),
        "--attention-peers".into(),
        ctx.peers_in(Role::Attention, serving.slot, serving.attention_peers),
        "--data-plane".into(),
        spec.data_plane.as_str().into(),
    ];
    let mut extra_env = Vec::new();
    if let Some(k) = &spec.router.api_key_secret {
        extra_env.push(secret_env("DSV3_API_KEY", k));
    }
    let parts = PodParts {
        role: Role::Router,
        args,
        env: extra_env,
        ports: vec![ContainerPort {
            name: Some("http".into()),
            container_port: ROUTER_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }],
        startup: http_probe(
            "/health",
            10,
            startup_failure_threshold(spec.model.load_timeout_seconds),
            5,
        ),
        readiness: http_probe("/ready", 5, 3, 5),
        liveness: http_probe("/health", 20, 6, 10),
        extra_volumes: vec![],
        extra_mounts: vec![],
        gpus: spec.router.gpus_per_pod,
        extra_labels: BTreeMap::new(),
        // Out of the Service's endpoints first, then SIGTERM: running streams finish.
        grace: i64::from(spec.rollout.drain_seconds) + ROUTER_PRE_STOP_SECONDS + DRAIN_MARGIN_SECONDS,
        pre_stop_seconds: ROUTER_PRE_STOP_SECONDS,
    };
    let mut template = pod_template(ctx, &spec.router.pod, parts);
    if let Some(pod) = template.spec.as_mut() {
        for c in &mut pod.containers {
            c.image = Some(serving.image.clone());
        }
    }
    let replicas = if model_pending {
        Some(0)
    } else if autoscaling(spec, Role::Router).is_some() {
        None
    } else {
        Some(spec.router.replicas)
    };
    let mut metadata = ctx.meta(ctx.names.role(Role::Router), Role::Router.as_str());
    metadata.annotations = serde_json::to_string(serving)
        .ok()
        .map(|json| BTreeMap::from([(ANNOTATION_SERVING.to_string(), json)]));
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(selector_labels(&ctx.name, Role::Router)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(spec.rollout.max_surge)),
                    max_unavailable: Some(IntOrString::Int(spec.rollout.max_unavailable)),
                }),
            }),
            template,
            ..Default::default()
        }),
        ..Default::default()
    }
}
