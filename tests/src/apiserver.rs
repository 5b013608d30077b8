//! A Kubernetes API server double for the `--kubernetes` source: plain HTTP/1.1 speaking the
//! real wire protocol, so the agent's kube-rs client and watchers run unchanged against it.
//!
//! - list: `GET /api/v1/services?labelSelector=…&limit=N[&continue=T]` → a `ServiceList` whose
//!   `metadata.resourceVersion` is the store's; items carry their own resourceVersion and, as
//!   a real server sends them, no kind/apiVersion. Pages hold at most [`ApiServer::page_cap`]
//!   items (fewer than `limit` is allowed by the protocol), so every list paginates.
//! - watch: `?watch=true&resourceVersion=R&allowWatchBookmarks=true&timeoutSeconds=T` → a
//!   chunked stream of `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":…}` lines, one
//!   per change after R; selectors turn a change into ADDED/DELETED as an object starts or stops
//!   matching; R older than the compacted revision → an ERROR event with a 410 `Status`.
//! - faults: [`ApiServer::drop_watches`] cuts every open watch mid-stream, [`ApiServer::expire`]
//!   compacts history (the next watch from an older revision gets 410 Gone),
//!   [`ApiServer::fail_lists`] answers a resource's lists with 500, [`ApiServer::set_down`]
//!   refuses every request.
//!
//! Objects are `serde_json::Value`s; the fixtures under `tests/fixtures/kube` are objects as a
//! real API server returns them.

use std::{
    collections::{BTreeMap, HashSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// An object as a real API server returns it: `tests/fixtures/kube/<name>.json`.
pub fn fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/kube/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}
use serde_json::{Value, json};

/// A resource the double serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
    Pools,
    Policies,
    Leases,
}

impl Resource {
    const ALL: [Resource; 6] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
        Resource::Pools,
        Resource::Policies,
        Resource::Leases,
    ];

    /// (API prefix, plural, kind, apiVersion, namespaced)
    fn info(self) -> (&'static str, &'static str, &'static str, &'static str, bool) {
        match self {
            Resource::Services => ("/api/v1", "services", "Service", "v1", true),
            Resource::EndpointSlices => (
                "/apis/discovery.k8s.io/v1",
                "endpointslices",
                "EndpointSlice",
                "discovery.k8s.io/v1",
                true,
            ),
            Resource::Nodes => ("/api/v1", "nodes", "Node", "v1", false),
            Resource::Pools => (
                "/apis/lb.xdp.rs/v1alpha1",
                "loadbalancerippools",
                "LoadBalancerIPPool",
                "lb.xdp.rs/v1alpha1",
                false,
            ),
            Resource::Policies => (
                "/apis/lb.xdp.rs/v1alpha1",
                "l2announcementpolicies",
                "L2AnnouncementPolicy",
                "lb.xdp.rs/v1alpha1",
                false,
            ),
            Resource::Leases => (
                "/apis/coordination.k8s.io/v1",
                "leases",
                "Lease",
                "coordination.k8s.io/v1",
                true,
            ),
        }
    }

    pub fn of_kind(kind: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.info().2 == kind)
    }
}

#[derive(Clone)]
struct Change {
    rv: u64,
    resource: Resource,
    /// "ADDED", "MODIFIED", "DELETED" or "BOOKMARK".
    kind: &'static str,
    object: Value,
    /// The object before a MODIFIED.
    old: Option<Value>,
}

/// The store and its history. Changes go through [`State::put`] and [`State::delete`].
#[derive(Default)]
pub struct State {
    rv: u64,
    objects: BTreeMap<(Resource, String), Value>,
    history: Vec<Change>,
    /// Watches from a revision below this get 410 Gone.
    compacted: u64,
    /// Bumped to cut every open watch.
    epoch: u64,
    failing_lists: HashSet<Resource>,
    /// Resources answered with 404, as a CRD that is not installed.
    missing: HashSet<Resource>,
    down: bool,
    /// "GET /api/v1/services?…" of every request, in order.
    pub requests: Vec<String>,
    /// 410 Gone answers sent.
    pub gone_sent: u64,
    /// PATCHes that changed an object.
    pub status_patches: u64,
}

impl State {
    /// Creates or replaces the object (kind from its `kind`), stamping uid, resourceVersion and
    /// creationTimestamp as the API server does; returns the stored object.
    pub fn put(&mut self, mut object: Value) -> Value {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let resource = Resource::of_kind(&kind).unwrap_or_else(|| panic!("kind {kind:?}"));
        let key = key_of(resource, &object);
        self.rv += 1;
        let old = self.objects.get(&(resource, key.clone())).cloned();
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(self.rv.to_string());
        meta["uid"] = old
            .as_ref()
            .map(|o| o["metadata"]["uid"].clone())
            .unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{:012}", self.rv)));
        if meta.get("creationTimestamp").is_none_or(Value::is_null) {
            meta["creationTimestamp"] = json!("2026-11-28T00:00:00Z");
        }
        self.objects.insert((resource, key), object.clone());
        self.history.push(Change {
            rv: self.rv,
            resource,
            kind: if old.is_some() { "MODIFIED" } else { "ADDED" },
            object: object.clone(),
            old,
        });
        object
    }

    /// Deletes the object; false if there was none.
    pub fn delete(&mut self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let resource = Resource::of_kind(kind).unwrap_or_else(|| panic!("kind {kind:?}"));
        let key = match namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        };
        let Some(mut object) = self.objects.remove(&(resource, key)) else {
            return false;
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.history.push(Change {
            rv: self.rv,
            resource,
            kind: "DELETED",
            object,
            old: None,
        });
        true
    }

    /// The store's current resourceVersion.
    pub fn revision(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<&Value> {
        let resource = Resource::of_kind(kind)?;
        let key = match namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        };
        self.objects.get(&(resource, key))
    }

    /// The RBAC permissions the requests so far needed: (apiGroup, resource[/subresource],
    /// verb), as the API server authorizes them.
    pub fn permissions_used(&self) -> std::collections::BTreeSet<(String, String, String)> {
        let mut used = std::collections::BTreeSet::new();
        for line in &self.requests {
            let (method, target) = line.split_once(' ').unwrap_or((line, ""));
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let Some((resource, _, name, sub)) = route(path) else {
                continue;
            };
            let (prefix, plural, ..) = resource.info();
            let group = prefix
                .strip_prefix("/apis/")
                .and_then(|g| g.split('/').next())
                .unwrap_or("");
            let verb = match (method, name) {
                ("GET", None) if query.contains("watch=true") => "watch",
                ("GET", None) => "list",
                ("GET", Some(_)) => "get",
                ("POST", _) => "create",
                ("PUT", _) => "update",
                ("PATCH", _) => "patch",
                ("DELETE", _) => "delete",
                _ => continue,
            };
            let resource = match sub {
                Some(s) => format!("{plural}/{s}"),
                None => plural.to_string(),
            };
            used.insert((group.to_string(), resource, verb.to_string()));
        }
        used
    }

    /// Requests whose line starts with `prefix` ("GET /api/v1/services?").
    pub fn count(&self, prefix: &str, containing: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.starts_with(prefix) && r.contains(containing))
            .count()
    }
}

fn key_of(resource: Resource, object: &Value) -> String {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if resource.info().4 {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        format!("{ns}/{name}")
    } else {
        name.to_string()
    }
}

/// The store's lock; a test that failed an assertion while holding it must not turn the
/// double's own cleanup into an abort, so a poisoned lock is taken as it is.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    page_cap: usize,
}

/// The running double. Dropping it stops accepting and ends every watch.
pub struct ApiServer {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ApiServer {
    /// Listens on `listener` (bound by the caller, e.g. inside a network namespace), with
    /// pages of at most 2 objects, so the tests' small lists paginate too.
    pub fn serve(listener: TcpListener) -> Result<Self> {
        Self::serve_paged(listener, 2)
    }

    /// As [`ApiServer::serve`], pages of at most `page_cap` objects (a real server honours
    /// the client's limit, 500 for kube-rs).
    pub fn serve_paged(listener: TcpListener, page_cap: usize) -> Result<Self> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            page_cap,
        });
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        listener.set_nonblocking(true)?;
        let (i, s) = (inner.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let i = i.clone();
                        let s = s.clone();
                        thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = handle(&i, &s, conn);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(ApiServer { inner, addr, stop })
    }

    /// Objects per list page (the protocol lets a server return fewer than `limit`).
    pub fn page_cap(&self) -> usize {
        self.inner.page_cap
    }

    /// Runs `f` on the store under its lock, then wakes the watches.
    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.lock();
        let out = f(&mut state);
        drop(state);
        self.inner.changed.notify_all();
        out
    }

    pub fn put(&self, object: Value) -> Value {
        self.with(|s| s.put(object))
    }

    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        self.with(|s| s.delete(kind, namespace, name))
    }

    /// Cuts every open watch connection mid-stream (no final chunk), as a dropped TCP
    /// connection or an API server restart does.
    pub fn drop_watches(&self) {
        self.with(|s| s.epoch += 1);
    }

    /// Compacts history past the current revision (as etcd compaction does): a watch resumed
    /// from any earlier revision gets 410 Gone and must list again. `f` runs in the same step,
    /// so its changes are only seen through that new list.
    pub fn expire(&self, f: impl FnOnce(&mut State)) {
        self.with(|s| {
            s.epoch += 1;
            s.rv += 1;
            s.compacted = s.rv;
            f(s);
        });
    }

    /// Lists of `resource` answer 500 while `failing`.
    pub fn fail_lists(&self, kind: &str, failing: bool) {
        let r = Resource::of_kind(kind).expect("kind");
        self.with(|s| {
            if failing {
                s.failing_lists.insert(r);
            } else {
                s.failing_lists.remove(&r);
            }
        });
    }

    /// Whether `kind` is served (false: 404, as for a CRD not installed).
    pub fn set_installed(&self, kind: &str, installed: bool) {
        let r = Resource::of_kind(kind).expect("kind");
        self.with(|s| {
            if installed {
                s.missing.remove(&r);
            } else {
                s.missing.insert(r);
            }
        });
    }

    /// While down, every connection is closed unanswered and open watches are cut.
    pub fn set_down(&self, down: bool) {
        self.with(|s| {
            s.down = down;
            s.epoch += 1;
        });
    }

    /// Sends a BOOKMARK at the current revision to every open watch that asked for them.
    pub fn bookmark(&self) {
        self.with(|s| {
            for resource in Resource::ALL {
                let (_, _, kind, api_version, _) = resource.info();
                let rv = s.rv;
                s.history.push(Change {
                    rv,
                    resource,
                    kind: "BOOKMARK",
                    object: json!({"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv.to_string()}}),
                    old: None,
                });
            }
        });
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Waits until `f` holds for the store (requests seen, say).
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&State) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if f(&self.lock()) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("API double: timed out waiting for {what}")
    }

    /// A kubeconfig that points at this double (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: double\n  context: {{cluster: double, user: agent}}\ncurrent-context: double\n\
             users:\n- name: agent\n  user: {{}}\n",
            self.addr
        )
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.with(|s| s.epoch += 1);
    }
}

struct Request {
    method: String,
    content_type: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().context("request line")?.to_string();
    let target = parts.next().context("request target")?.to_string();
    let mut length = 0usize;
    let mut content_type = String::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            } else if name.eq_ignore_ascii_case("content-type") {
                content_type = value.trim().to_string();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        content_type,
        path: path.to_string(),
        query,
        body,
    }))
}

/// Percent-decoding of a query component ('+' is a space).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(conn: &mut TcpStream, code: u16, body: &Value) -> Result<()> {
    let text = serde_json::to_vec(body)?;
    let reason = match code {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        410 => "Gone",
        422 => "Unprocessable Entity",
        _ => "Internal Server Error",
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    )?;
    conn.write_all(&text)?;
    Ok(())
}

/// 404 for an object `name` of `resource` that is not stored.
fn not_found(conn: &mut TcpStream, resource: Resource, name: &str) -> Result<()> {
    let message = format!("{} \"{name}\" not found", resource.info().1);
    respond(conn, 404, &status(404, "NotFound", &message))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn handle(inner: &Inner, stop: &std::sync::atomic::AtomicBool, conn: TcpStream) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    let Some(req) = read_request(&mut reader)? else {
        return Ok(());
    };
    let line = if req.query.is_empty() {
        format!("{} {}", req.method, req.path)
    } else {
        let q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{} {}?{}", req.method, req.path, q.join("&"))
    };
    {
        let mut state = lock(&inner.state);
        if state.down {
            drop(state);
            let _ = conn.shutdown(Shutdown::Both);
            return Ok(());
        }
        state.requests.push(line);
    }
    let routed = route(&req.path).filter(|(r, ..)| !lock(&inner.state).missing.contains(r));
    let Some((resource, namespace, name, subresource)) = routed else {
        return respond(
            &mut conn,
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    match (req.method.as_str(), name) {
        ("GET", None)
            if req
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1") =>
        {
            watch(inner, stop, &mut conn, resource, namespace, &req)
        }
        ("GET", None) => list(inner, &mut conn, resource, namespace, &req),
        ("GET", Some(name)) => {
            let state = lock(&inner.state);
            let key = match namespace {
                Some(ns) => format!("{ns}/{name}"),
                None => name.to_string(),
            };
            match state.objects.get(&(resource, key)) {
                Some(o) => {
                    let o = o.clone();
                    drop(state);
                    respond(&mut conn, 200, &o)
                }
                None => {
                    drop(state);
                    not_found(&mut conn, resource, name)
                }
            }
        }
        ("POST", None) => create(inner, &mut conn, resource, namespace, &req),
        ("PUT", Some(name)) => replace(inner, &mut conn, resource, namespace, name, &req),
        ("PATCH", Some(name)) => patch(
            inner,
            &mut conn,
            resource,
            namespace,
            name,
            subresource,
            &req,
        ),
        ("DELETE", Some(name)) => {
            let kind = resource.info().2;
            let deleted = {
                let mut state = lock(&inner.state);
                let stored = state.get(kind, namespace, name).cloned();
                if stored.is_some() {
                    state.delete(kind, namespace, name);
                }
                stored
            };
            match deleted {
                Some(o) => {
                    inner.changed.notify_all();
                    respond(&mut conn, 200, &o)
                }
                None => not_found(&mut conn, resource, name),
            }
        }
        (method, _) => respond(
            &mut conn,
            405,
            &status(
                405,
                "MethodNotAllowed",
                &format!("{method} not served by the double"),
            ),
        ),
    }
}

/// A request path taken apart: resource, namespace, name, subresource.
type Route<'a> = (Resource, Option<&'a str>, Option<&'a str>, Option<&'a str>);

/// "/api/v1/namespaces/default/services/web/status" → (Services, Some("default"), Some("web"),
/// Some("status")).
fn route(path: &str) -> Option<Route<'_>> {
    for resource in Resource::ALL {
        let (prefix, plural, ..) = resource.info();
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let (namespace, parts) = match parts.as_slice() {
            ["namespaces", ns, rest @ ..] => (Some(*ns), rest.to_vec()),
            _ => (None, parts),
        };
        match parts.as_slice() {
            [p] if *p == plural => return Some((resource, namespace, None, None)),
            [p, name] if *p == plural => return Some((resource, namespace, Some(*name), None)),
            [p, name, sub] if *p == plural => {
                return Some((resource, namespace, Some(*name), Some(*sub)));
            }
            _ => {}
        }
    }
    None
}

/// Does `object` match the request's label and field selectors (and namespace)?
fn selected(object: &Value, namespace: Option<&str>, query: &BTreeMap<String, String>) -> bool {
    if let Some(ns) = namespace
        && object["metadata"]["namespace"].as_str() != Some(ns)
    {
        return false;
    }
    let labels = &object["metadata"]["labels"];
    for term in query
        .get("labelSelector")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
    {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let ok = if let Some(key) = term.strip_prefix('!') {
            labels.get(key).is_none()
        } else if let Some((k, v)) = term.split_once("!=") {
            labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k].as_str() == Some(v.trim_start_matches('='))
        } else {
            labels.get(term).is_some()
        };
        if !ok {
            return false;
        }
    }
    for term in query
        .get("fieldSelector")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
    {
        let Some((field, value)) = term.split_once('=') else {
            continue;
        };
        let actual = match field {
            "metadata.name" => object["metadata"]["name"].as_str(),
            "metadata.namespace" => object["metadata"]["namespace"].as_str(),
            _ => None,
        };
        if actual != Some(value.trim_start_matches('=')) {
            return false;
        }
    }
    true
}

/// As a list item: a real server leaves out kind and apiVersion.
fn item(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    o
}

fn body_object(req: &Request) -> Result<Value> {
    serde_json::from_slice(&req.body).context("request body is not JSON")
}

fn object_key(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// POST: 201 with the stored object, 409 AlreadyExists if the name is taken.
fn create(
    inner: &Inner,
    conn: &mut TcpStream,
    resource: Resource,
    namespace: Option<&str>,
    req: &Request,
) -> Result<()> {
    let mut object = body_object(req)?;
    let (_, plural, kind, api_version, _) = resource.info();
    object["kind"] = json!(kind);
    object["apiVersion"] = json!(api_version);
    if let Some(ns) = namespace {
        object["metadata"]["namespace"] = json!(ns);
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let state = lock(&inner.state);
    if state
        .objects
        .contains_key(&(resource, object_key(namespace, &name)))
    {
        drop(state);
        let message = format!(
            "{plural}.{} \"{name}\" already exists",
            api_version.split('/').next().unwrap_or("")
        );
        return respond(conn, 409, &status(409, "AlreadyExists", &message));
    }
    store(inner, state, conn, 201, object)
}

/// Stores `object` (a create or a replace), wakes the watches and answers with it.
fn store(
    inner: &Inner,
    mut state: MutexGuard<'_, State>,
    conn: &mut TcpStream,
    code: u16,
    object: Value,
) -> Result<()> {
    let stored = state.put(object);
    drop(state);
    inner.changed.notify_all();
    respond(conn, code, &stored)
}

/// PUT: optimistic concurrency on metadata.resourceVersion (409 Conflict when stale).
fn replace(
    inner: &Inner,
    conn: &mut TcpStream,
    resource: Resource,
    namespace: Option<&str>,
    name: &str,
    req: &Request,
) -> Result<()> {
    let mut object = body_object(req)?;
    let (_, plural, kind, api_version, _) = resource.info();
    object["kind"] = json!(kind);
    object["apiVersion"] = json!(api_version);
    let state = lock(&inner.state);
    let Some(current) = state.objects.get(&(resource, object_key(namespace, name))) else {
        drop(state);
        return not_found(conn, resource, name);
    };
    let sent = object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if !sent.is_empty() && current["metadata"]["resourceVersion"].as_str() != Some(sent) {
        drop(state);
        let message = format!(
            "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
        );
        return respond(conn, 409, &status(409, "Conflict", &message));
    }
    object["metadata"]["uid"] = current["metadata"]["uid"].clone();
    store(inner, state, conn, 200, object)
}

/// PATCH with a JSON merge patch (RFC 7386); on the status subresource only `status` changes.
/// A patch that changes nothing leaves the resourceVersion alone and sends no event.
fn patch(
    inner: &Inner,
    conn: &mut TcpStream,
    resource: Resource,
    namespace: Option<&str>,
    name: &str,
    subresource: Option<&str>,
    req: &Request,
) -> Result<()> {
    if !req.content_type.starts_with("application/merge-patch+json") {
        return respond(
            conn,
            415,
            &status(
                415,
                "UnsupportedMediaType",
                &format!("{} not supported by the double", req.content_type),
            ),
        );
    }
    let patch = body_object(req)?;
    let mut state = lock(&inner.state);
    let Some(current) = state
        .objects
        .get(&(resource, object_key(namespace, name)))
        .cloned()
    else {
        drop(state);
        return not_found(conn, resource, name);
    };
    let mut next = current.clone();
    match subresource {
        Some("status") => merge(&mut next["status"], &patch["status"]),
        _ => merge(&mut next, &patch),
    }
    if next == current {
        drop(state);
        return respond(conn, 200, &current);
    }
    state.status_patches += 1;
    let stored = state.put(next);
    drop(state);
    inner.changed.notify_all();
    respond(conn, 200, &stored)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("object");
    for (k, v) in fields {
        if v.is_null() {
            map.remove(k);
        } else {
            merge(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn list(
    inner: &Inner,
    conn: &mut TcpStream,
    resource: Resource,
    namespace: Option<&str>,
    req: &Request,
) -> Result<()> {
    let state = lock(&inner.state);
    let (_, _, kind, api_version, _) = resource.info();
    if state.failing_lists.contains(&resource) {
        drop(state);
        return respond(
            conn,
            500,
            &status(500, "InternalError", "etcdserver: request timed out"),
        );
    }
    // continue = "<revision of the first page>:<offset>".
    let (rv, offset) = match req.query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, offset) = token.split_once(':').context("continue token")?;
            (rv.parse::<u64>()?, offset.parse::<usize>()?)
        }
        None => (state.rv, 0),
    };
    if rv < state.compacted {
        drop(state);
        return respond(
            conn,
            410,
            &status(410, "Expired", "The provided continue parameter is too old"),
        );
    }
    let limit = req
        .query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX)
        .min(inner.page_cap);
    let matching: Vec<&Value> = state
        .objects
        .range((resource, String::new())..)
        .take_while(|((r, _), _)| *r == resource)
        .map(|(_, o)| o)
        .filter(|o| selected(o, namespace, &req.query))
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|o| item(o))
        .collect();
    let next = offset + page.len();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if next < matching.len() {
        metadata["continue"] = json!(format!("{rv}:{next}"));
        metadata["remainingItemCount"] = json!(matching.len() - next);
    }
    let body = json!({"kind": format!("{kind}List"), "apiVersion": api_version,
        "metadata": metadata, "items": page});
    drop(state);
    respond(conn, 200, &body)
}

fn watch(
    inner: &Inner,
    stop: &std::sync::atomic::AtomicBool,
    conn: &mut TcpStream,
    resource: Resource,
    namespace: Option<&str>,
    req: &Request,
) -> Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        req.query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290),
    );
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let send = |conn: &mut TcpStream, event: &Value| -> Result<()> {
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        write!(conn, "{:x}\r\n", line.len())?;
        conn.write_all(&line)?;
        conn.write_all(b"\r\n")?;
        conn.flush()?;
        Ok(())
    };
    let mut state = lock(&inner.state);
    if from < state.compacted {
        state.gone_sent += 1;
        drop(state);
        let gone = status(410, "Expired", &format!("too old resource version: {from}"));
        send(conn, &json!({"type": "ERROR", "object": gone}))?;
        conn.write_all(b"0\r\n\r\n")?;
        return Ok(());
    }
    let epoch = state.epoch;
    let mut next = state.history.partition_point(|c| c.rv <= from);
    let start = Instant::now();
    loop {
        if state.epoch != epoch || stop.load(std::sync::atomic::Ordering::SeqCst) {
            // Cut mid-stream: no terminating chunk.
            drop(state);
            let _ = conn.shutdown(Shutdown::Both);
            return Ok(());
        }
        let mut out = Vec::new();
        while next < state.history.len() {
            let c = &state.history[next];
            next += 1;
            if c.resource != resource {
                continue;
            }
            if c.kind == "BOOKMARK" {
                if bookmarks {
                    out.push(json!({"type": "BOOKMARK", "object": c.object}));
                }
                continue;
            }
            let now = selected(&c.object, namespace, &req.query);
            let before = c
                .old
                .as_ref()
                .is_some_and(|o| selected(o, namespace, &req.query));
            let kind = match (c.kind, before, now) {
                ("DELETED", _, true) => "DELETED",
                ("ADDED", _, true) => "ADDED",
                ("MODIFIED", true, true) => "MODIFIED",
                ("MODIFIED", false, true) => "ADDED",
                ("MODIFIED", true, false) => "DELETED",
                _ => continue,
            };
            out.push(json!({"type": kind, "object": c.object}));
        }
        if !out.is_empty() {
            drop(state);
            for e in &out {
                send(conn, e)?;
            }
            state = lock(&inner.state);
            continue;
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            drop(state);
            conn.write_all(b"0\r\n\r\n")?;
            return Ok(());
        }
        state = inner
            .changed
            .wait_timeout(state, left.min(Duration::from_millis(200)))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
