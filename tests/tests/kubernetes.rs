//! `lb-agent --kubernetes` against the API server double (real wire protocol, objects shaped as
//! a real API server returns them): real packets follow every change the watch delivers,
//! through dropped connections, 410 Gone, an API server that is away, failing lists and CRDs
//! that are not installed.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use lb_tests::{
    BACKEND_TCP_PORT, BACKEND_UDP_PORT, CLUSTER_IP, Conversation, TCP_PORT, Topology, UDP_PORT,
    apiserver::{ApiServer, fixture},
    in_netns, udp_ask,
};
use serde_json::{Value, json};

const NODE: &str = "node-a";

/// The double, listening on 127.0.0.1 inside the node namespace (where the agent runs).
fn api_server(topo: &Topology) -> ApiServer {
    let listener = in_netns(&topo.node, || TcpListener::bind("127.0.0.1:0").unwrap());
    ApiServer::serve(listener).unwrap()
}

fn start_agent(topo: &mut Topology, api: &ApiServer) {
    let kubeconfig = topo.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    topo.start_agent(&[
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--node-name",
        NODE,
    ])
    .unwrap();
}

/// The fixture Service as `name` with `cluster_ip`, TCP and UDP ports to the test servers.
fn service(name: &str, cluster_ip: &str) -> Value {
    let mut s = fixture("service");
    s["metadata"]["name"] = json!(name);
    s["metadata"]["labels"] = json!({"app": name});
    s["spec"]["clusterIP"] = json!(cluster_ip);
    s["spec"]["clusterIPs"] = json!([cluster_ip]);
    s["spec"]["ports"] = json!([
        {"name": "tcp", "protocol": "TCP", "port": TCP_PORT, "targetPort": BACKEND_TCP_PORT},
        {"name": "udp", "protocol": "UDP", "port": UDP_PORT, "targetPort": BACKEND_UDP_PORT},
    ]);
    s
}

/// The fixture EndpointSlice of Service `echo` with the given backends, all ready.
fn echo_slice(backends: &[usize]) -> Value {
    let mut s = fixture("endpointslice");
    let template = s["endpoints"][0].clone();
    s["endpoints"] = backends
        .iter()
        .map(|i| {
            let mut e = template.clone();
            e["addresses"] = json!([format!("10.0.{i}.2")]);
            e["targetRef"]["name"] = json!(format!("echo-5d8f7c9b6-b{i}"));
            e
        })
        .collect();
    s["ports"] = json!([
        {"name": "tcp", "protocol": "TCP", "port": BACKEND_TCP_PORT},
        {"name": "udp", "protocol": "UDP", "port": BACKEND_UDP_PORT},
    ]);
    s
}

fn node() -> Value {
    let mut n = fixture("node");
    n["metadata"]["name"] = json!(NODE);
    n
}

/// Backends answering 40 TCP conversations and 20 UDP exchanges to the ClusterIP.
fn answers(topo: &Topology) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    topo.client(|| {
        let mut tcp = BTreeMap::new();
        let mut udp = BTreeMap::new();
        for _ in 0..40 {
            let name = Conversation::open(SocketAddr::from((CLUSTER_IP, TCP_PORT)))
                .and_then(|mut c| c.ask())
                .unwrap_or_else(|e| format!("error: {e}"));
            *tcp.entry(name).or_default() += 1;
        }
        for _ in 0..20 {
            let name = udp_ask(SocketAddr::from((CLUSTER_IP, UDP_PORT)))
                .map(|(_, n)| n)
                .unwrap_or_else(|e| format!("error: {e}"));
            *udp.entry(name).or_default() += 1;
        }
        (tcp, udp)
    })
}

fn names(backends: &[usize]) -> Vec<String> {
    backends.iter().map(|i| format!("backend-{i}")).collect()
}

/// Waits until exactly `backends` answer over TCP and UDP; returns how long that took.
fn wait_for_backends(topo: &Topology, backends: &[usize], what: &str) -> Duration {
    let want = names(backends);
    let start = Instant::now();
    loop {
        let (tcp, udp) = answers(topo);
        let tcp_names: Vec<&String> = tcp.keys().collect();
        let udp_names: Vec<&String> = udp.keys().collect();
        if tcp_names == want.iter().collect::<Vec<_>>()
            && udp_names == want.iter().collect::<Vec<_>>()
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: want {want:?}, TCP {tcp:?}, UDP {udp:?}\n{}",
            topo.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn frontends(topo: &Topology) -> Vec<String> {
    let services: Value =
        serde_json::from_str(&topo.lbctl(&["services", "-o", "json"]).unwrap()).unwrap();
    let mut list: Vec<String> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["frontend"].as_str().unwrap().to_string())
        .collect();
    list.sort();
    list
}

#[test]
fn watch_source_follows_every_change_through_drops_and_410() {
    let mut topo = Topology::new(3).unwrap();
    let api = api_server(&topo);
    api.put(node());
    api.put(service("echo", "10.96.0.10"));
    api.put(echo_slice(&[1, 2]));
    // More Services than a list page holds; one served by another proxy and one headless,
    // which kube-proxy's selector leaves out.
    for i in 0..3 {
        api.put(service(&format!("idle-{i}"), &format!("10.96.1.{i}")));
    }
    let mut other = service("other-proxy", "10.96.2.1");
    other["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("someone-else");
    api.put(other);
    let mut headless = service("headless", "None");
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    api.put(headless);
    start_agent(&mut topo, &api);

    wait_for_backends(&topo, &[1, 2], "initial list");
    let all = frontends(&topo);
    assert!(all.contains(&"10.96.0.10:80/TCP".to_string()), "{all:?}");
    assert!(all.contains(&"10.96.1.2:53/UDP".to_string()), "{all:?}");
    assert!(!all.iter().any(|f| f.starts_with("10.96.2.1:")), "{all:?}");
    {
        let s = api.lock();
        let selector = "labelSelector=!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
        assert!(
            s.count("GET /api/v1/services?", selector) >= 1,
            "{:?}",
            s.requests
        );
        assert!(s.count("GET /apis/discovery.k8s.io/v1/endpointslices?", selector) >= 1);
        assert!(s.count("GET /api/v1/nodes?", "fieldSelector=metadata.name=node-a") >= 1);
        // 4 Services at 2 a page: the list followed its continue token.
        assert!(
            s.count("GET /api/v1/services?", "continue=") >= 1,
            "{:?}",
            s.requests
        );
        assert!(s.count("GET /apis/lb.xdp.rs/v1alpha1/loadbalancerippools?", "") >= 1);
    }

    // MODIFIED through the open watch.
    api.put(echo_slice(&[1, 2, 3]));
    let took = wait_for_backends(&topo, &[1, 2, 3], "endpoint added");
    println!("watch event → all three answering: {took:?}");

    // A dropped watch resumes from its revision: no new list, the change arrives.
    let lists_before = api
        .lock()
        .count("GET /apis/discovery.k8s.io/v1/endpointslices?", "limit=");
    let watches_before = api
        .lock()
        .count("GET /apis/discovery.k8s.io/v1/endpointslices?", "watch=");
    api.drop_watches();
    api.put(echo_slice(&[3]));
    wait_for_backends(&topo, &[3], "change after a dropped watch");
    {
        let s = api.lock();
        assert!(
            s.count("GET /apis/discovery.k8s.io/v1/endpointslices?", "watch=") > watches_before
        );
        assert_eq!(
            s.count("GET /apis/discovery.k8s.io/v1/endpointslices?", "limit="),
            lists_before,
            "a dropped watch resumes without listing again: {:?}",
            s.requests
        );
    }

    // A BOOKMARK moves the revision a watch resumes from (the Services watch saw no event
    // since the EndpointSlice changes).
    let bookmark = api.with(|s| s.revision());
    api.bookmark();
    std::thread::sleep(Duration::from_millis(300));
    api.drop_watches();
    let resumed = format!("resourceVersion={bookmark}");
    api.wait_for(
        Duration::from_secs(10),
        "Services watch resumed at the bookmark",
        |s| {
            s.count("GET /api/v1/services?", "watch=") > 1
                && s.requests.iter().any(|r| {
                    r.starts_with("GET /api/v1/services?")
                        && r.contains("watch=")
                        && r.contains(&resumed)
                })
        },
    )
    .unwrap();

    // 410 Gone: history compacted while the watches were cut, and a change made meanwhile.
    let gone_before = api.lock().gone_sent;
    api.expire(|s| {
        s.put(echo_slice(&[1]));
    });
    wait_for_backends(&topo, &[1], "change seen only by listing again after 410");
    {
        let s = api.lock();
        assert!(
            s.gone_sent > gone_before,
            "no 410 was sent: {:?}",
            s.requests
        );
        assert!(
            s.count("GET /apis/discovery.k8s.io/v1/endpointslices?", "limit=") > lists_before,
            "410 must lead to a new list"
        );
    }

    // DELETED and ADDED again.
    api.delete("Service", Some("default"), "echo");
    let start = Instant::now();
    while frontends(&topo)
        .iter()
        .any(|f| f.starts_with("10.96.0.10:"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "echo not removed\n{}",
            topo.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    api.put(service("echo", "10.96.0.10"));
    wait_for_backends(&topo, &[1], "Service added again");

    // An object the agent cannot take (SCTP) stays at its last good version; other changes
    // still apply.
    let mut sctp = service("echo", "10.96.0.10");
    sctp["spec"]["ports"][1]["protocol"] = json!("SCTP");
    api.put(sctp);
    api.put(echo_slice(&[1, 2]));
    wait_for_backends(&topo, &[1, 2], "other changes while one object is bad");
    assert!(
        topo.agent_log()
            .contains("Service default/echo: spec.ports[1].protocol"),
        "{}",
        topo.agent_log()
    );

    // The API server away: forwarding goes on; back: changes follow again.
    api.set_down(true);
    std::thread::sleep(Duration::from_secs(1));
    wait_for_backends(&topo, &[1, 2], "API server down");
    api.put(service("echo", "10.96.0.10"));
    api.put(echo_slice(&[2]));
    api.set_down(false);
    wait_for_backends(&topo, &[2], "API server back");
}

#[test]
fn nothing_is_programmed_before_every_kind_is_listed() {
    let mut topo = Topology::new(2).unwrap();
    let api = api_server(&topo);
    api.put(node());
    api.put(service("echo", "10.96.0.10"));
    api.put(echo_slice(&[1, 2]));
    // Our CRDs not installed: taken as no pools and no policies, and said so.
    api.set_installed("LoadBalancerIPPool", false);
    api.set_installed("L2AnnouncementPolicy", false);
    start_agent(&mut topo, &api);
    wait_for_backends(&topo, &[1, 2], "first run");
    assert!(
        topo.agent_log().contains("not served (CRD not installed?"),
        "{}",
        topo.agent_log()
    );
    topo.stop_agent().unwrap();

    // Restarted while EndpointSlices cannot be listed: the pinned state keeps forwarding and
    // the agent does not program a view without endpoints.
    api.fail_lists("EndpointSlice", true);
    api.put(echo_slice(&[2]));
    let kubeconfig = topo.dir.join("kubeconfig").display().to_string();
    topo.spawn_agent(&[
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--node-name",
        NODE,
    ])
    .unwrap();
    topo.wait_agent_log("waiting for the initial lists", Duration::from_secs(10))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !topo.agent_log().contains("lb-agent ready"),
        "{}",
        topo.agent_log()
    );
    wait_for_backends(&topo, &[1, 2], "pinned state while the lists fail");
    api.fail_lists("EndpointSlice", false);
    topo.wait_agent_log("lb-agent ready", Duration::from_secs(40))
        .unwrap();
    wait_for_backends(&topo, &[2], "after the lists succeed");
}

fn pool(name: &str, start: &str, stop: &str) -> Value {
    json!({"apiVersion": "lb.xdp.rs/v1alpha1", "kind": "LoadBalancerIPPool",
        "metadata": {"name": name}, "spec": {"blocks": [{"start": start, "stop": stop}]}})
}

fn load_balancer(name: &str, cluster_ip: &str) -> Value {
    let mut s = service(name, cluster_ip);
    s["spec"]["type"] = json!("LoadBalancer");
    s["spec"]["ports"][0]["nodePort"] = json!(
        30000
            + cluster_ip
                .rsplit('.')
                .next()
                .unwrap()
                .parse::<u16>()
                .unwrap()
    );
    s["spec"]["ports"][1]["nodePort"] = s["spec"]["ports"][0]["nodePort"].clone();
    s
}

/// The status condition `lb.xdp.rs/AddressAllocated` and the ingress IPs of a Service.
fn allocation(api: &ApiServer, name: &str) -> (Option<(String, String)>, Vec<String>) {
    let s = api.lock();
    let Some(service) = s.get("Service", Some("default"), name) else {
        return (None, Vec::new());
    };
    let condition = service["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "lb.xdp.rs/AddressAllocated")
        .map(|c| {
            (
                c["status"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap().to_string(),
            )
        });
    let ingress = service["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect();
    (condition, ingress)
}

#[test]
fn ipam_leader_writes_service_and_pool_status() {
    let mut topo = Topology::new(1).unwrap();
    let api = api_server(&topo);
    api.put(node());
    api.put(pool("lan", "192.168.30.60", "192.168.30.61"));
    api.put(load_balancer("web", "10.96.0.40"));
    let mut web_slice = echo_slice(&[1]);
    web_slice["metadata"]["name"] = json!("web-abcde");
    web_slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!("web");
    api.put(web_slice);
    let mut pinned = load_balancer("pinned", "10.96.0.41");
    pinned["metadata"]["annotations"]["lb.xdp.rs/ips"] = json!("192.168.30.61");
    api.put(pinned);
    api.put(load_balancer("zeta", "10.96.0.42"));
    let mut taken = load_balancer("taken", "10.96.0.43");
    taken["spec"]["loadBalancerIP"] = json!("192.168.30.61");
    api.put(taken);
    // Another controller's Service: its status is served, never written.
    let mut metal = load_balancer("metal", "10.96.0.44");
    metal["spec"]["loadBalancerClass"] = json!("metallb.io/metallb");
    metal["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.50"}]}});
    api.put(metal);
    // The kubeconfig names a server that is not there: --api-server is the one reached (as
    // the DaemonSet reaches the API server without the ClusterIP the agent serves).
    let kubeconfig = topo.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        api.kubeconfig()
            .replace(&api.addr.to_string(), "127.0.0.1:9"),
    )
    .unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    let server = format!("http://{}", api.addr);
    topo.start_agent(&[
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--api-server",
        &server,
        "--node-name",
        NODE,
    ])
    .unwrap();

    let start = Instant::now();
    loop {
        let all = [
            allocation(&api, "web"),
            allocation(&api, "pinned"),
            allocation(&api, "zeta"),
            allocation(&api, "taken"),
        ];
        let want = [
            (
                Some(("True".into(), "Allocated".into())),
                vec!["192.168.30.60".to_string()],
            ),
            (
                Some(("True".into(), "Allocated".into())),
                vec!["192.168.30.61".to_string()],
            ),
            (Some(("False".into(), "PoolExhausted".into())), vec![]),
            (
                Some(("False".into(), "RequestedAddressTaken".into())),
                vec![],
            ),
        ];
        if all == want {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "status: {all:?}\n{}",
            topo.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        allocation(&api, "metal"),
        (None, vec!["192.0.2.50".to_string()])
    );
    // The pool's counts follow the Services' statuses (the same write, a moment later).
    api.wait_for(Duration::from_secs(10), "the pool's status", |s| {
        s.get("LoadBalancerIPPool", None, "lan")
            .is_some_and(|p| p["status"] == json!({"total": 2, "used": 2, "available": 0}))
    })
    .unwrap();
    let lease = api
        .lock()
        .get("Lease", Some("kube-system"), "lb-agent-ipam")
        .cloned()
        .expect("IPAM Lease");
    assert_eq!(lease["spec"]["holderIdentity"], NODE);

    // The allocated address and the other controller's both forward.
    for net in ["192.168.30.0/24", "192.0.2.0/24"] {
        lb_tests::sh(&format!(
            "ip -n {} route add {net} via 10.0.0.254",
            topo.client
        ))
        .unwrap();
    }
    let name = topo.client(|| {
        Conversation::open("192.168.30.60:80".parse().unwrap())
            .and_then(|mut c| c.ask())
            .unwrap()
    });
    assert_eq!(name, "backend-1");
    assert!(frontends(&topo).contains(&"192.0.2.50:80/TCP".to_string()));

    // A steady state costs no writes.
    let patches = api.lock().status_patches;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        api.lock().status_patches,
        patches,
        "status rewritten in a steady state"
    );

    // An address freed goes to the Service that asked for it, then to one waiting for any.
    let allocated = |ip: &str| {
        (
            Some(("True".to_string(), "Allocated".to_string())),
            vec![ip.to_string()],
        )
    };
    api.delete("Service", Some("default"), "pinned");
    let start = Instant::now();
    while allocation(&api, "taken") != allocated("192.168.30.61") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}\n{}",
            allocation(&api, "taken"),
            topo.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        allocation(&api, "zeta").0,
        Some(("False".into(), "PoolExhausted".into()))
    );
    api.delete("Service", Some("default"), "taken");
    while allocation(&api, "zeta") != allocated("192.168.30.61") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}\n{}",
            allocation(&api, "zeta"),
            topo.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A stopping agent gives the Lease up at once.
    topo.stop_agent().unwrap();
    let s = api.lock();
    let lease = s
        .get("Lease", Some("kube-system"), "lb-agent-ipam")
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
}

#[test]
fn a_lease_is_held_by_one_agent_at_a_time() {
    use lb_userspace::lease::LeaseLock;
    let api = ApiServer::serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = kube::Config::new(format!("http://{}", api.addr).parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let duration = Duration::from_secs(2);
        let mut a = LeaseLock::new(client.clone(), "kube-system", "test", "a", duration);
        let mut b = LeaseLock::new(client.clone(), "kube-system", "test", "b", duration);
        // Racing from the start: the create or the update with the same resourceVersion
        // succeeds for one of them only.
        for _ in 0..20 {
            let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert!(!(ra && rb), "both hold the lease");
            assert!(ra || rb, "nobody holds the lease");
        }
        let (holder, other) = if a.holding() {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        // Released: taken at the next try.
        holder.release().await.unwrap();
        assert!(other.try_acquire_or_renew().await.unwrap());
        // It stops renewing (crashed): not taken before the lease time, taken after.
        let crashed_at = Instant::now();
        assert!(!holder.try_acquire_or_renew().await.unwrap());
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if holder.try_acquire_or_renew().await.unwrap() {
                break;
            }
        }
        let took = crashed_at.elapsed();
        assert!(
            took >= duration,
            "taken after {took:?}, before the lease expired"
        );
        assert!(
            took < duration + Duration::from_secs(1),
            "taken only after {took:?}"
        );
    });
    let s = api.lock();
    assert!(
        s.count(
            "PUT /apis/coordination.k8s.io/v1/namespaces/kube-system/leases/test",
            ""
        ) > 0
    );
    println!("requests: {}", s.requests.len());
}
