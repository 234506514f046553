//! The `DeepSeekV3Deployment` custom resource (`dsv3.io/v1alpha1`).
//!
//! The schema, defaults, printer columns, subresources and CEL rules all come from these types;
//! `dsv3-operator crd` prints the resulting CustomResourceDefinition.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every dsv3 resource.
pub const GROUP: &str = "dsv3.io";
/// Largest number of GPUs one pod may ask for (one node).
pub const MAX_GPUS_PER_POD: i32 = 8;
/// DeepSeek-V3 geometry.
pub const DEFAULT_ROUTED_EXPERTS: i32 = 256;
pub const DEFAULT_MOE_LAYERS: i32 = 58;
pub const DEFAULT_IMAGE: &str = "ghcr.io/dsv3/dsv3-worker:0.1.0";

/// A DeepSeek-V3 serving fleet: a router, attention workers (data-parallel ranks) and expert
/// workers (expert-parallel ranks that hold the routed experts as the placement plan says).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dsv3.io",
    version = "v1alpha1",
    kind = "DeepSeekV3Deployment",
    plural = "deepseekv3deployments",
    singular = "deepseekv3deployment",
    shortname = "dsv3",
    category = "dsv3",
    namespaced,
    status = "DeepSeekV3DeploymentStatus",
    derive = "PartialEq",
    doc = "A DeepSeek-V3 serving fleet: router, attention workers and expert workers.",
    scale(
        spec_replicas_path = ".spec.attention.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.readyRoles",
        description = "Roles at full strength / roles"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Router",
        type_ = "string",
        json_path = ".status.router.summary",
        priority = 1
    ),
    printcolumn(name = "Attention", type_ = "string", json_path = ".status.attention.summary"),
    printcolumn(name = "Experts", type_ = "string", json_path = ".status.experts.summary"),
    printcolumn(
        name = "Placement",
        type_ = "string",
        json_path = ".status.placementVersion",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = ::kube::core::Rule::new("size(self.metadata.name) <= 40")
        .message("metadata.name must be at most 40 characters: it prefixes the StatefulSet and pod names")
        .reason(::kube::core::Reason::FieldValueInvalid),
    cel
)]
#[x_kube(
    validation = ::kube::core::Rule::new(
        "(self.model.numRoutedExperts + self.experts.redundantExperts) % self.experts.replicas == 0"
    )
    .message("expert pods must evenly host the expert slots: model.numRoutedExperts + experts.redundantExperts must be divisible by experts.replicas")
    .field_path(".experts.replicas")
    .reason(::kube::core::Reason::FieldValueInvalid),
    validation = ::kube::core::Rule::new("self.experts.redundantExperts == 0 || self.experts.replicas >= 2")
        .message("experts.redundantExperts needs at least 2 expert pods: a redundant copy must live on a different pod than the original")
        .field_path(".experts.redundantExperts")
        .reason(::kube::core::Reason::FieldValueInvalid),
    validation = ::kube::core::Rule::new("self.experts.redundantExperts <= self.model.numRoutedExperts")
        .message("experts.redundantExperts must not exceed model.numRoutedExperts (at most one redundant copy per expert)")
        .field_path(".experts.redundantExperts")
        .reason(::kube::core::Reason::FieldValueInvalid),
    validation = ::kube::core::Rule::new(
        "!has(self.experts.hotExperts) || self.experts.hotExperts.all(e, e < self.model.numRoutedExperts)"
    )
    .message("experts.hotExperts must be expert ids below model.numRoutedExperts")
    .field_path(".experts.hotExperts")
    .reason(::kube::core::Reason::FieldValueInvalid),
    validation = ::kube::core::Rule::new(
        "!has(self.experts.hotExperts) || self.experts.hotExperts.size() <= self.experts.redundantExperts"
    )
    .message("experts.hotExperts lists more experts than experts.redundantExperts has copies")
    .field_path(".experts.hotExperts")
    .reason(::kube::core::Reason::FieldValueInvalid),
    validation = ::kube::core::Rule::new("self.dataPlane != 'nccl' || (self.attention.gpusPerPod == 1 && self.experts.gpusPerPod == 1)")
        .message("dataPlane nccl needs one GPU per rank: attention.gpusPerPod and experts.gpusPerPod must be 1 (use dataPlane grpc for CPU fleets)")
        .field_path(".dataPlane")
        .reason(::kube::core::Reason::FieldValueInvalid),
    validation = ::kube::core::Rule::new("self.dataPlane != 'nccl' || self.experts.unavailable != 'mask'")
        .message("experts.unavailable mask is not available with dataPlane nccl: a shard that leaves the NCCL data plane ends its requests (use end, or dataPlane grpc)")
        .field_path(".experts.unavailable")
        .reason(::kube::core::Reason::FieldValueInvalid),
    validation = ::kube::core::Rule::new(
        "self.rollout.strategy != 'Partitioned' || (self.experts.redundantExperts == self.model.numRoutedExperts && self.experts.replicas % 2 == 0)"
    )
    .message("rollout.strategy Partitioned runs each generation on half its expert pods, which must hold every expert: experts.redundantExperts must equal model.numRoutedExperts and experts.replicas be even")
    .field_path(".rollout.strategy")
    .reason(::kube::core::Reason::FieldValueInvalid),
    validation = ::kube::core::Rule::new("!self.mtp.enabled || (self.mtp.numSpeculativeTokens >= 1 && self.mtp.numSpeculativeTokens <= 4)")
        .message("mtp.numSpeculativeTokens must be between 1 and 4 when MTP is enabled")
        .field_path(".mtp.numSpeculativeTokens")
        .reason(::kube::core::Reason::FieldValueInvalid),
)]
#[serde(rename_all = "camelCase")]
pub struct DeepSeekV3DeploymentSpec {
    /// Where the weights come from and the model geometry.
    pub model: ModelSpec,

    /// Worker image; it runs `dsv3-worker`.
    #[serde(default = "default_image")]
    pub image: String,

    /// Image pull policy of every fleet container.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,

    /// Names of Secrets in the namespace used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,

    /// The router: OpenAI-compatible HTTP front end, tokenizer, scheduler.
    #[serde(default)]
    pub router: RouterSpec,

    /// Attention workers: one data-parallel rank per pod.
    #[serde(default)]
    pub attention: AttentionSpec,

    /// Expert workers: one expert-parallel rank per pod.
    #[serde(default)]
    pub experts: ExpertSpec,

    /// How attention and expert workers exchange activations.
    #[serde(default)]
    pub data_plane: DataPlane,

    /// Scheduler limits of the router and the attention workers.
    #[serde(default)]
    pub batching: BatchingSpec,

    /// Multi-token prediction (speculative decoding with the MTP module).
    #[serde(default)]
    pub mtp: MtpSpec,

    /// Horizontal autoscaling of the router and of the attention workers. Absent: fixed replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Rolling-update limits.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Who scrapes the workers' metrics.
    #[serde(default)]
    pub metrics: MetricsSpec,

    /// The network between attention ranks and expert shards (RDMA devices, interfaces).
    #[serde(default)]
    pub network: NetworkSpec,

    /// How the attention and expert pods are scheduled (a scheduler, gang scheduling).
    #[serde(default)]
    pub scheduling: SchedulingSpec,

    /// Mutual TLS on the fleet's gRPC (router → attention ranks → expert shards). Absent: plain
    /// gRPC, which the fleet's NetworkPolicy closes to other pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<FleetTlsSpec>,
}

/// The certificate every member of the fleet presents, and the CA it checks its peers against.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FleetTlsSpec {
    /// A Secret in the fleet's namespace with `tls.crt`, `tls.key` and `ca.crt`, as a
    /// cert-manager Certificate writes it. The certificate is used as server and as client, and
    /// must name every attention and expert pod: `*.NAME-attention.NAMESPACE.svc` and
    /// `*.NAME-expert.NAMESPACE.svc`. Members read it when they start: a renewed certificate is
    /// taken up as pods restart.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// The scheduler of the attention and expert pods (the router is scheduled as usual).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// schedulerName of the attention and expert pods (default: the gang scheduler's, else the
    /// cluster's default scheduler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: Option<String>,
    /// Place every attention rank and expert shard together or none: one PodGroup whose
    /// minMember is their planned pod count, so a fleet never holds part of its GPUs waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<GangSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = ::kube::core::Rule::new("!has(self.queue) || self.scheduler == 'volcano' || self.scheduler == 'kai'")
        .message("scheduling.gang.queue applies to the volcano and kai schedulers only")
        .reason(::kube::core::Reason::FieldValueForbidden),
    validation = ::kube::core::Rule::new("!has(self.scheduleTimeoutSeconds) || self.scheduler == 'coscheduling'")
        .message("scheduling.gang.scheduleTimeoutSeconds applies to the coscheduling plugin only")
        .reason(::kube::core::Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct GangSpec {
    /// Whose PodGroup: Volcano's (scheduling.volcano.sh), the scheduler-plugins coscheduling
    /// plugin's (scheduling.x-k8s.io) or NVIDIA KAI Scheduler's (scheduling.run.ai). Its CRD
    /// must be installed.
    pub scheduler: GangScheduler,
    /// Queue of the group (Volcano's or KAI's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub queue: Option<String>,
    /// How long the coscheduling plugin waits for the whole group (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub schedule_timeout_seconds: Option<i32>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum GangScheduler {
    Volcano,
    Coscheduling,
    Kai,
}

impl GangScheduler {
    pub const ALL: [GangScheduler; 3] = [GangScheduler::Volcano, GangScheduler::Coscheduling, GangScheduler::Kai];

    pub fn as_str(self) -> &'static str {
        match self {
            GangScheduler::Volcano => "volcano",
            GangScheduler::Coscheduling => "coscheduling",
            GangScheduler::Kai => "kai",
        }
    }
}

/// What the attention and expert pods get to reach each other fast. Absent fields change
/// nothing; NCCL_* variables are set for the data plane's collective library.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Extended resource of the RDMA devices each attention and expert pod requests (e.g.
    /// "rdma/ib" from the RDMA shared device plugin, or "nvidia.com/hostdev").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub rdma_resource: Option<String>,
    /// Devices of `rdmaResource` per pod.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub rdma_devices_per_pod: i32,
    /// InfiniBand HCAs to use (NCCL_IB_HCA), e.g. "mlx5_0,mlx5_1" or "=mlx5_0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub ib_hcas: Option<String>,
    /// Interface of socket traffic and bootstrap (NCCL_SOCKET_IFNAME), e.g. "eth0" or "^lo".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub socket_interface: Option<String>,
    /// Add the IPC_LOCK capability (RDMA pins memory) to attention and expert containers.
    #[serde(default)]
    pub ipc_lock: bool,
}

/// The router serves /metrics on its HTTP port; every attention rank and expert shard on its
/// gRPC port (HTTP/1.1 beside gRPC), which the fleet's NetworkPolicy closes to other pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Namespace of the Prometheus that scrapes the workers (e.g. "monitoring"): the
    /// NetworkPolicy lets its pods reach the workers' port. Absent: only the fleet's own pods
    /// reach them, and the workers' /metrics cannot be scraped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub scraper_namespace: Option<String>,
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}

/// The model: where the checkpoint lives and the geometry the placement plan needs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Exactly one source of the Hugging Face checkpoint directory.
    pub source: ModelSource,

    /// Model name served under /v1/models. Default: the resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,

    /// Number of routed experts per MoE layer (256 for DeepSeek-V3).
    #[serde(default = "default_routed_experts")]
    #[schemars(range(min = 1, max = 4096))]
    pub num_routed_experts: i32,

    /// Number of MoE layers (58 for DeepSeek-V3).
    #[serde(default = "default_moe_layers")]
    #[schemars(range(min = 1, max = 1024))]
    pub num_moe_layers: i32,

    /// Time a worker may take to load the model before its startup probe gives up.
    #[serde(default = "default_load_timeout")]
    #[schemars(range(min = 60, max = 86400))]
    pub load_timeout_seconds: i32,
}

fn default_routed_experts() -> i32 {
    DEFAULT_ROUTED_EXPERTS
}
fn default_moe_layers() -> i32 {
    DEFAULT_MOE_LAYERS
}
fn default_load_timeout() -> i32 {
    3600
}

/// Source of the model directory. Set exactly one field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = ::kube::core::Rule::new("[has(self.pvc), has(self.hostPath), has(self.hub)].filter(x, x).size() == 1")
        .message("model.source: set exactly one of pvc, hostPath, hub")
        .reason(::kube::core::Reason::FieldValueInvalid)
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// A PersistentVolumeClaim that holds the checkpoint (ReadOnlyMany or ReadWriteMany for
    /// fleets that span nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// A directory on every node (pre-staged weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    /// A Hugging Face hub repository, downloaded once per (repository, revision) by a Job into
    /// a cache PVC; the workers start when it is there and verified (condition ModelReady).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubSource>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory inside the volume that holds config.json and the safetensors shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    #[x_kube(validation = ::kube::core::Rule::new("self.startsWith('/')").message("hostPath.path must be absolute"))]
    pub path: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HubSource {
    /// Repository id, e.g. deepseek-ai/DeepSeek-V3-0324.
    #[schemars(length(min = 1, max = 96))]
    #[x_kube(validation = ::kube::core::Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$') && !self.contains('..')").message("hub.repo must be a hub repository id, e.g. deepseek-ai/DeepSeek-V3-0324"))]
    pub repo: String,
    /// Branch, tag or commit. It is downloaded once (a Job into the cache claim); a branch is
    /// read at that moment, so pin a commit or tag for fleets that must not drift.
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1, max = 96))]
    #[x_kube(validation = ::kube::core::Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._/-]*$') && !self.contains('..')").message("hub.revision must be a branch, tag or commit"))]
    pub revision: String,
    /// Secret holding a hub token (gated or private repositories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeyRef>,
    /// PVC the download Job fills (under hub/<repo>/<revision>); the workers mount it
    /// read-only, the router only the files it reads.
    #[schemars(length(min = 1, max = 253))]
    pub cache_claim_name: String,
}

fn default_revision() -> String {
    "main".to_string()
}

/// A key of a Secret in the resource's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_secret_key")]
    pub key: String,
}

fn default_secret_key() -> String {
    "token".to_string()
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataPlane {
    /// Raw tensor bytes over gRPC: portable, works without GPUs.
    #[default]
    Grpc,
    /// NCCL between GPUs, bootstrapped over gRPC.
    Nccl,
}

impl DataPlane {
    pub fn as_str(self) -> &'static str {
        match self {
            DataPlane::Grpc => "grpc",
            DataPlane::Nccl => "nccl",
        }
    }
}

/// How primaries are dealt over the expert pods (the placement crate's, which the workers share).
pub use dsv3_placement::PlacementStrategy;

/// What tokens routed to an expert with no live copy (every pod holding it down) get.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnavailableExperts {
    /// The requests routed to it end with an error naming it; the others go on untouched.
    #[default]
    End,
    /// It is left out of those tokens' routes, their other experts' weights scaled to the same
    /// total: no request fails, the output departs from the full model's, and each response
    /// reports `usage.masked_expert_routes`.
    Mask,
}

impl UnavailableExperts {
    pub fn as_str(self) -> &'static str {
        match self {
            UnavailableExperts::End => "end",
            UnavailableExperts::Mask => "mask",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Scheduling and container settings shared by every role.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// CPU and memory requests and limits. GPUs come from gpusPerPod, not from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra environment variables of the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Extra pod annotations (e.g. for a metrics scraper or a gang scheduler).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// How the role's pods spread over the cluster. Empty: over nodes, as evenly as the
    /// scheduler can without refusing a node (maxSkew 1 per kubernetes.io/hostname,
    /// ScheduleAnyway), so one lost node takes as few of the role's pods as possible.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// A strategic-merge patch on the role's pod template ({metadata, spec}) for what these
    /// fields do not cover: a sidecar, a volume, a pod-spec field. Containers, volumes, env,
    /// ports and volume mounts merge by key (`"$patch": "delete"` removes one), other lists are
    /// replaced, null removes a field. The operator's own fields can be overridden too: at
    /// your own risk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub pod_overrides: Option<serde_json::Value>,
}

/// An object of any fields, kept as written.
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// The router role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = ::kube::core::Rule::new("self.gpusPerPod >= 0 && self.gpusPerPod <= 8")
    .message("router.gpusPerPod must be between 0 and 8 (one node)")
    .reason(::kube::core::Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    #[serde(default)]
    pub gpus_per_pod: i32,
    /// Secret with the API key clients must send as a bearer token. Absent: no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Type of the router Service.
    #[serde(default)]
    pub service_type: ServiceType,
    #[serde(flatten)]
    pub pod: PodSettings,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            gpus_per_pod: 0,
            api_key_secret: None,
            service_type: ServiceType::ClusterIP,
            pod: PodSettings::default(),
        }
    }
}

/// The attention role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = ::kube::core::Rule::new("self.gpusPerPod >= 0 && self.gpusPerPod <= 8")
    .message("attention.gpusPerPod must be between 0 and 8 (one node)")
    .reason(::kube::core::Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct AttentionSpec {
    /// Data-parallel attention ranks (pods). This is what the scale subresource scales.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,
    #[serde(default)]
    pub gpus_per_pod: i32,
    #[serde(flatten)]
    pub pod: PodSettings,
}

impl Default for AttentionSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            gpus_per_pod: 0,
            pod: PodSettings::default(),
        }
    }
}

/// The expert role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = ::kube::core::Rule::new("self.gpusPerPod >= 0 && self.gpusPerPod <= 8")
    .message("experts.gpusPerPod must be between 0 and 8 (one node)")
    .reason(::kube::core::Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct ExpertSpec {
    /// Expert-parallel ranks (pods). Every pod hosts (numRoutedExperts + redundantExperts) / replicas
    /// expert slots.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4096))]
    pub replicas: i32,
    #[serde(default)]
    pub gpus_per_pod: i32,
    /// Extra copies of hot experts, each on a different pod than the original.
    #[serde(default)]
    #[schemars(range(min = 0, max = 4096))]
    pub redundant_experts: i32,
    /// How experts are laid out over the expert pods.
    #[serde(default)]
    pub placement: PlacementStrategy,
    /// What requests routed to an expert whose every copy is down get (the attention ranks'
    /// `--unavailable-experts`).
    #[serde(default)]
    pub unavailable: UnavailableExperts,
    /// Experts that get the redundant copies first (e.g. from load statistics). The rest are
    /// spread evenly over the expert ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub hot_experts: Option<Vec<i32>>,
    #[serde(flatten)]
    pub pod: PodSettings,
}

impl Default for ExpertSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            gpus_per_pod: 0,
            redundant_experts: 0,
            placement: PlacementStrategy::RoundRobin,
            unavailable: UnavailableExperts::End,
            hot_experts: None,
            pod: PodSettings::default(),
        }
    }
}

fn one() -> i32 {
    1
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Sequences decoded together per attention rank.
    #[serde(default = "default_max_num_seqs")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_num_seqs: i32,
    /// Tokens per forward step (prefill chunking).
    #[serde(default = "default_max_batch_tokens")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_batch_tokens: i32,
    /// Longest prompt plus completion.
    #[serde(default = "default_max_model_len")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_model_len: i32,
}

fn default_max_num_seqs() -> i32 {
    256
}
fn default_max_batch_tokens() -> i32 {
    8192
}
fn default_max_model_len() -> i32 {
    32768
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_num_seqs: default_max_num_seqs(),
            max_batch_tokens: default_max_batch_tokens(),
            max_model_len: default_max_model_len(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MtpSpec {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "one")]
    pub num_speculative_tokens: i32,
}

impl Default for MtpSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            num_speculative_tokens: 1,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RoleAutoscaling>,
    /// Attention ranks. The router is given peer addresses for maxReplicas ranks and treats the
    /// absent ones as not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<RoleAutoscaling>,
}

/// Bounds and target of one HorizontalPodAutoscaler.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = ::kube::core::Rule::new("self.minReplicas <= self.maxReplicas")
    .message("autoscaling: minReplicas must not exceed maxReplicas")
    .reason(::kube::core::Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct RoleAutoscaling {
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    /// Average CPU utilisation target in percent (used when no targetMetric is set; default 70).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: Option<i32>,
    /// A per-pod custom metric (served by a metrics adapter), e.g. dsv3_rank_sequences (every
    /// attention rank serves it on its /metrics; deploy/monitoring has the adapter rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_metric: Option<MetricTarget>,
    /// Scale-down stabilisation window. Model loads are slow; do not flap.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
}

fn default_stabilization() -> i32 {
    600
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricTarget {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Target per-pod average, a Kubernetes quantity such as "8" or "500m".
    #[schemars(length(min = 1, max = 64))]
    pub average_value: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Pods of a role that may be unavailable during a rolling update or a voluntary disruption.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_unavailable: i32,
    /// Extra router pods during a rolling update.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1024))]
    pub max_surge: i32,
    /// Seconds a stopping router or attention pod keeps serving the requests it holds, taking
    /// no new ones, before it stops (a rollout, a scale-down, a node drain). The pods' grace
    /// period is this plus a margin.
    #[serde(default = "default_drain_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_seconds: i32,
    /// Restarts of one container after which the fleet reports Failed (with the pod, the count
    /// and why it last stopped) instead of waiting on it.
    #[serde(default = "default_restart_budget")]
    #[schemars(range(min = 1, max = 1000))]
    pub restart_budget: i32,
    /// How a new worker generation (a change of the image, of the expert pod template, of the
    /// expert placement or of the model revision) replaces the running one: BlueGreen starts it
    /// beside the running one (twice the GPUs for a while), Recreate after it (no serving in
    /// between), Partitioned in the room half of the running one frees (it needs a copy of every
    /// expert, over an even number of expert pods). Attention ranks only ever talk to expert
    /// shards of their own generation either way; a change of the attention pod template alone
    /// rolls the ranks in place, one at a time.
    #[serde(default)]
    pub strategy: RolloutStrategy,
}

/// How a new generation of attention and expert pods replaces the running one.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RolloutStrategy {
    /// The new generation starts beside the running one (twice the GPUs for a while); the
    /// routers switch to it once every one of its pods is ready, and the old generation stops
    /// once the routers have rolled over. No request is refused or cut off. Meanwhile the
    /// attention replica count (an autoscaler's or an edit) reaches the serving ranks at once,
    /// up to the ranks its routers know (with autoscaling, maxReplicas).
    #[default]
    BlueGreen,
    /// The running generation stops first (its attention ranks drain what they hold), then the
    /// new one starts: no extra GPUs, but no serving in between.
    Recreate,
    /// For clusters with room for only part of a second generation. The expert copies are laid
    /// out so that the first half of the expert pods holds every expert (this needs
    /// experts.redundantExperts equal to the routed experts and an even experts.replicas). The
    /// running generation shrinks to that half and half its attention ranks, still serving; the
    /// new one starts in the room freed, at the other half of the attention ranks and the first
    /// half of its expert pods; the routers switch to it once those are ready, the old generation
    /// stops, and the new one grows to its full size. No request is refused or cut off; extra
    /// GPUs: one attention pod's, where attention.replicas is 1.
    Partitioned,
}

/// Which of the two sets of worker StatefulSets a generation runs in: blue is
/// `<name>-attention` and `<name>-expert`, green the same with `-green`. A new generation
/// goes into the slot the serving one does not use.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    #[default]
    Blue,
    Green,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Blue => "blue",
            Slot::Green => "green",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::Blue => Slot::Green,
            Slot::Green => Slot::Blue,
        }
    }
}

/// A generation of attention and expert pods, as the routers reach it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FleetGeneration {
    /// Hash of the expert pod template (image, arguments, placement, model revision) and the
    /// attention ranks' image.
    pub revision: String,
    pub slot: Slot,
    /// The image its pods run, which the routers that send to it run too.
    pub image: String,
    /// Attention ranks the routers know about.
    pub attention_peers: i32,
    pub placement_version: String,
}

fn default_restart_budget() -> i32 {
    5
}

fn default_drain_seconds() -> i32 {
    120
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_unavailable: 1,
            max_surge: 1,
            drain_seconds: default_drain_seconds(),
            restart_budget: default_restart_budget(),
            strategy: RolloutStrategy::default(),
        }
    }
}

/// Observed state, written by the operator only.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeepSeekV3DeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Progressing, Ready, Degraded, Blocked, or Failed (a container past rollout.restartBudget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Roles at full strength over all roles, e.g. "3/3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_roles: Option<String>,
    /// Ready attention ranks (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,
    /// Label selector of the attention pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RoleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<RoleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<RoleStatus>,
    /// Version of the expert placement plan the attention and expert pods run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_version: Option<String>,
    /// ConfigMap that holds that placement plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_config_map: Option<String>,
    /// The hub repository and revision the workers run (downloaded and verified); while a new
    /// revision downloads, the fleet keeps serving this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<ServedModel>,
    /// In-cluster URL of the OpenAI-compatible API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The generation of attention and expert pods the routers send to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<FleetGeneration>,
    /// A new generation starting beside the serving one (blue/green), until the routers switch;
    /// in a Recreate cut-over, the one that starts in the serving slot once it has stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<FleetGeneration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A hub repository at a revision, as downloaded into the cache claim.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServedModel {
    pub repo: String,
    pub revision: String,
    pub cache_claim_name: String,
}

impl ServedModel {
    pub fn of(hub: &HubSource) -> Self {
        ServedModel {
            repo: hub.repo.clone(),
            revision: hub.revision.clone(),
            cache_claim_name: hub.cache_claim_name.clone(),
        }
    }

    /// Its directory inside the cache claim.
    pub fn directory(&self) -> String {
        format!("hub/{}/{}", self.repo, self.revision)
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    pub replicas: i32,
    pub ready_replicas: i32,
    pub updated_replicas: i32,
    /// "ready/desired".
    pub summary: String,
}
