//! One announcer per address on a two-node cluster of namespaces: both agents watch the same
//! API server double; every LoadBalancer address is answered by exactly one node (the
//! rendezvous owner), and moves to the other node when its agent stops, its link goes down or
//! it is killed, within the targets (graceful ≤ 1 s, crash ≤ 3 s), never answered twice.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use lb_tests::{
    BACKEND_TCP_PORT, BACKEND_UDP_PORT, Conversation, Topology,
    apiserver::{ApiServer, fixture},
    arpprobe::{ArpProbe, Round},
    cluster::Cluster,
    sh,
};
use lb_userspace::source::membership::rank;
use serde_json::{Value, json};

const SERVICES: usize = 6;

fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 100 + i as u8)
}

fn objects(api: &ApiServer) {
    for node in ["node-a", "node-b"] {
        let mut n = fixture("node");
        n["metadata"]["name"] = json!(node);
        n["metadata"]["labels"]["kubernetes.io/hostname"] = json!(node);
        api.put(n);
    }
    api.put(json!({"apiVersion": "lb.xdp.rs/v1alpha1", "kind": "LoadBalancerIPPool",
        "metadata": {"name": "lan"},
        "spec": {"blocks": [{"start": address(0).to_string(), "stop": address(SERVICES - 1).to_string()}]}}));
    api.put(
        json!({"apiVersion": "lb.xdp.rs/v1alpha1", "kind": "L2AnnouncementPolicy",
        "metadata": {"name": "lan"}, "spec": {"interfaces": ["^eth1$"], "loadBalancerIPs": true}}),
    );
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        let mut s = fixture("service");
        s["metadata"]["name"] = json!(name);
        s["metadata"]["annotations"] = json!({"lb.xdp.rs/ips": address(i).to_string()});
        s["spec"]["type"] = json!("LoadBalancer");
        s["spec"]["externalTrafficPolicy"] = json!("Local");
        s["spec"]["clusterIP"] = json!(format!("10.96.0.{}", 50 + i));
        s["spec"]["clusterIPs"] = json!([format!("10.96.0.{}", 50 + i)]);
        s["spec"]["ports"] = json!([
            {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": BACKEND_TCP_PORT, "nodePort": 30100 + i},
            {"name": "udp", "protocol": "UDP", "port": 53, "targetPort": BACKEND_UDP_PORT, "nodePort": 30100 + i},
        ]);
        api.put(s);
        let mut slice: Value = fixture("endpointslice");
        slice["metadata"]["name"] = json!(format!("{name}-x1"));
        slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!(name);
        let template = slice["endpoints"][0].clone();
        slice["endpoints"] = json!(
            [1, 2]
                .iter()
                .map(|k| {
                    let mut e = template.clone();
                    e["addresses"] = json!([format!("10.2.{k}.2")]);
                    e["nodeName"] = json!(if *k == 1 { "node-a" } else { "node-b" });
                    e
                })
                .collect::<Vec<_>>()
        );
        slice["ports"] = json!([
            {"name": "tcp", "protocol": "TCP", "port": BACKEND_TCP_PORT},
            {"name": "udp", "protocol": "UDP", "port": BACKEND_UDP_PORT},
        ]);
        api.put(slice);
    }
}

/// The rendezvous owner (node index) of `addr` among `live` nodes.
fn owner(addr: Ipv4Addr, live: &[usize]) -> usize {
    *live
        .iter()
        .max_by_key(|&&i| rank(["node-a", "node-b"][i], addr))
        .unwrap()
}

struct Macs(Vec<String>);

impl Macs {
    fn node(&self, mac: &str) -> usize {
        self.0
            .iter()
            .position(|m| m == mac)
            .expect("reply from an unknown MAC")
    }
}

/// Probes every address for `d`; returns the last answering node of each address.
fn probe_for(cluster: &Cluster, d: Duration) -> Vec<Round> {
    let probe = ArpProbe::start(
        &cluster.client,
        "eth0",
        Ipv4Addr::new(10, 1, 0, 1),
        (0..SERVICES).map(address).collect(),
        Duration::from_millis(15),
    );
    std::thread::sleep(d);
    probe.finish()
}

/// Waits until each address is answered once, by its owner among `live`.
fn wait_settled(cluster: &Cluster, macs: &Macs, live: &[usize], what: &str) {
    let start = Instant::now();
    loop {
        let rounds = probe_for(cluster, Duration::from_millis(300));
        let mut last: BTreeMap<Ipv4Addr, &Round> = BTreeMap::new();
        for r in &rounds {
            last.insert(r.addr, r);
        }
        let ok = (0..SERVICES).all(|i| {
            let a = address(i);
            last.get(&a)
                .is_some_and(|r| r.macs.len() == 1 && macs.node(&r.macs[0]) == owner(a, live))
        });
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: not settled: {last:?}\nA:\n{}\nB:\n{}",
            cluster.agent_log(0),
            cluster.agent_log(1)
        );
    }
}

/// Runs `event` while probing; returns how long after it `addr` was first answered by node
/// `to`, after checking that no request was ever answered twice.
fn handover(
    cluster: &mut Cluster,
    macs: &Macs,
    addr: Ipv4Addr,
    to: usize,
    event: impl FnOnce(&mut Cluster),
) -> Duration {
    let probe = ArpProbe::start(
        &cluster.client,
        "eth0",
        Ipv4Addr::new(10, 1, 0, 1),
        (0..SERVICES).map(address).collect(),
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_millis(300));
    let at = Instant::now();
    event(cluster);
    std::thread::sleep(Duration::from_secs(5));
    let rounds = probe.finish();
    for r in &rounds {
        assert!(
            r.macs.len() <= 1,
            "{} answered {} times: {:?}",
            r.addr,
            r.macs.len(),
            r.macs
        );
    }
    let first = rounds
        .iter()
        .find(|r| {
            r.at >= at && r.addr == addr && r.macs.first().is_some_and(|m| macs.node(m) == to)
        })
        .unwrap_or_else(|| {
            panic!(
                "{addr} never answered by node {to}\nA:\n{}\nB:\n{}",
                cluster.agent_log(0),
                cluster.agent_log(1)
            )
        });
    first.at - at
}

#[test]
fn each_address_has_one_announcer_and_moves_within_the_targets() {
    let mut cluster = Cluster::new().unwrap();
    let api = ApiServer::serve(cluster.api_listener()).unwrap();
    objects(&api);
    let kubeconfig = cluster.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    cluster.start_agent(0, &kubeconfig).unwrap();
    cluster.start_agent(1, &kubeconfig).unwrap();
    let macs = Macs(
        cluster
            .nodes
            .iter()
            .map(|n| Topology::mac_of(&n.ns, "eth1").unwrap())
            .collect(),
    );
    wait_settled(&cluster, &macs, &[0, 1], "both agents up");
    // The rendezvous spreads the addresses: both nodes own some.
    let owners: Vec<usize> = (0..SERVICES).map(|i| owner(address(i), &[0, 1])).collect();
    println!("owners: {owners:?}");
    // Traffic to each address reaches the owner's own pod (externalTrafficPolicy: Local).
    for i in 0..SERVICES {
        let to = format!("{}:80", address(i)).parse().unwrap();
        let name = lb_tests::in_netns(&cluster.client, move || {
            Conversation::open(to).and_then(|mut c| c.ask()).unwrap()
        });
        assert_eq!(name, format!("pod-{}", owners[i] + 1), "{}", address(i));
    }
    // Node Leases: writes grow with nodes, not Services.
    let writes_before = api.lock().count(
        "PUT /apis/coordination.k8s.io/v1/namespaces/kube-system/leases/lb-agent-node-",
        "",
    );
    std::thread::sleep(Duration::from_secs(3));
    let writes = api.lock().count(
        "PUT /apis/coordination.k8s.io/v1/namespaces/kube-system/leases/lb-agent-node-",
        "",
    ) - writes_before;
    println!("node Lease writes in 3 s: {writes} (2 nodes)");
    assert!(
        (5..=8).contains(&writes),
        "{writes} node Lease writes in 3 s (one a second a node)"
    );

    let a = address(0);
    let x = owners[0];
    let y = 1 - x;

    // Graceful: the agent stops.
    let took = handover(&mut cluster, &macs, a, y, |c| {
        c.signal_agent(x, libc::SIGTERM).unwrap()
    });
    println!("graceful stop: {a} answered by node {y} after {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "graceful hand-over took {took:?}"
    );
    cluster.start_agent(x, &kubeconfig).unwrap();
    wait_settled(&cluster, &macs, &[0, 1], "agent back");

    // Link down: the node gives its addresses up at once.
    let ns = cluster.nodes[x].ns.clone();
    let took = handover(&mut cluster, &macs, a, y, |_| {
        sh(&format!("ip -n {ns} link set eth1 down")).unwrap()
    });
    println!("link down: {a} answered by node {y} after {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "link-down hand-over took {took:?}"
    );
    let took = handover(&mut cluster, &macs, a, x, |_| {
        sh(&format!("ip -n {ns} link set eth1 up")).unwrap()
    });
    println!("link up: {a} back on node {x} after {took:?}");
    wait_settled(&cluster, &macs, &[0, 1], "link up");

    // Crash: kill -9; the Lease expires and the dead node's datapath stops answering.
    let took = handover(&mut cluster, &macs, a, y, |c| {
        c.signal_agent(x, libc::SIGKILL).unwrap()
    });
    println!("kill -9: {a} answered by node {y} after {took:?}");
    assert!(
        took <= Duration::from_millis(3200),
        "crash hand-over took {took:?}"
    );
    wait_settled(&cluster, &macs, &[y], "one node left");

    // deploy/rbac.yaml grants exactly what the two agents asked the API server for.
    let used = api.lock().permissions_used();
    let granted = lb_tests::deploy::granted().unwrap();
    assert_eq!(
        used, granted,
        "requests needed {used:?}\ndeploy/rbac.yaml grants {granted:?}"
    );
}
