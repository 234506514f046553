//! A client that goes away cancels its request in the backend; graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use dsv3_engine::FinishReason;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use crate::common::*;

#[tokio::test]
async fn dropping_a_stream_cancels_the_backend_request() {
    for (path, body) in [
        ("/v1/completions", json!({"prompt": "x", "stream": true})),
        (
            "/v1/chat/completions",
            json!({"stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
        ),
    ] {
        let fake = Arc::new(Fake::text("Hello world", Ending::Hang));
        let router = app(fake.clone());
        let request = Request::post(path).body(Body::from(body.to_string())).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut frames = response.into_body().into_data_stream();
        let first = frames.next().await.expect("a first event").expect("data");
        assert!(String::from_utf8_lossy(&first).starts_with("data: "));
        assert!(!fake.cancelled.load(std::sync::atomic::Ordering::SeqCst));
        drop(frames);
        assert!(fake.wait_cancelled().await, "{path}: the receiver must be dropped");
    }
}

#[tokio::test]
async fn a_stop_string_cancels_before_the_stream_ends() {
    let fake = Arc::new(Fake::text("Hello world, this is a test.", Ending::Hang));
    let router = app(fake.clone());
    let body = json!({"prompt": "x", "stream": true, "stop": "world"});
    let request = Request::post("/v1/completions")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    let mut frames = response.into_body().into_data_stream();
    loop {
        let frame = frames.next().await.expect("the finish chunk comes").expect("data");
        if String::from_utf8_lossy(&frame).contains("\"finish_reason\":\"stop\"") {
            break;
        }
    }
    // The stream is still open ([DONE] unread), yet the backend request is already cancelled.
    assert!(fake.wait_cancelled().await);
    let rest: Vec<_> = frames.collect().await;
    assert!(String::from_utf8_lossy(&rest.last().unwrap().as_ref().unwrap()[..]).contains("[DONE]"));
}

#[tokio::test]
async fn dropping_a_non_streamed_request_cancels_it() {
    let fake = Arc::new(Fake::text("Hello world", Ending::Hang));
    let router = app(fake.clone());
    let request = Request::post("/v1/completions")
        .body(Body::from(json!({"prompt": "x"}).to_string()))
        .unwrap();
    // The fake never finishes: the handler waits until the client (here: the timeout) gives up.
    let outcome = tokio::time::timeout(Duration::from_millis(200), router.oneshot(request)).await;
    assert!(outcome.is_err(), "the request cannot finish");
    assert!(fake.wait_cancelled().await);
}

async fn read_until(stream: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("no timeout")
            .expect("read");
        assert!(n > 0, "connection closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn client_disconnect_over_tcp_cancels_and_shutdown_is_graceful() {
    let fake = Arc::new(Fake::text("Hello world", Ending::Hang));
    let router = app(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(dsv3_api::serve_with_shutdown(listener, router, async {
        let _ = stop_rx.await;
    }));

    let body = json!({"prompt": "x", "stream": true}).to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let seen = read_until(&mut stream, "data: ").await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.to_ascii_lowercase().contains("text/event-stream"), "{seen}");
    drop(stream);
    assert!(
        fake.wait_cancelled().await,
        "the server must drop the stream when the client leaves"
    );

    // A plain request still works, then shutdown completes.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let seen = read_until(&mut stream, "ok").await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    stop_tx.send(()).unwrap();
    let served = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("shutdown in time")
        .unwrap();
    assert!(served.is_ok());
}

#[tokio::test]
async fn finished_requests_are_not_cancelled() {
    let fake = Arc::new(Fake::text("Hi", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, _) = post(&router, "/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!fake.cancelled.load(std::sync::atomic::Ordering::SeqCst));
}
