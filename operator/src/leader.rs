//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! kube-runtime ships no elector, so this is the client-go algorithm in small: the holder renews
//! the Lease every `renew_every`; a candidate takes it over when the Lease record has not changed
//! for `lease_duration` *as observed on the candidate's own clock* (immune to clock skew between
//! nodes). Writes use the Lease's resourceVersion, so two candidates can never both win. A leader
//! that cannot renew within `lease_duration` steps down (the controller stops) before another
//! replica can take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    /// resourceVersion and local time of the last change of the Lease record we saw.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, lease_duration: Duration) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration,
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Take or renew the Lease. `Ok(true)`: we hold it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(15);
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let rv = current.metadata.resource_version.clone().unwrap_or_default();
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let expired = {
            let mut observed = self.observed.lock().await;
            let changed = observed.as_ref().is_none_or(|(v, _)| *v != rv);
            if changed {
                *observed = Some((rv.clone(), Instant::now()));
            }
            let since = observed.as_ref().map(|(_, t)| t.elapsed()).unwrap_or_default();
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.lease_duration);
            since >= duration
        };
        let ours = holder == self.identity;
        if !(ours || holder.is_empty() || expired) {
            return Ok(false);
        }
        let mut lease = current;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if ours { spec.acquire_time } else { Some(MicroTime(now)) },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!ours)),
            ..Default::default()
        });
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(updated) => {
                let mut observed = self.observed.lock().await;
                *observed = Some((updated.metadata.resource_version.unwrap_or_default(), Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up so a standby takes over at once (best effort, on clean shutdown).
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        self.api.replace(&self.name, &PostParams::default(), &lease).await?;
        Ok(())
    }
}

/// Block until this replica holds the Lease.
pub async fn acquire(lock: &LeaseLock, retry: Duration) {
    loop {
        match lock.try_acquire_or_renew().await {
            Ok(true) => return,
            Ok(false) => tracing::debug!(identity = lock.identity(), "lease held by another replica"),
            Err(e) => tracing::warn!(error = %e, "lease acquisition failed"),
        }
        tokio::time::sleep(retry).await;
    }
}

/// Keep renewing; the returned channel turns `false` once leadership is lost.
pub fn keep_renewing(
    lock: std::sync::Arc<LeaseLock>,
    renew_every: Duration,
    deadline: Duration,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(true);
    tokio::spawn(async move {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(renew_every).await;
            match lock.try_acquire_or_renew().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    tracing::error!("leader lease taken over by another replica");
                    let _ = tx.send(false);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    if last_ok.elapsed() >= deadline {
                        tracing::error!("could not renew the leader lease in time; stepping down");
                        let _ = tx.send(false);
                        return;
                    }
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::FakeApi;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/dsv3-operator-leader";

    fn lock(fake: &FakeApi, who: &str, secs: u64) -> LeaseLock {
        LeaseLock::new(
            Api::namespaced(fake.client(), "ops"),
            "dsv3-operator-leader",
            who,
            Duration::from_secs(secs),
        )
    }

    fn holder(fake: &FakeApi) -> Option<String> {
        fake.get(PATH)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_takeover_after_expiry() {
        let fake = FakeApi::default();
        let a = lock(&fake, "a", 1);
        let b = lock(&fake, "b", 1);
        assert!(
            a.try_acquire_or_renew().await.expect("a"),
            "first candidate creates the lease"
        );
        assert_eq!(holder(&fake).as_deref(), Some("a"));
        assert!(!b.try_acquire_or_renew().await.expect("b"), "held and fresh");
        assert!(a.try_acquire_or_renew().await.expect("a renews"));
        assert!(
            !b.try_acquire_or_renew().await.expect("b"),
            "a renewed: the record changed"
        );
        // a stops renewing; b sees no change for a whole lease duration and takes over.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(b.try_acquire_or_renew().await.expect("b takes over"));
        assert_eq!(holder(&fake).as_deref(), Some("b"));
        let transitions = fake.get(PATH).and_then(|l| l["spec"]["leaseTransitions"].as_i64());
        assert_eq!(transitions, Some(1));
        assert!(!a.try_acquire_or_renew().await.expect("a"), "a lost it");
    }

    #[tokio::test]
    async fn release_hands_over_at_once() {
        let fake = FakeApi::default();
        let a = lock(&fake, "a", 30);
        let b = lock(&fake, "b", 30);
        assert!(a.try_acquire_or_renew().await.expect("a"));
        a.release().await.expect("release");
        assert_eq!(holder(&fake), None);
        assert!(
            b.try_acquire_or_renew().await.expect("b"),
            "an empty holder is free to take"
        );
    }

    #[tokio::test]
    async fn conflicting_writes_lose_instead_of_both_winning() {
        let fake = FakeApi::default();
        let a = lock(&fake, "a", 30);
        assert!(a.try_acquire_or_renew().await.expect("a"));
        fake.fail("PUT", "leases", 409);
        assert!(!a.try_acquire_or_renew().await.expect("conflict is not an error"));
    }
}
