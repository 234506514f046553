//! Operator metrics (Prometheus/OpenMetrics text) and the `/metrics` + `/health` HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

/// Every metric the operator exports, prefixed `dsv3_operator_`.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub leader: Gauge,
    pub status_phase: Family<PhaseLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dsv3_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let leader = Gauge::default();
        let status_phase = Family::<PhaseLabels, Counter>::default();
        registry.register("reconcile", "Reconciliations started", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation takes",
            duration.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        registry.register(
            "status_updates",
            "Status writes, by the phase written",
            status_phase.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            status_phase,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn error_count(&self, error: &str) -> u64 {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.to_string(),
            })
            .get()
    }

    pub fn observe(&self, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn health() -> &'static str {
    "ok"
}

pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health))
        .route("/healthz", get(health))
        .with_state(metrics)
}

/// Serve `/metrics` and `/health` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /health");
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_prefix() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.failures.get_or_create(&ErrorLabels { error: "kube".into() }).inc();
        m.observe(Duration::from_millis(20));
        let text = m.render();
        assert!(text.contains("dsv3_operator_reconcile_total 1"), "{text}");
        assert!(
            text.contains("dsv3_operator_reconcile_errors_total{error=\"kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("dsv3_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert_eq!(m.error_count("kube"), 1);
    }
}

#[cfg(test)]
mod http_tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let m = Arc::new(Metrics::default());
        m.reconciles.inc();
        let app = router(m);
        let req = |p: &str| {
            axum::http::Request::get(p)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        let health = app.clone().oneshot(req("/health")).await.expect("health");
        assert_eq!(health.status(), StatusCode::OK);
        let metrics = app.clone().oneshot(req("/metrics")).await.expect("metrics");
        assert_eq!(metrics.status(), StatusCode::OK);
        let body = axum::body::to_bytes(metrics.into_body(), 1 << 20).await.expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("dsv3_operator_reconcile_total 1"), "{text}");
        let missing = app.oneshot(req("/nope")).await.expect("404");
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }
}
