//! Where the workers find the checkpoint. A PVC or a node's directory is used as it is. A hub
//! repository is downloaded once per (repository, revision, claim) by a Job into the cache
//! claim, under `hub/<repo>/<revision>`; the workers start on it once the Job has verified every
//! file, and keep the revision they run (status.servedModel) while a new one downloads.

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, HostPathVolumeSource, LocalObjectReference, PersistentVolumeClaimVolumeSource,
    PodSpec, PodTemplateSpec, ResourceRequirements, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

use super::{
    container_security, env, labels, pod_security, secret_env, Ctx, Role, LABEL_MANAGED_BY, LABEL_PART_OF, MODEL_DIR,
};
use crate::crd::{HubSource, ServedModel};

/// What `dsv3-worker download` links into a model directory for the router: the config, shard
/// index and tokenizer, so a router pod mounts that directory alone.
pub const ROUTER_VIEW: &str = ".router";
/// The component label of the download Jobs.
pub const DOWNLOAD_COMPONENT: &str = "model-download";
/// Where the download Job mounts the cache claim.
const CACHE_DIR: &str = "/cache";
/// Files fetched at once by the Job.
const PARALLEL_FILES: &str = "8";
/// Pods the Job may fail before it reports failure (each resumes the partial files).
const DOWNLOAD_BACKOFF_LIMIT: i32 = 6;

/// The directory the workers' `--model` names.
pub(super) fn model_path(ctx: &Ctx<'_>) -> String {
    match ctx.spec.model.source.pvc.as_ref().and_then(|p| p.sub_path.as_deref()) {
        Some(sub) if !sub.trim_matches('/').is_empty() => format!("{MODEL_DIR}/{}", sub.trim_matches('/')),
        // A hub download is mounted at its own directory (the mount's subPath).
        _ => MODEL_DIR.to_string(),
    }
}

/// The volume a pod of `role` reads the model from.
pub(super) fn volume(ctx: &Ctx<'_>) -> Volume {
    let src = &ctx.spec.model.source;
    let mut v = Volume {
        name: "model".into(),
        ..Default::default()
    };
    if let Some(p) = &src.pvc {
        v.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: p.claim_name.clone(),
            read_only: Some(true),
        });
    } else if let Some(h) = &src.host_path {
        v.host_path = Some(HostPathVolumeSource {
            path: h.path.clone(),
            type_: Some("Directory".into()),
        });
    } else if let Some(hub) = &src.hub {
        let claim = ctx
            .served_model
            .as_ref()
            .map_or(&hub.cache_claim_name, |m| &m.cache_claim_name);
        v.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.clone(),
            read_only: Some(true),
        });
    }
    v
}

/// The mount of that volume: a downloaded revision's directory for the ranks, only its router
/// view for the router.
pub(super) fn mount(ctx: &Ctx<'_>, role: Role) -> VolumeMount {
    let sub_path = ctx.spec.model.source.hub.as_ref().map(|hub| {
        let directory = ctx
            .served_model
            .clone()
            .unwrap_or_else(|| ServedModel::of(hub))
            .directory();
        match role {
            Role::Router => format!("{directory}/{ROUTER_VIEW}"),
            _ => directory,
        }
    });
    VolumeMount {
        name: "model".into(),
        mount_path: MODEL_DIR.into(),
        sub_path,
        read_only: Some(true),
        ..Default::default()
    }
}

/// The Job's name: one per (repository, revision, claim), so a change of any is a new download
/// and re-applying the same one changes nothing.
pub fn download_job_name(instance: &str, model: &ServedModel) -> String {
    let mut h = Sha256::new();
    for part in [&model.repo, &model.revision, &model.cache_claim_name] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let hash: String = h.finalize().iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("{instance}-model-{hash}")
}

/// The Job that downloads `hub` into the cache claim and verifies it.
pub(super) fn download_job(ctx: &Ctx<'_>, hub: &HubSource) -> Job {
    let spec = ctx.spec;
    let model = ServedModel::of(hub);
    let name = download_job_name(&ctx.name, &model);
    let mut env_vars = vec![env("HOME", "/tmp")];
    if let Some(t) = &hub.token_secret {
        env_vars.push(secret_env("HF_TOKEN", t));
    }
    let container = Container {
        name: "download".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.as_str().into()),
        command: Some(vec!["dsv3-worker".into()]),
        args: Some(vec![
            "download".into(),
            "--repo".into(),
            hub.repo.clone(),
            "--revision".into(),
            hub.revision.clone(),
            "--dir".into(),
            format!("{CACHE_DIR}/{}", model.directory()),
            "--parallel".into(),
            PARALLEL_FILES.into(),
        ]),
        env: Some(env_vars),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "cache".into(),
                mount_path: CACHE_DIR.into(),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("2".into())),
                ("memory".to_string(), Quantity("1Gi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("4Gi".into()))])),
            ..Default::default()
        }),
        security_context: Some(container_security(false)),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    // Not the serving pods' part-of/managed-by pair: the fleet's PodMonitor selects by it, and a
    // download pod has no metrics to scrape.
    let mut pod_labels = labels(&ctx.name, DOWNLOAD_COMPONENT);
    pod_labels.retain(|k, _| k != LABEL_MANAGED_BY && k != LABEL_PART_OF);
    Job {
        metadata: ObjectMeta {
            annotations: Some(BTreeMap::from([
                ("dsv3.ai/repo".to_string(), model.repo.clone()),
                ("dsv3.ai/revision".to_string(), model.revision.clone()),
            ])),
            ..ctx.meta(name, DOWNLOAD_COMPONENT)
        },
        spec: Some(JobSpec {
            backoff_limit: Some(DOWNLOAD_BACKOFF_LIMIT),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(ctx.names.service_account()),
                    automount_service_account_token: Some(false),
                    security_context: Some(pod_security()),
                    restart_policy: Some("Never".into()),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "cache".into(),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: hub.cache_claim_name.clone(),
                                read_only: Some(false),
                            }),
                            ..Default::default()
                        },
                        Volume {
                            name: "tmp".into(),
                            empty_dir: Some(EmptyDirVolumeSource {
                                size_limit: Some(Quantity("1Gi".into())),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ]),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
                        spec.image_pull_secrets
                            .iter()
                            .map(|n| LocalObjectReference { name: n.clone() })
                            .collect()
                    }),
                    enable_service_links: Some(false),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}
