//! Gang scheduling: the attention ranks and expert shards are placed all together or not at
//! all, so a fleet never holds half its GPUs while waiting for the rest. One PodGroup for both
//! roles (minMember = their planned pods), for Volcano or the scheduler-plugins coscheduling
//! plugin; their pods name the group the way that scheduler reads it.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;
use std::collections::BTreeMap;

use super::Ctx;
use crate::crd::{GangScheduler, GangSpec};

/// How long the coscheduling plugin waits for the whole group unless told.
const DEFAULT_TIMEOUT_SECONDS: i32 = 600;

/// The PodGroup's name, for the pods and the status.
pub fn pod_group_name(instance: &str) -> String {
    format!("{instance}-workers")
}

/// The API resource of `scheduler`'s PodGroup kind.
pub fn pod_group_resource(scheduler: GangScheduler) -> ApiResource {
    let (group, version) = match scheduler {
        GangScheduler::Volcano => ("scheduling.volcano.sh", "v1beta1"),
        GangScheduler::Coscheduling => ("scheduling.x-k8s.io", "v1alpha1"),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, "PodGroup"), "podgroups")
}

/// The scheduler the gang's pods ask for, unless `scheduling.schedulerName` names one.
pub fn default_scheduler_name(scheduler: GangScheduler) -> &'static str {
    match scheduler {
        GangScheduler::Volcano => "volcano",
        GangScheduler::Coscheduling => "scheduler-plugins-scheduler",
    }
}

/// The PodGroup for `members` pods (the attention and expert replicas planned now).
pub(super) fn pod_group(ctx: &Ctx<'_>, gang: &GangSpec, members: i32) -> DynamicObject {
    let resource = pod_group_resource(gang.scheduler);
    let mut spec = json!({ "minMember": members });
    match gang.scheduler {
        GangScheduler::Volcano => {
            if let Some(queue) = &gang.queue {
                spec["queue"] = json!(queue);
            }
        }
        GangScheduler::Coscheduling => {
            spec["scheduleTimeoutSeconds"] = json!(gang.schedule_timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS));
        }
    }
    let mut object = DynamicObject::new(&pod_group_name(&ctx.name), &resource).data(json!({ "spec": spec }));
    object.metadata = ctx.meta(pod_group_name(&ctx.name), "workers");
    object
}

/// What each gang pod carries to join the group: (labels, annotations).
pub(super) fn membership(ctx: &Ctx<'_>, gang: &GangSpec) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let name = pod_group_name(&ctx.name);
    match gang.scheduler {
        GangScheduler::Volcano => {
            let mut annotations = BTreeMap::from([("scheduling.k8s.io/group-name".to_string(), name)]);
            if let Some(queue) = &gang.queue {
                annotations.insert("volcano.sh/queue-name".into(), queue.clone());
            }
            (BTreeMap::new(), annotations)
        }
        GangScheduler::Coscheduling => (
            BTreeMap::from([("scheduling.x-k8s.io/pod-group".to_string(), name)]),
            BTreeMap::new(),
        ),
    }
}
