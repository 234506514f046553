//! Gang scheduling: the attention ranks and expert shards are placed all together or not at
//! all, so a fleet never holds half its GPUs while waiting for the rest. One PodGroup for both
//! roles of a generation (minMember = their planned pods; a generation starting beside the
//! serving one has its own), for Volcano, the scheduler-plugins coscheduling plugin or KAI
//! Scheduler; their pods name the group the way that scheduler reads it.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;
use std::collections::BTreeMap;

use super::Ctx;
use crate::crd::{GangScheduler, GangSpec, Slot};

/// How long the coscheduling plugin waits for the whole group unless told.
const DEFAULT_TIMEOUT_SECONDS: i32 = 600;

/// The PodGroup's name of the generation in `slot`, for the pods and the status.
pub fn pod_group_name(instance: &str, slot: Slot) -> String {
    match slot {
        Slot::Blue => format!("{instance}-workers"),
        Slot::Green => format!("{instance}-workers-green"),
    }
}

/// The API resource of `scheduler`'s PodGroup kind.
pub fn pod_group_resource(scheduler: GangScheduler) -> ApiResource {
    let (group, version) = match scheduler {
        GangScheduler::Volcano => ("scheduling.volcano.sh", "v1beta1"),
        GangScheduler::Coscheduling => ("scheduling.x-k8s.io", "v1alpha1"),
        GangScheduler::Kai => ("scheduling.run.ai", "v2alpha2"),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, "PodGroup"), "podgroups")
}

/// The scheduler the gang's pods ask for, unless `scheduling.schedulerName` names one.
pub fn default_scheduler_name(scheduler: GangScheduler) -> &'static str {
    match scheduler {
        GangScheduler::Volcano => "volcano",
        GangScheduler::Coscheduling => "scheduler-plugins-scheduler",
        GangScheduler::Kai => "kai-scheduler",
    }
}

/// The PodGroup for `members` pods (the attention and expert replicas planned now).
pub(super) fn pod_group(ctx: &Ctx<'_>, gang: &GangSpec, members: i32) -> DynamicObject {
    let resource = pod_group_resource(gang.scheduler);
    let mut spec = json!({ "minMember": members });
    match gang.scheduler {
        GangScheduler::Volcano | GangScheduler::Kai => {
            if let Some(queue) = &gang.queue {
                spec["queue"] = json!(queue);
            }
        }
        GangScheduler::Coscheduling => {
            spec["scheduleTimeoutSeconds"] = json!(gang.schedule_timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS));
        }
    }
    let name = pod_group_name(&ctx.name, ctx.slot);
    let mut object = DynamicObject::new(&name, &resource).data(json!({ "spec": spec }));
    object.metadata = ctx.meta(name, "workers");
    object
}

/// What each gang pod carries to join the group: (labels, annotations).
pub(super) fn membership(ctx: &Ctx<'_>, gang: &GangSpec) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let name = pod_group_name(&ctx.name, ctx.slot);
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
        // KAI's scheduler reads a pod's group from its pod-group-name annotation.
        GangScheduler::Kai => (
            gang.queue
                .iter()
                .map(|q| ("kai.scheduler/queue".to_string(), q.clone()))
                .collect(),
            BTreeMap::from([("pod-group-name".to_string(), name)]),
        ),
    }
}
