//! Test fixtures: an in-memory API server behind kube's `Client`, driven by `tower_test`.
//!
//! kube-rs's testing guide scripts an exact request sequence; this fake goes one step further and
//! implements the handful of API semantics the controller relies on (GET/LIST by label,
//! server-side apply that only writes when something changed, status subresource, JSON and merge
//! patches, DELETE, POST), and records every request, so tests assert on outcomes and on the
//! requests that mattered rather than on a brittle call order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    log: Vec<Recorded>,
    failures: Vec<(String, String, u16)>,
    next_rv: u64,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message, "metadata": {}})
}

fn split_status(path: &str) -> (String, bool) {
    match path.strip_suffix("/status") {
        Some(base) => (base.to_string(), true),
        None => (path.to_string(), false),
    }
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        obj.pointer("/metadata/labels")
            .and_then(|l| l.get(k))
            .and_then(Value::as_str)
            == Some(v)
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%3D", "=").replace("%2C", ",").replace("%2F", "/"))
    })
}

impl FakeApi {
    /// A client whose requests this fake answers.
    pub fn client(&self) -> Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let resp = me.handle(req).await;
                send.send_response(resp);
            }
        });
        Client::new(svc, "default")
    }

    /// Put an object at its API path (e.g. `/api/v1/namespaces/ns/configmaps/name`).
    pub fn put(&self, path: &str, mut obj: Value) {
        let mut st = self.lock();
        st.next_rv += 1;
        let rv = st.next_rv.to_string();
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), rv.into());
            m.entry("generation").or_insert(json!(1));
            m.entry("uid").or_insert(json!(format!("uid-{}", st.next_rv)));
        }
        st.objects.insert(path.to_string(), obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    /// Remove a stored object, as a user's `kubectl delete` would.
    pub fn remove(&self, path: &str) -> Option<Value> {
        self.lock().objects.remove(path)
    }

    /// Change a stored object in place (e.g. to make a StatefulSet ready).
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Value)) {
        let mut st = self.lock();
        if let Some(o) = st.objects.get_mut(path) {
            f(o);
        }
    }

    pub fn paths(&self) -> Vec<String> {
        self.lock().objects.keys().cloned().collect()
    }

    /// Answer requests whose method matches and whose path contains `path_part` with `code`.
    pub fn fail(&self, method: &str, path_part: &str, code: u16) {
        self.lock().failures.push((method.into(), path_part.into(), code));
    }

    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    pub fn log(&self) -> Vec<Recorded> {
        self.lock().log.clone()
    }

    pub fn clear_log(&self) {
        self.lock().log.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let (code, value) = self.answer(&method, &path, &query, &content_type, body);
        let resp = Response::builder()
            .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()));
        match resp {
            Ok(r) => r,
            Err(_) => Response::new(Body::from(Vec::new())),
        }
    }

    fn answer(&self, method: &str, path: &str, query: &str, content_type: &str, body: Value) -> (u16, Value) {
        let mut st = self.lock();
        st.log.push(Recorded {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            content_type: content_type.into(),
            body: body.clone(),
        });
        if let Some((_, _, code)) = st
            .failures
            .iter()
            .find(|(m, p, _)| m == method && path.contains(p.as_str()))
        {
            return (*code, status(*code, "InternalError", "injected failure"));
        }
        st.next_rv += 1;
        let rv = st.next_rv.to_string();
        match method {
            "GET" => {
                if let Some(o) = st.objects.get(path) {
                    return (200, o.clone());
                }
                if is_named(path) {
                    return (404, status(404, "NotFound", "not found"));
                }
                let prefix = format!("{path}/");
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .filter(|v| labels_match(v, &selector))
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
                )
            }
            "POST" => {
                let name = body
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("generated-{rv}"));
                let key = format!("{path}/{name}");
                if st.objects.contains_key(&key) {
                    return (409, status(409, "AlreadyExists", "already exists"));
                }
                let mut o = body;
                set_meta(&mut o, &rv, 1);
                st.objects.insert(key, o.clone());
                (201, o)
            }
            "PUT" => {
                let Some(old) = st.objects.get(path).cloned() else {
                    return (404, status(404, "NotFound", "not found"));
                };
                let want = body.pointer("/metadata/resourceVersion").cloned();
                if want.is_some() && want != old.pointer("/metadata/resourceVersion").cloned() {
                    return (409, status(409, "Conflict", "the object has been modified"));
                }
                let mut o = body;
                let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
                set_meta(&mut o, &rv, g);
                st.objects.insert(path.to_string(), o.clone());
                (200, o)
            }
            "DELETE" => match st.objects.remove(path) {
                Some(o) => (200, o),
                None => (404, status(404, "NotFound", "not found")),
            },
            "PATCH" => {
                let (base, is_status) = split_status(path);
                let old = st.objects.get(&base).cloned();
                if content_type.starts_with("application/apply-patch") {
                    let new = match (old.clone(), is_status) {
                        (Some(mut o), true) => {
                            if let (Some(map), Some(s)) = (o.as_object_mut(), body.get("status")) {
                                map.insert("status".into(), s.clone());
                            }
                            o
                        }
                        (None, true) => return (404, status(404, "NotFound", "not found")),
                        (None, false) => {
                            let mut o = body;
                            set_meta(&mut o, &rv, 1);
                            o
                        }
                        (Some(o), false) => {
                            if base.contains("/jobs/") && o.pointer("/spec/template") != body.pointer("/spec/template")
                            {
                                // Like the real API server: a Job's pod template is immutable.
                                return (422, status(422, "Invalid", "spec.template: field is immutable"));
                            }
                            let mut n = body;
                            // Keep what the server owns.
                            for k in ["uid", "creationTimestamp", "finalizers", "deletionTimestamp"] {
                                if let Some(v) = o.pointer(&format!("/metadata/{k}")) {
                                    if let Some(m) = n.get_mut("metadata").and_then(Value::as_object_mut) {
                                        m.insert(k.into(), v.clone());
                                    }
                                }
                            }
                            if let (Some(s), Some(map)) = (o.get("status"), n.as_object_mut()) {
                                map.insert("status".into(), s.clone());
                            }
                            let g = o.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
                            let g = if o.get("spec") != n.get("spec") { g + 1 } else { g };
                            set_meta(&mut n, &rv, g);
                            n
                        }
                    };
                    let unchanged = old.as_ref().is_some_and(|o| same_content(o, &new));
                    if unchanged {
                        // Like the real API server: a no-op apply writes nothing.
                        return (200, old.unwrap_or(Value::Null));
                    }
                    st.objects.insert(base, new.clone());
                    (200, new)
                } else if content_type.starts_with("application/json-patch") {
                    let Some(mut o) = old else {
                        return (404, status(404, "NotFound", "not found"));
                    };
                    let ops: Vec<Value> = body
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|op| op.get("op").and_then(Value::as_str) != Some("test"))
                        .collect();
                    let patch: json_patch::Patch = match serde_json::from_value(Value::Array(ops)) {
                        Ok(p) => p,
                        Err(_) => return (422, status(422, "Invalid", "bad json patch")),
                    };
                    if json_patch::patch(&mut o, &patch).is_err() {
                        return (422, status(422, "Invalid", "json patch failed"));
                    }
                    let g = o.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
                    set_meta(&mut o, &rv, g);
                    // An object being deleted goes away once its last finalizer is removed.
                    let gone = o.pointer("/metadata/deletionTimestamp").is_some()
                        && o.pointer("/metadata/finalizers")
                            .and_then(Value::as_array)
                            .is_none_or(|f| f.is_empty());
                    if gone {
                        st.objects.remove(&base);
                    } else {
                        st.objects.insert(base, o.clone());
                    }
                    (200, o)
                } else {
                    let Some(mut o) = old else {
                        return (404, status(404, "NotFound", "not found"));
                    };
                    json_patch::merge(&mut o, &body);
                    set_meta(&mut o, &rv, 1);
                    st.objects.insert(base, o.clone());
                    (200, o)
                }
            }
            _ => (405, status(405, "MethodNotAllowed", "method not allowed")),
        }
    }
}

/// `/api/v1/namespaces/ns/kind/name` or `/apis/g/v/namespaces/ns/kind/name`.
fn is_named(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.first() {
        Some(&"api") => parts.len() == 6,
        Some(&"apis") => parts.len() == 7,
        _ => false,
    }
}

fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
            m.remove("generation");
        }
        v
    };
    strip(a) == strip(b)
}

fn set_meta(o: &mut Value, rv: &str, generation: i64) {
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), rv.into());
        m.insert("generation".into(), generation.into());
        m.entry("uid").or_insert(json!(format!("uid-{rv}")));
    }
}
