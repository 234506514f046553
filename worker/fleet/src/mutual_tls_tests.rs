//! The fleet's gRPC over mutual TLS, with certificates made here: a shard and an attention rank's
//! client that share a CA exchange activations as over plain gRPC; a client with no certificate,
//! with one from another CA, or that trusts another CA is turned away, and so is a server whose
//! certificate does not name the host dialled.

use crate::failover_tests::{assert_close, free_port, reference, runtime, start_over, stop, EXPERTS, WIDTH};
use crate::grpc::{Dtype, RemoteExperts};
use crate::placement::PlacementPlan;
use crate::rank::ExpertBackend;
use crate::transport::{MutualTls, Transport};
use dsv3_engine::{ExpertExecutor, TokenRoutes};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::sync::Arc;
use std::time::Duration;

/// A certificate authority that signs member certificates.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA");
        Authority { issuer }
    }

    /// A member's transport: a certificate for `names`, signed here, that trusts `trusted`.
    fn member(&self, names: &[&str], trusted: &Authority) -> Transport {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("sign");
        let tls = MutualTls::from_pem(
            cert.pem().into_bytes(),
            key.serialize_pem().into_bytes(),
            trusted.issuer.pem().into_bytes(),
        )
        .expect("member TLS");
        Transport::MutualTls(Arc::new(tls))
    }
}

/// Whether a client over `transport` gets the shard's answers, waiting a little for the first
/// connection.
fn answered(
    rt: &tokio::runtime::Runtime,
    plan: &PlacementPlan,
    port: u16,
    transport: &Transport,
) -> Result<(), String> {
    let remote = RemoteExperts::new(
        plan.clone(),
        vec![format!("127.0.0.1:{port}")],
        transport,
        rt.handle().clone(),
        Duration::from_secs(5),
        Dtype::F32,
    )
    .map_err(|e| format!("{e:#}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match remote.ready() {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let tokens = 5;
    let x: Vec<f32> = (0..tokens * WIDTH).map(|i| (i as f32 - 7.0) / 9.0).collect();
    let routes = TokenRoutes {
        k: 2,
        experts: (0..tokens as u32)
            .flat_map(|t| [t % EXPERTS, (t + 3) % EXPERTS])
            .collect(),
        weights: (0..tokens).flat_map(|t| [0.5, 0.125 * t as f32]).collect(),
    };
    let got = remote.routed_experts(0, &x, &routes).map_err(|e| format!("{e:#}"))?;
    assert_close(&got, &reference(&x, &routes));
    Ok(())
}

#[test]
fn members_of_one_ca_talk_and_everyone_else_is_turned_away() {
    let rt = runtime();
    let plan = PlacementPlan::round_robin(EXPERTS, 1, 0, &[]).expect("plan");
    let (ours, theirs) = (Authority::new(), Authority::new());
    let port = free_port();
    let shard = start_over(&rt, &plan, 0, port, &ours.member(&["127.0.0.1", "localhost"], &ours));

    answered(&rt, &plan, port, &ours.member(&["attention-0"], &ours)).expect("a member of the same CA");
    let plain = answered(&rt, &plan, port, &Transport::Plain).expect_err("plain gRPC to a TLS shard");
    eprintln!("plain client: {plain}");
    let foreign = answered(&rt, &plan, port, &theirs.member(&["attention-0"], &ours))
        .expect_err("a client certificate from another CA");
    eprintln!("client signed by another CA: {foreign}");
    let distrusting = answered(&rt, &plan, port, &ours.member(&["attention-0"], &theirs))
        .expect_err("a client that trusts another CA");
    eprintln!("client trusting another CA: {distrusting}");
    stop(&rt, shard);

    // A server whose certificate names another host: the client refuses it.
    let port = free_port();
    let misnamed = start_over(&rt, &plan, 0, port, &ours.member(&["expert-7.example"], &ours));
    let err = answered(&rt, &plan, port, &ours.member(&["attention-0"], &ours)).expect_err("a misnamed server");
    eprintln!("misnamed server: {err}");
    stop(&rt, misnamed);

    // The shard on plain gRPC still serves plain clients (the default is unchanged).
    let port = free_port();
    let plain_shard = start_over(&rt, &plan, 0, port, &Transport::Plain);
    answered(&rt, &plan, port, &Transport::Plain).expect("plain to plain");
    stop(&rt, plain_shard);
}

#[test]
fn files_that_are_not_pem_are_named() {
    let ca = Authority::new();
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &ca.issuer)
        .expect("sign");
    let (cert, key, ca) = (
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
        ca.issuer.pem().into_bytes(),
    );
    let err = |r: anyhow::Result<MutualTls>| format!("{:#}", r.err().expect("refused"));
    assert!(err(MutualTls::from_pem(b"hello".to_vec(), key.clone(), ca.clone())).contains("the certificate"));
    assert!(err(MutualTls::from_pem(cert.clone(), cert.clone(), ca.clone())).contains("private key"));
    assert!(err(MutualTls::from_pem(cert.clone(), key.clone(), Vec::new())).contains("the CA certificate"));
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("tls.crt");
    let e = format!(
        "{:#}",
        MutualTls::load(&missing, &missing, &missing).err().expect("refused")
    );
    assert!(e.contains("--tls-cert") && e.contains("tls.crt"), "{e}");
    std::fs::write(dir.path().join("tls.key"), &key).expect("write");
    std::fs::write(dir.path().join("ca.crt"), &ca).expect("write");
    std::fs::write(&missing, &key).expect("write");
    let e = format!(
        "{:#}",
        MutualTls::load(&missing, &dir.path().join("tls.key"), &dir.path().join("ca.crt"))
            .err()
            .expect("a key where the certificate goes")
    );
    assert!(e.contains("--tls-cert") && e.contains("no PEM certificate"), "{e}");
}
