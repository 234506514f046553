//! Whether the fleet's model is on its volume (condition ModelReady). A PVC or a node's
//! directory is taken as provided; a hub repository is ready once its download Job succeeded.
//! Until then the fleet keeps running the revision it already has (status.servedModel), or
//! starts nothing if it has none.

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};

use crate::controller::Error;
use crate::crd::{DeepSeekV3Deployment, ServedModel};
use crate::planner::{self, download_job_name, DOWNLOAD_COMPONENT};

#[derive(Clone, Debug, PartialEq)]
pub struct ModelState {
    /// With a hub source: the revision the workers run.
    pub served: Option<ServedModel>,
    /// The ModelReady condition: the desired model is in place.
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    /// The download of the desired revision failed for good.
    pub failed: bool,
}

impl ModelState {
    /// Nothing to serve yet: the router and workers wait for the download.
    pub fn pending(&self, cr: &DeepSeekV3Deployment) -> bool {
        cr.spec.model.source.hub.is_some() && self.served.is_none()
    }
}

/// The model's state from the desired revision's download Job (None: not created yet).
pub fn from_job(cr: &DeepSeekV3Deployment, job: Option<&Job>) -> ModelState {
    let source = &cr.spec.model.source;
    let Some(hub) = &source.hub else {
        let what = if source.pvc.is_some() {
            "model.source.pvc"
        } else {
            "model.source.hostPath"
        };
        return ModelState {
            served: None,
            ready: true,
            reason: "Provided",
            message: format!("{what}: the checkpoint is used as provided"),
            failed: false,
        };
    };
    let desired = ServedModel::of(hub);
    let job_name = download_job_name(&cr.name_any(), &desired);
    let previous = cr.status.as_ref().and_then(|s| s.served_model.clone());
    let what = format!(
        "{}@{} in {}/{}",
        desired.repo,
        desired.revision,
        desired.cache_claim_name,
        desired.directory()
    );
    let status = job.and_then(|j| j.status.as_ref());
    let succeeded = status.and_then(|s| s.succeeded).unwrap_or(0) > 0;
    let failure = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "Failed" && c.status == "True");
    // Downloaded before (the Job may since have been deleted): the files are still there.
    if succeeded || previous.as_ref() == Some(&desired) {
        return ModelState {
            served: Some(desired),
            ready: true,
            reason: "Downloaded",
            message: format!("{what}, every file verified against the hub's checksums"),
            failed: false,
        };
    }
    let still_serving = previous
        .as_ref()
        .map(|p| format!("; serving {}@{} meanwhile", p.repo, p.revision))
        .unwrap_or_default();
    match failure {
        Some(c) => ModelState {
            served: previous,
            ready: false,
            reason: "DownloadFailed",
            message: format!(
                "Job {job_name} could not download {what}: {}{still_serving}; fix the cause (repository, \
                 revision, token secret, claim space) and delete the Job to retry",
                c.message
                    .clone()
                    .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
            ),
            failed: true,
        },
        None => ModelState {
            served: previous,
            ready: false,
            reason: "Downloading",
            message: format!("Job {job_name} is downloading {what}{still_serving}"),
            failed: false,
        },
    }
}

/// Reads the desired revision's download Job.
pub async fn observe(cr: &DeepSeekV3Deployment, client: &Client, ns: &str) -> Result<ModelState, Error> {
    let job = match &cr.spec.model.source.hub {
        Some(hub) => {
            let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
            jobs.get_opt(&download_job_name(&cr.name_any(), &ServedModel::of(hub)))
                .await?
        }
        None => None,
    };
    Ok(from_job(cr, job.as_ref()))
}

/// Deletes the download Jobs of other revisions once the desired one is served (their files
/// stay in the cache claim).
pub async fn collect_old_downloads(client: &Client, ns: &str, cr: &DeepSeekV3Deployment) -> Result<(), Error> {
    let Some(hub) = &cr.spec.model.source.hub else {
        return Ok(());
    };
    let current = download_job_name(&cr.name_any(), &ServedModel::of(hub));
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let selector = format!(
        "{}={},{}={DOWNLOAD_COMPONENT}",
        planner::LABEL_INSTANCE,
        cr.name_any(),
        planner::LABEL_COMPONENT
    );
    for job in jobs.list(&ListParams::default().labels(&selector)).await? {
        let name = job.name_any();
        if name != current {
            // Background propagation: the Job's pods go with it.
            match jobs.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
