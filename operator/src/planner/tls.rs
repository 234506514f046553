//! Mutual TLS between the fleet's members (`spec.tls`): the Secret mounted into the router,
//! attention and expert pods, the worker flags that read it, and the health probe of the ranks,
//! which becomes `dsv3-worker probe` (the kubelet's gRPC probe speaks no TLS).

use k8s_openapi::api::core::v1::{ExecAction, Probe, SecretVolumeSource, Volume, VolumeMount};

use super::{Ctx, Role, WORKER_PORT};
use crate::crd::FleetTlsSpec;

/// Where the Secret's files are.
pub const TLS_DIR: &str = "/etc/dsv3/tls";
const VOLUME: &str = "fleet-tls";

/// The worker flags that read the mounted Secret.
pub fn args() -> Vec<String> {
    [
        ("--tls-cert", "tls.crt"),
        ("--tls-key", "tls.key"),
        ("--tls-ca", "ca.crt"),
    ]
    .iter()
    .flat_map(|(flag, file)| [flag.to_string(), format!("{TLS_DIR}/{file}")])
    .collect()
}

pub fn volume(tls: &FleetTlsSpec) -> Volume {
    Volume {
        name: VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(tls.secret_name.clone()),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn mount() -> VolumeMount {
    VolumeMount {
        name: VOLUME.into(),
        mount_path: TLS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The health check of a rank of `role` from inside its pod, over mutual TLS. The rank's
/// certificate is checked against the name of the role's first pod, which every certificate
/// valid for the fleet's peer addresses carries.
pub fn probe(ctx: &Ctx<'_>, role: Role, period: i32, failure: i32, timeout: i32) -> Probe {
    let peer = ctx.peer(role, ctx.slot, 0);
    let server_name = peer
        .rsplit_once(':')
        .map_or(peer.as_str(), |(host, _)| host)
        .to_string();
    let mut command = vec![
        "dsv3-worker".to_string(),
        "probe".into(),
        "--address".into(),
        format!("127.0.0.1:{WORKER_PORT}"),
        "--tls-server-name".into(),
        server_name,
        // The answer must come before the kubelet gives up on the command.
        "--timeout".into(),
        (timeout - 1).max(1).to_string(),
    ];
    command.extend(args());
    Probe {
        exec: Some(ExecAction { command: Some(command) }),
        period_seconds: Some(period),
        failure_threshold: Some(failure),
        timeout_seconds: Some(timeout),
        ..Default::default()
    }
}
