//! The L2 announcement scenario on a [`Cluster`]: objects, expected owners, and ARP probing
//! that times hand-overs (used by tests/announce.rs and the kubernetes benchmark).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use lb_userspace::source::membership::rank;
use serde_json::{Value, json};

use crate::{
    BACKEND_TCP_PORT, BACKEND_UDP_PORT,
    apiserver::{ApiServer, fixture},
    arpprobe::{ArpProbe, Round},
    cluster::Cluster,
};

/// LoadBalancer Services (one address each) the L2 scenario announces.
pub const SERVICES: usize = 6;

/// The address of Service `i`.
pub fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 100 + i as u8)
}

/// Two Nodes, a pool, an L2 policy on eth1 and [`SERVICES`] externalTrafficPolicy: Local
/// LoadBalancer Services with an endpoint on each node.
pub fn objects(api: &ApiServer) {
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
pub fn owner(addr: Ipv4Addr, live: &[usize]) -> usize {
    *live
        .iter()
        .max_by_key(|&&i| rank(["node-a", "node-b"][i], addr))
        .unwrap()
}

/// The nodes' service-LAN MACs, by node index.
pub struct Macs(pub Vec<String>);

impl Macs {
    pub fn node(&self, mac: &str) -> usize {
        self.0
            .iter()
            .position(|m| m == mac)
            .expect("reply from an unknown MAC")
    }
}

/// ARP rounds for every address during `d`.
pub fn probe_for(cluster: &Cluster, d: Duration) -> Vec<Round> {
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
pub fn wait_settled(cluster: &Cluster, macs: &Macs, live: &[usize], what: &str) {
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
pub fn handover(
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
