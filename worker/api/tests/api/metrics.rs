//! `GET /metrics`: the Prometheus text exposition, parsed.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use dsv3_engine::FinishReason;
use serde_json::json;
use tower::ServiceExt;

use crate::common::*;

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the text format strictly enough to catch malformed output: `# HELP`/`# TYPE` lines
/// and `name{k="v",...} value` samples, every one labelled with the served model. Returns
/// sample → value, the `model_name` label left out of the key.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "bad comment: {line}");
            assert!(valid_name(parts.next().unwrap()), "bad name: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "bad name: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("bad labels: {line}"));
                for pair in inner.split(',') {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                    assert!(valid_name(k), "bad label name: {line}");
                    assert!(
                        v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                        "bad label value: {line}"
                    );
                }
            }
        }
        let model = format!("model_name=\"{MODEL}\"");
        assert!(series.contains(&model), "no {model} label: {line}");
        let key = series
            .replace(&format!("{{{model},"), "{")
            .replace(&format!(",{model}"), "")
            .replace(&format!("{{{model}}}"), "");
        assert!(samples.insert(key, value).is_none(), "duplicate: {line}");
    }
    samples
}

#[tokio::test]
async fn metrics_exposition() {
    let fake = Arc::new(Fake::text("Hello world", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    // One success, one bad request, one unknown model.
    assert_eq!(
        post(&router, "/v1/completions", &json!({"prompt": [5, 6]})).await.0,
        StatusCode::OK
    );
    assert_eq!(
        post(&router, "/v1/completions", &json!({"prompt": "x", "temperature": 9}))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(&router, "/v1/completions", &json!({"model": "x", "prompt": "x"}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    let response = router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()[header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let samples = parse_exposition(&text);
    let value = |series: &str| -> f64 { *samples.get(series).unwrap_or_else(|| panic!("no {series} in:\n{text}")) };

    let generated = fake.script.len() as f64;
    assert_eq!(value("dsv3_time_to_first_token_seconds_count"), 1.0);
    assert_eq!(value("dsv3_inter_token_latency_seconds_count"), generated - 1.0);
    assert_eq!(value("dsv3_e2e_request_latency_seconds_count"), 1.0);
    assert!(samples.contains_key("dsv3_e2e_request_latency_seconds_bucket{le=\"+Inf\"}"));
    assert_eq!(value("dsv3_prompt_tokens_total"), 2.0);
    assert_eq!(value("dsv3_generation_tokens_total"), generated);
    assert_eq!(value("dsv3_request_success_total{finished_reason=\"stop\"}"), 1.0);
    assert_eq!(value("dsv3_http_errors_total{status=\"400\"}"), 1.0);
    assert_eq!(value("dsv3_http_errors_total{status=\"404\"}"), 1.0);
    assert_eq!(value("dsv3_num_requests_running"), 3.0);
    assert_eq!(value("dsv3_num_requests_waiting"), 2.0);
    assert_eq!(value("dsv3_kv_cache_usage_perc"), 0.25);
    assert_eq!(value("dsv3_kv_cache_used_blocks"), 25.0);
    assert_eq!(value("dsv3_kv_cache_blocks"), 100.0);
    // Tiny model: layers 0-1 dense, 2-3 MoE. Per layer, never per expert.
    assert_eq!(value("dsv3_expert_load_imbalance{layer=\"2\"}"), 4.0);
    assert_eq!(value("dsv3_expert_load_imbalance{layer=\"3\"}"), 1.0);
    assert_eq!(value("dsv3_expert_tokens_total{layer=\"2\"}"), 4.0);
    assert_eq!(value("dsv3_expert_tokens_total{layer=\"3\"}"), 4.0);
    assert!(!text.contains("expert=\""), "no per-expert series");
    // Per attention rank: memory by kind, dispatch/combine traffic.
    let memory = |kind: &str| {
        value(&format!(
            "dsv3_rank_memory_bytes{{rank=\"0\",device=\"cpu\",kind=\"{kind}\"}}"
        ))
    };
    assert_eq!(
        (memory("weights"), memory("kv_cache"), memory("workspace")),
        (1000.0, 200.0, 30.0)
    );
    assert_eq!(
        value("dsv3_expert_transfer_bytes_total{rank=\"0\",direction=\"sent\"}"),
        4096.0
    );
    assert_eq!(
        value("dsv3_expert_transfer_bytes_total{rank=\"0\",direction=\"received\"}"),
        2048.0
    );
    assert_eq!(value("dsv3_expert_layers_total{rank=\"0\"}"), 6.0);
    assert_eq!(value("dsv3_expert_transfer_seconds_total{rank=\"0\"}"), 0.5);
    assert_eq!(value("dsv3_scheduler_steps_total"), 7.0);
    assert_eq!(value("dsv3_scheduler_step_seconds_total"), 0.5);
    assert_eq!(value("dsv3_scheduler_busy_seconds_total"), 0.75);
    assert_eq!(value("dsv3_num_preemptions_total"), 3.0);
    assert_eq!(value("dsv3_num_migrations_total"), 2.0);
    // One request through the queue, prefill and decode: each phase once, and together no longer
    // than the whole request.
    for phase in ["queue", "prefill", "decode"] {
        assert_eq!(
            value(&format!("dsv3_request_{phase}_time_seconds_count")),
            1.0,
            "{phase}"
        );
    }
    let phases: f64 = ["queue", "prefill", "decode"]
        .iter()
        .map(|p| value(&format!("dsv3_request_{p}_time_seconds_sum")))
        .sum();
    let e2e = value("dsv3_e2e_request_latency_seconds_sum");
    assert!((phases - e2e).abs() <= 1e-6 * e2e.max(1e-3), "{phases} vs {e2e}");
    for name in [
        "dsv3_time_to_first_token_seconds",
        "dsv3_inter_token_latency_seconds",
        "dsv3_e2e_request_latency_seconds",
        "dsv3_request_queue_time_seconds",
        "dsv3_request_prefill_time_seconds",
        "dsv3_request_decode_time_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {name} histogram")), "{name}");
    }
}

#[tokio::test]
async fn aborted_and_failed_requests_are_counted() {
    let fake = Arc::new(Fake::text("Hello", Ending::Fail("boom".into())));
    let router = app(fake.clone());
    assert_eq!(
        post(&router, "/v1/completions", &json!({"prompt": "x"})).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let (_, text) = get(&router, "/metrics").await;
    let samples = parse_exposition(&text);
    assert_eq!(samples["dsv3_request_success_total{finished_reason=\"error\"}"], 1.0);
    assert_eq!(samples["dsv3_http_errors_total{status=\"500\"}"], 1.0);

    let fake = Arc::new(Fake::text("Hello", Ending::Hang));
    let router = app(fake.clone());
    let request = Request::post("/v1/completions")
        .body(Body::from(json!({"prompt": "x"}).to_string()))
        .unwrap();
    let _ = tokio::time::timeout(std::time::Duration::from_millis(100), router.clone().oneshot(request)).await;
    assert!(fake.wait_cancelled().await);
    let (_, text) = get(&router, "/metrics").await;
    assert_eq!(
        parse_exposition(&text)["dsv3_request_success_total{finished_reason=\"abort\"}"],
        1.0
    );
}
